//! Blocks made ready ahead of the guest's writes to a write-through state
//! file.
//!
//! A state file is sparse, and the guest's log appends. Each durable write
//! into a hole makes the host file system allocate blocks and commit that
//! to its journal before the write returns, which roughly doubles what a
//! commit costs (ext4, 4 KiB appends with `O_DSYNC`: p50 155 µs into holes,
//! 85 µs onto blocks written before). So once the guest appends (a write
//! that starts where the last one ended, as the log's batches do; not the
//! file's header) the worker fills the next few 64 KiB chunks past it with
//! zeros, one chunk at a time while the guest has no request waiting: the
//! log's next commits then land on written blocks. A chunk is filled only
//! when it is wholly a hole (it reads as zeros already), so the file's
//! content never changes, which is also why nothing of this is shipped to
//! a standby.
//!
//! Owns the window of chunks prepared past the last write. Must never write
//! a byte the file did not already read as: anything it cannot tell is a
//! hole is left alone, and a file system that cannot say (no `SEEK_DATA`)
//! turns this off.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

/// Bytes filled at once: one write per this many bytes of log.
const CHUNK_LEN: usize = 64 << 10;
pub const CHUNK: u64 = CHUNK_LEN as u64;
/// How far past the last write blocks are kept ready.
pub const AHEAD: u64 = 4 * CHUNK;

/// What a chunk is filled with.
static ZEROS: [u8; CHUNK_LEN] = [0; CHUNK_LEN];

/// The chunks made ready past the guest's last write.
#[derive(Debug, Default)]
pub struct Ahead {
    /// Offsets `[checked_from, checked_to)` are chunks already looked at
    /// (filled, or left alone as holding data).
    checked_from: u64,
    checked_to: u64,
    /// End of the guest's last write.
    head: u64,
    /// The last write started where the one before it ended.
    appending: bool,
    /// Off for good: the file system cannot tell holes, or a fill failed.
    off: bool,
}

impl Ahead {
    /// The guest wrote `[start, end)`. An append moves the window on; one
    /// outside what was looked at (the log went on in its other half, say)
    /// starts it afresh at its chunk. Any other write stops it until the
    /// guest appends again.
    pub fn wrote(&mut self, start: u64, end: u64) {
        self.appending = start == self.head;
        self.head = end;
        if !(self.checked_from..=self.checked_to).contains(&end) {
            let chunk = end - end % CHUNK;
            (self.checked_from, self.checked_to) = (chunk, chunk);
        }
    }

    /// Looks at the next chunk of the window and fills it with zeros if it
    /// is wholly a hole; true if there was one to look at (the worker calls
    /// again while the guest waits for nothing).
    pub fn prepare_next(&mut self, file: &File, file_len: u64) -> bool {
        let want_to = self.head.saturating_add(AHEAD).min(file_len);
        if self.off || !self.appending || self.checked_to >= want_to {
            return false;
        }
        let start = self.checked_to;
        let end = (start + CHUNK).min(file_len);
        self.checked_to = end;
        match hole_until(file, start) {
            Ok(data_at) if data_at >= end => {
                // `end - start` is at most CHUNK.
                let zeros = &ZEROS[..usize::try_from(end - start).unwrap_or(0)];
                if file.write_all_at(zeros, start).is_err() {
                    // The write that failed left the chunk's content zeros
                    // or partly zeros: what it read as. Not tried again.
                    self.off = true;
                }
            }
            // Data in the chunk: left as it is.
            Ok(_) => {}
            Err(_) => self.off = true,
        }
        true
    }
}

/// Where the first data at or after `offset` is (`SEEK_DATA`); the file's
/// end when there is none.
fn hole_until(file: &File, offset: u64) -> std::io::Result<u64> {
    let at = libc::off_t::try_from(offset).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek on a descriptor `file` owns; it moves only the file
    // offset, which no caller here uses (all I/O is positioned).
    let found = unsafe { libc::lseek(file.as_raw_fd(), at, libc::SEEK_DATA) };
    if found >= 0 {
        return Ok(u64::try_from(found).unwrap_or(u64::MAX));
    }
    let error = std::io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::ENXIO) {
        // No data past `offset`: a hole up to the end.
        return Ok(u64::MAX);
    }
    Err(error)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    fn sparse(len: u64) -> File {
        use std::os::fd::FromRawFd;
        // SAFETY: memfd_create with a NUL-terminated name; the descriptor is
        // owned by the File from here on.
        let fd = unsafe { libc::memfd_create(c"ahead-test".as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len).unwrap();
        file
    }

    fn contents(file: &File, len: u64) -> Vec<u8> {
        let mut bytes = vec![0u8; usize::try_from(len).unwrap()];
        file.read_exact_at(&mut bytes, 0).unwrap();
        bytes
    }

    #[test]
    fn the_chunks_past_a_write_are_filled_and_nothing_reads_differently() {
        let len = 16 * CHUNK;
        let file = sparse(len);
        // Data in chunk 1 and at the start of chunk 3.
        file.write_all_at(&[7u8; 1000], CHUNK + 10).unwrap();
        file.write_all_at(&[9u8; 512], 3 * CHUNK).unwrap();
        let before = contents(&file, len);
        let blocks_before = file.metadata().unwrap().blocks();
        let mut ahead = Ahead::default();
        ahead.wrote(CHUNK + 10, CHUNK + 1010);
        assert!(!ahead.prepare_next(&file, len), "one write is no append yet");
        ahead.wrote(CHUNK + 1010, CHUNK + 1010 + 512);
        let mut looked = 0;
        while ahead.prepare_next(&file, len) {
            looked += 1;
        }
        // Chunks 1 (the write's own) to 5: the window covers AHEAD past it.
        assert_eq!(looked, 5);
        assert_eq!(contents(&file, len), before, "a byte changed");
        // Chunks 2, 4 and 5 were holes and are now written blocks.
        let filled = (file.metadata().unwrap().blocks() - blocks_before) * 512;
        assert_eq!(filled, 3 * CHUNK, "filled {filled} bytes");
        assert_eq!(hole_until(&file, 2 * CHUNK).unwrap(), 2 * CHUNK);
        // Nothing more until the guest writes further on.
        assert!(!ahead.prepare_next(&file, len));
        ahead.wrote(CHUNK + 1522, 2 * CHUNK + 4096);
        assert!(ahead.prepare_next(&file, len), "the window moved on by one chunk");
        assert!(!ahead.prepare_next(&file, len));
    }

    #[test]
    fn a_write_elsewhere_moves_the_window_and_the_end_of_the_file_stops_it() {
        let len = 8 * CHUNK + 4096;
        let file = sparse(len);
        let mut ahead = Ahead::default();
        ahead.wrote(7 * CHUNK, 7 * CHUNK + 512);
        ahead.wrote(7 * CHUNK + 512, 7 * CHUNK + 1024);
        let mut looked = 0;
        while ahead.prepare_next(&file, len) {
            looked += 1;
        }
        // Chunk 7, chunk 8 (4 KiB: the file ends there), nothing past it.
        assert_eq!(looked, 2);
        assert_eq!(file.metadata().unwrap().len(), len, "the file grew");
        assert_eq!(contents(&file, len), vec![0u8; usize::try_from(len).unwrap()]);
        // The file's header, rewritten: no append, nothing prepared.
        ahead.wrote(0, 512);
        assert!(!ahead.prepare_next(&file, len));
        ahead.wrote(512, 1024);
        assert!(ahead.prepare_next(&file, len), "the window starts afresh at the new appends");
    }
}
