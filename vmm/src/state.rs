//! The host's view of a tenant's state file: the same log code the guest
//! runs (`mqvisor_broker::store`), over the file instead of virtio-blk.
//!
//! Owns opening a state file (a regular file at the very path given, and
//! one that is a state file or empty, see [`open`]), reading it outside a
//! VM for checks before boot, and moving a corrupt one aside. Never writes
//! into one: a check must not change what the guest will recover.

use std::fs::File;
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

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

/// The bytes at the start of a state file that hold its two superblock
/// slots: zero there is a state file with no state yet, to the guest.
const HEAD_BYTES: usize = 1024;
const HEAD: u64 = HEAD_BYTES as u64;
const _: () = assert!(HEAD == 2 * SECTOR);

/// How a state file is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reading only (`state-check`, `--discard-corrupt-state`'s check).
    Read,
    /// Reading and writing, made (empty, mode 0600) when missing.
    ReadWriteCreate,
}

/// Why a path is not opened as a state file. Each is one line naming it.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("the state file {} is a symbolic link, which is not followed; give the file's own path", path.display())]
    Symlink { path: PathBuf },
    #[error("the state file {} is {what}, not a regular file", path.display())]
    NotRegular { path: PathBuf, what: &'static str },
    #[error(
        "{} is not a state file: its first KiB (the superblocks) is zero but byte {at} is not; it is left untouched",
        path.display()
    )]
    Foreign { path: PathBuf, at: u64 },
    #[error("cannot open the state file {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
}

impl OpenError {
    /// The file does not exist (only [`Access::Read`] says so).
    pub fn is_missing(&self) -> bool {
        matches!(self, OpenError::Io { source, .. } if source.kind() == ErrorKind::NotFound)
    }
}

/// Refuses what is not a regular file, by its type.
fn require_regular(path: &Path, kind: std::fs::FileType) -> Result<(), OpenError> {
    let what = if kind.is_file() {
        return Ok(());
    } else if kind.is_symlink() {
        return Err(OpenError::Symlink { path: path.to_path_buf() });
    } else if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else {
        "of an unknown type"
    };
    Err(OpenError::NotRegular { path: path.to_path_buf(), what })
}

/// Opens the state file at `path` itself, never what a symbolic link
/// there names (a dangling one would have root create a file at its
/// target), and only a regular file: a FIFO, a device, a socket or a
/// directory is refused without blocking or acting on it (it is looked at
/// before it is opened, and opened with `O_NONBLOCK`). A file whose first
/// KiB is zero but which holds any non-zero byte is refused too: the guest
/// would take it for a new state file and write over it, and one mqvisor
/// made is all zeros until its guest writes the superblocks at its start.
pub fn open(path: &Path, access: Access) -> Result<File, OpenError> {
    let failed = |source: std::io::Error| OpenError::Io { path: path.to_path_buf(), source };
    match std::fs::symlink_metadata(path) {
        Ok(meta) => require_regular(path, meta.file_type())?,
        Err(e) if e.kind() == ErrorKind::NotFound && access == Access::ReadWriteCreate => {}
        Err(e) => return Err(failed(e)),
    }
    let mut options = std::fs::OpenOptions::new();
    options.read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY);
    if access == Access::ReadWriteCreate {
        // The tenant's messages and sessions: readable by the VMM's user only.
        options.write(true).create(true).truncate(false).mode(0o600);
    }
    let file = options.open(path).map_err(|e| match e.raw_os_error() {
        // O_NOFOLLOW met a link made since the look above.
        Some(libc::ELOOP) => OpenError::Symlink { path: path.to_path_buf() },
        _ => failed(e),
    })?;
    let meta = file.metadata().map_err(failed)?;
    require_regular(path, meta.file_type())?;
    // SAFETY: fcntl on a descriptor this function owns; F_GETFL/F_SETFL
    // only read and set its status flags.
    unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
    match data_past_empty_head(&file, meta.len()).map_err(failed)? {
        Some(at) => Err(OpenError::Foreign { path: path.to_path_buf(), at }),
        None => Ok(file),
    }
}

/// The offset of the first non-zero byte of a file whose first KiB is
/// zero, if it has one (`None` too when its first KiB is not zero: the
/// guest then reads it as a superblock, or refuses it). Holes are skipped
/// (`SEEK_DATA`/`SEEK_HOLE`), so a new sparse file takes a few calls;
/// where the file system cannot tell holes, every byte is read.
fn data_past_empty_head(file: &File, len: u64) -> std::io::Result<Option<u64>> {
    let mut head = vec![0u8; usize::try_from(len.min(HEAD)).unwrap_or(0)];
    file.read_exact_at(&mut head, 0)?;
    if head.iter().any(|&b| b != 0) {
        return Ok(None);
    }
    let seek = |offset: u64, whence: libc::c_int| -> std::io::Result<u64> {
        let offset = libc::off_t::try_from(offset).map_err(std::io::Error::other)?;
        // SAFETY: lseek on an open descriptor; reads go through pread, so
        // the file position it moves is used by nothing else.
        let at = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
        u64::try_from(at).map_err(|_| std::io::Error::last_os_error())
    };
    let mut buf = vec![0u8; 1 << 20];
    let mut at = HEAD;
    while at < len {
        let data = match seek(at, libc::SEEK_DATA) {
            Ok(data) => data,
            // Nothing but holes from here on.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok(None),
            // No SEEK_DATA here: all of it is data.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => at,
            Err(e) => return Err(e),
        };
        let end = seek(data, libc::SEEK_HOLE).unwrap_or(len).min(len);
        let mut pos = data;
        while pos < end {
            let want = usize::try_from(end - pos).unwrap_or(usize::MAX).min(buf.len());
            let got = file.read_at(&mut buf[..want], pos)?;
            if got == 0 {
                return Ok(None);
            }
            if let Some(i) = buf[..got].iter().position(|&b| b != 0) {
                return Ok(Some(pos + i as u64));
            }
            pos += got as u64;
        }
        at = end.max(at + 1);
    }
    Ok(None)
}

/// Moves the file at `path` aside as `PATH.corrupt`, or when that is taken
/// `PATH.corrupt.1`, `.2`, ...: never over an earlier one. Returns the name
/// it now has.
pub fn move_aside(path: &Path) -> std::io::Result<PathBuf> {
    for n in 0..10_000u32 {
        let mut name = path.as_os_str().to_owned();
        name.push(".corrupt");
        if n > 0 {
            name.push(format!(".{n}"));
        }
        let aside = PathBuf::from(name);
        match rename_no_replace(path, &aside) {
            Ok(()) => return Ok(aside),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("every name from PATH.corrupt to PATH.corrupt.9999 is taken"))
}

/// rename(2) that fails with EEXIST instead of replacing `to`.
fn rename_no_replace(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other);
    let (from_c, to_c) = (c(from)?, c(to)?);
    // SAFETY: renameat2 with two NUL-terminated paths that outlive the call.
    let done = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            from_c.as_ptr(),
            libc::AT_FDCWD,
            to_c.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if done == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EINVAL) {
        return Err(e);
    }
    // A file system without RENAME_NOREPLACE: a new link never replaces either.
    std::fs::hard_link(from, to)?;
    std::fs::remove_file(from)
}

/// Reads the whole log in `file` (from [`open`]) as the guest would at
/// boot: what it would recover, or why it would refuse to start. A file
/// with no state yet (all zeros, which [`open`] made sure of when its
/// first KiB is zero) recovers as fresh.
pub fn check(file: &File) -> Result<Recovered, LogError> {
    let len = file.metadata().map_err(|_| LogError::Io)?.len();
    let mut head = [0u8; HEAD_BYTES];
    if file.read_exact_at(&mut head, 0).is_ok() && head.iter().all(|&b| b == 0) {
        return Ok(Recovered { fresh: true, ..Recovered::default() });
    }
    // Read-only: no key or log id is ever made, so no randomness is needed.
    let no_entropy = [0; ENTROPY_BYTES];
    let (_, recovered) = Log::open(ReadOnlyFile(file, len), &no_entropy, |body| Record::decode(body).is_ok())?;
    Ok(recovered)
}
