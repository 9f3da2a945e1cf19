//! A tenant's state file mirrored to a standby node: the shipment format
//! both ends speak, and the owner's end ([`Mirror`]), which the state
//! disk's device drives.
//!
//! Replication is of the disk, not of records: every write the guest makes
//! to its state disk is shipped to the standby, which writes it at the same
//! offset of its copy and makes it durable (`fdatasync`) before it answers;
//! the device completes the guest's write only then. A `sync` commit (one
//! write-through request) therefore waits for both disks, one round trip
//! to the standby per group commit, overlapped with the local write. The
//! copy is a byte-for-byte image of the file, so the standby boots it as a
//! restart after `kill -9` would boot the original: the guest's log, with
//! its CRCs, is the only format.
//!
//! The stream (owner to standby, after the relay port's PROXY header that
//! names the tenant and its epoch): the file's length (8 bytes LE), then
//! shipments, each a [`ShipmentHead`] and its bytes. The first shipments are
//! the file as it is when the mirror starts (a snapshot: runs of zero bytes
//! are skipped, the standby's fresh copy being all zeros), the one flagged
//! [`WHOLE`] says the copy is complete; every later one is a guest write.
//! Each is answered with one byte: [`ACK_DURABLE`], [`ACK_DAMAGED`] (its
//! CRC did not match: sent again, once) or [`ACK_REFUSED`] (a stale epoch,
//! a shipment outside the file: the mirror ends).
//!
//! Owns the format and the owner's blocking end. Never trusts the other
//! end: an answer other than these bytes ends the mirror.

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::FileExt;

use mqvisor_broker::store::log::crc32c;

/// Make this shipment durable before answering (every guest write).
pub const DURABLE: u8 = 1;
/// The copy is whole from this shipment on (the snapshot's end).
pub const WHOLE: u8 = 2;

/// Written and durable.
pub const ACK_DURABLE: u8 = 0;
/// The bytes did not match their CRC: send them again.
pub const ACK_DAMAGED: u8 = 1;
/// Refused for good (a stale epoch, a range outside the file).
pub const ACK_REFUSED: u8 = 2;

/// Bytes of a shipment's head.
pub const HEAD_LEN: usize = 17;
/// The largest shipment: a guest write is at most the device's transfer
/// limit, a snapshot chunk less.
pub const MAX_SHIPMENT: usize = crate::devices::virtio::block::MAX_TRANSFER;
/// Snapshot chunks.
const CHUNK: usize = 1 << 20;

/// A shipment's head: where its bytes go, how many, their CRC-32C, flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShipmentHead {
    pub offset: u64,
    pub len: u32,
    pub crc: u32,
    pub flags: u8,
}

impl ShipmentHead {
    pub fn encode(&self) -> [u8; HEAD_LEN] {
        let mut head = [0u8; HEAD_LEN];
        head[..8].copy_from_slice(&self.offset.to_le_bytes());
        head[8..12].copy_from_slice(&self.len.to_le_bytes());
        head[12..16].copy_from_slice(&self.crc.to_le_bytes());
        head[16] = self.flags;
        head
    }

    pub fn decode(head: &[u8; HEAD_LEN]) -> ShipmentHead {
        let le32 = |at: usize| u32::from_le_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
        let mut offset = [0u8; 8];
        offset.copy_from_slice(&head[..8]);
        ShipmentHead { offset: u64::from_le_bytes(offset), len: le32(8), crc: le32(12), flags: head[16] }
    }

    /// True when the shipment fits a file of `file_len` bytes and the bound.
    pub fn fits(&self, file_len: u64) -> bool {
        let len = self.len as usize;
        len <= MAX_SHIPMENT && self.offset.checked_add(u64::from(self.len)).is_some_and(|end| end <= file_len)
    }
}

/// How long the standby may take to answer before the mirror is lost.
pub const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The socket options of a connection to the standby: blocking, answers
/// awaited at most [`ANSWER_TIMEOUT`], no Nagle delay. Set by whoever makes
/// the connection (they stay with the socket when it is handed over).
pub fn set_options(socket: &TcpStream) -> std::io::Result<()> {
    socket.set_nonblocking(false)?;
    socket.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    socket.set_write_timeout(Some(ANSWER_TIMEOUT))?;
    socket.set_nodelay(true)
}

/// The owner's end of a mirror: a blocking connection to the standby,
/// kept as a `File` so that it is read and written with `read(2)` and
/// `write(2)`, which the state disk's thread may call (see `seccomp`).
pub struct Mirror {
    socket: File,
}

impl Mirror {
    /// Gives a connection to the standby the socket options a mirror
    /// needs (where `setsockopt` may be called: not on the state disk's
    /// thread), and makes it a `File`.
    pub fn prepare(socket: TcpStream) -> std::io::Result<File> {
        set_options(&socket)?;
        Ok(File::from(std::os::fd::OwnedFd::from(socket)))
    }

    /// Starts mirroring `file`, `len` bytes long, over `socket` (made by
    /// [`Mirror::prepare`], its PROXY header sent): sends the length and
    /// the file's present data, and returns once the standby has said its
    /// copy is whole and durable.
    pub fn start(mut socket: File, file: &File, len: u64) -> std::io::Result<Mirror> {
        socket.write_all(&len.to_le_bytes())?;
        let mut mirror = Mirror { socket };
        let mut chunk = vec![0u8; CHUNK];
        let mut offset = 0u64;
        while offset < len {
            // Holes are zeros on both sides: only data is read and sent.
            let Some((data, hole)) = data_from(file, offset, len) else { break };
            offset = data;
            while offset < hole {
                let take = usize::try_from((hole - offset).min(CHUNK as u64)).unwrap_or(CHUNK);
                file.read_exact_at(&mut chunk[..take], offset)?;
                if chunk[..take].iter().any(|&b| b != 0) {
                    mirror.send(offset, &chunk[..take], 0)?;
                    mirror.answered(offset, &chunk[..take], 0)?;
                }
                offset += take as u64;
            }
        }
        mirror.send(0, &[], WHOLE | DURABLE)?;
        mirror.answered(0, &[], WHOLE | DURABLE)?;
        Ok(mirror)
    }

    /// Ships a guest write of `data` at `offset`; [`Mirror::answered`] waits
    /// for its answer (the local write goes on meanwhile).
    pub fn ship(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.send(offset, data, DURABLE)
    }

    /// Waits until the standby has the write of `data` at `offset` that
    /// [`Mirror::ship`] sent, durable; sends it again once if it arrived
    /// damaged. An error ends the mirror.
    pub fn wait_durable(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.answered(offset, data, DURABLE)
    }

    fn send(&mut self, offset: u64, data: &[u8], flags: u8) -> std::io::Result<()> {
        let len = u32::try_from(data.len()).map_err(|_| std::io::Error::other("shipment too large"))?;
        let head = ShipmentHead { offset, len, crc: crc32c(data), flags };
        self.socket.write_all(&head.encode())?;
        self.socket.write_all(data)
    }

    fn answer(&mut self) -> std::io::Result<u8> {
        let mut answer = [0u8; 1];
        self.socket.read_exact(&mut answer)?;
        Ok(answer[0])
    }

    fn answered(&mut self, offset: u64, data: &[u8], flags: u8) -> std::io::Result<()> {
        match self.answer()? {
            ACK_DURABLE => Ok(()),
            ACK_DAMAGED => {
                self.send(offset, data, flags)?;
                match self.answer()? {
                    ACK_DURABLE => Ok(()),
                    _ => Err(std::io::Error::other("the standby refused a shipment sent twice")),
                }
            }
            ACK_REFUSED => Err(std::io::Error::other("the standby refused the shipment (a newer owner?)")),
            other => Err(std::io::Error::other(format!("the standby answered {other:#x}"))),
        }
    }
}

/// The next run of data in `file` at or after `offset`, as (start, end),
/// or `None` if only holes are left before `len`. A file system that
/// cannot say where its holes are is all data.
fn data_from(file: &File, offset: u64, len: u64) -> Option<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let seek = |from: u64, whence: libc::c_int| {
        let from = libc::off_t::try_from(from).ok()?;
        // SAFETY: lseek on a descriptor `file` owns; it moves only the
        // descriptor's offset, which nothing here relies on (reads are
        // positioned).
        let at = unsafe { libc::lseek(file.as_raw_fd(), from, whence) };
        u64::try_from(at).ok()
    };
    match seek(offset, libc::SEEK_DATA) {
        Some(start) if start < len => Some((start, seek(start, libc::SEEK_HOLE).unwrap_or(len).min(len))),
        Some(_) => None,
        None if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) => None,
        None => Some((offset, len)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_round_trips_and_fits_only_inside_the_file() {
        let head = ShipmentHead { offset: 4096, len: 512, crc: 0xdead_beef, flags: DURABLE };
        assert_eq!(ShipmentHead::decode(&head.encode()), head);
        assert!(head.fits(4608));
        assert!(!head.fits(4607));
        assert!(!ShipmentHead { offset: u64::MAX, len: 1, crc: 0, flags: 0 }.fits(u64::MAX));
        assert!(
            !ShipmentHead { offset: 0, len: u32::try_from(MAX_SHIPMENT).unwrap() + 1, crc: 0, flags: 0 }.fits(u64::MAX)
        );
    }

    /// A standby of the test's own: applies shipments to `copy`, answering
    /// the first one (after the length) as damaged.
    fn standby(mut socket: TcpStream, copy: File) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let mut len = [0u8; 8];
            socket.read_exact(&mut len).unwrap();
            copy.set_len(u64::from_le_bytes(len)).unwrap();
            let mut first = true;
            loop {
                let mut head = [0u8; HEAD_LEN];
                if socket.read_exact(&mut head).is_err() {
                    return;
                }
                let head = ShipmentHead::decode(&head);
                let mut data = vec![0u8; head.len as usize];
                socket.read_exact(&mut data).unwrap();
                if std::mem::take(&mut first) {
                    socket.write_all(&[ACK_DAMAGED]).unwrap();
                    continue;
                }
                assert_eq!(crc32c(&data), head.crc);
                copy.write_all_at(&data, head.offset).unwrap();
                socket.write_all(&[ACK_DURABLE]).unwrap();
            }
        })
    }

    #[test]
    fn the_snapshot_then_each_write_reach_the_copy_and_a_damaged_one_is_sent_again() {
        let dir = std::env::temp_dir().join(format!("mqvisor-replica-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (path, copy_path) = (dir.join("state"), dir.join("copy"));
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        file.set_len(3 * CHUNK as u64).unwrap();
        file.write_all_at(b"before", 2 * CHUNK as u64 + 7).unwrap();
        let copy = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&copy_path);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let owner = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let standby = standby(listener.accept().unwrap().0, copy.unwrap());
        let mut mirror = Mirror::start(Mirror::prepare(owner).unwrap(), &file, 3 * CHUNK as u64).unwrap();
        mirror.ship(512, b"after").unwrap();
        file.write_all_at(b"after", 512).unwrap();
        mirror.wait_durable(512, b"after").unwrap();
        drop(mirror);
        standby.join().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), std::fs::read(&copy_path).unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
