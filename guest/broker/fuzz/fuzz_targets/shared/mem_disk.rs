//! A state disk in memory for the state fuzz targets: whole bytes, no
//! failures, flushes that do nothing.

use mqvisor_broker::store::log::{Disk, IoError, SECTOR};

pub struct MemDisk(pub Vec<u8>);

impl Disk for &mut MemDisk {
    fn sectors(&self) -> u64 {
        self.0.len() as u64 / SECTOR
    }
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let at = usize::try_from(offset).map_err(|_| IoError)?;
        buf.copy_from_slice(self.0.get(at..at + buf.len()).ok_or(IoError)?);
        Ok(())
    }
    fn write(&mut self, offset: u64, buf: &[u8]) -> Result<(), IoError> {
        let at = usize::try_from(offset).map_err(|_| IoError)?;
        self.0.get_mut(at..at + buf.len()).ok_or(IoError)?.copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), IoError> {
        Ok(())
    }
}
