//! The host's view of a tenant's state file: the same log code the guest
//! runs (`mqvisor_broker::store`), over the file instead of virtio-blk.
//!
//! Owns reading a state file outside a VM, for checks before boot. Never
//! writes: a check must not change what the guest will recover.

use std::fs::File;
use std::os::unix::fs::FileExt;

use mqvisor_broker::store::log::{Disk, ENTROPY_BYTES, IoError, Log, LogError, Recovered, SECTOR};
use mqvisor_broker::store::record::Record;

/// A state file opened for reading only.
struct ReadOnlyFile<'a>(&'a File, u64);

impl Disk for ReadOnlyFile<'_> {
    fn sectors(&self) -> u64 {
        self.1 / SECTOR
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        self.0.read_exact_at(buf, offset).map_err(|_| IoError)
    }

    fn write(&mut self, _: u64, _: &[u8]) -> Result<(), IoError> {
        Err(IoError)
    }

    fn flush(&mut self) -> Result<(), IoError> {
        Ok(())
    }
}

/// Reads the whole log in `file` as the guest would at boot: what it would
/// recover, or why it would refuse to start. A file with no state yet
/// (all zeros at the start) recovers as fresh.
pub fn check(file: &File) -> Result<Recovered, LogError> {
    let len = file.metadata().map_err(|_| LogError::Io)?.len();
    let mut head = [0u8; 1024];
    if file.read_exact_at(&mut head, 0).is_ok() && head.iter().all(|&b| b == 0) {
        return Ok(Recovered { fresh: true, ..Recovered::default() });
    }
    // Read-only: no key or log id is ever made, so no randomness is needed.
    let no_entropy = [0; ENTROPY_BYTES];
    let (_, recovered) = Log::open(ReadOnlyFile(file, len), &no_entropy, |body| Record::decode(body).is_ok())?;
    Ok(recovered)
}
