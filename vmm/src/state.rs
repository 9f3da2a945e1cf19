//! The host's view of a tenant's state file: the same log code the guest
//! runs (`mqvisor_broker::store`), over the file instead of virtio-blk.
//!
//! Owns opening a state file (a regular file at the very path given, and
//! one that is a state file or empty, see [`open`]; for a VM, held under
//! an exclusive lock, see [`open_exclusive`]), the rules on its size
//! ([`refuse_size`], [`fits`]), laying out a new one ([`lay_out`]),
//! reading it outside a VM for checks before boot, and moving a corrupt
//! one aside. Never writes into one: a check must not change what the
//! guest will recover. Also owns [`Persistence`], how the broker keeps
//! its state, from the operator's setting to boot-info.

use std::fs::File;
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use mqvisor_broker::store::log::{
    DATA_START, Disk, ENTROPY_BYTES, FORMAT_VERSION, IoError, Log, LogError, MAX_BATCH, MIN_SECTORS, Recovered, SECTOR,
    crc32c,
};
use mqvisor_broker::store::record::Record;

/// How the broker keeps its state: `mqvisor run --persistence`, a `serve`
/// tenant's `persistence`, and the VM's state disk all carry this one type;
/// its boot-ABI number exists only in boot-info ([`Persistence::boot_abi`]).
/// `sync`: acknowledgements wait until their records are flushed; `batch`:
/// records are flushed every interval and acknowledgements do not wait;
/// `off`: no state file, state in RAM only.
#[derive(clap::ValueEnum, serde::Deserialize, serde::Serialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Persistence {
    #[default]
    Sync,
    Batch,
    Off,
}

impl Persistence {
    /// The mode named `name` (`sync`, `batch` or `off`), as in a
    /// configuration file.
    pub fn from_name(name: &str) -> Option<Persistence> {
        [Persistence::Sync, Persistence::Batch, Persistence::Off].into_iter().find(|mode| mode.name() == name)
    }

    /// Its name in flags and configuration files.
    pub fn name(self) -> &'static str {
        match self {
            Persistence::Sync => "sync",
            Persistence::Batch => "batch",
            Persistence::Off => "off",
        }
    }

    /// Its number in boot-info (`mqvisor_boot_abi::persistence`).
    pub fn boot_abi(self) -> u32 {
        match self {
            Persistence::Sync => mqvisor_boot_abi::persistence::SYNC,
            Persistence::Batch => mqvisor_boot_abi::persistence::BATCH,
            Persistence::Off => mqvisor_boot_abi::persistence::OFF,
        }
    }
}

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
    #[error("the state file {} is in use by another mqvisor (it holds the file's lock)", path.display())]
    InUse { path: PathBuf },
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
    open_as(path, access, false).map(|held| held.file)
}

/// A state file opened for a VM by [`open_exclusive`]: read and write,
/// under an exclusive `flock` held as long as `file` (or a descriptor
/// duplicated from it) is open, so for the VM's life.
#[derive(Debug)]
pub struct Exclusive {
    pub file: File,
    /// Made by this call (it did not exist): [`Exclusive::remove_new`]
    /// removes it again when the start fails.
    pub created: bool,
}

impl Exclusive {
    /// Removes the file at `path` when this open made it and `path` still
    /// names it: a start that fails leaves no file it made behind.
    pub fn remove_new(&self, path: &Path) {
        if self.created && same_file(&self.file, path) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Opens the state file at `path` as [`open`] does with
/// [`Access::ReadWriteCreate`] (made, empty and mode 0600, when missing),
/// and takes an exclusive `flock` on it before anything reads it: a file
/// another mqvisor holds is refused ([`OpenError::InUse`]) at once, never
/// waited for, so two VMs never write one file. A path that no longer
/// names the locked file once the lock is held (another mqvisor moved it
/// aside meanwhile) is opened again.
pub fn open_exclusive(path: &Path) -> Result<Exclusive, OpenError> {
    open_as(path, Access::ReadWriteCreate, true)
}

/// Whether `path` (not followed) names the very file `file` is.
fn same_file(file: &File, path: &Path) -> bool {
    match (file.metadata(), std::fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Takes `file`'s exclusive lock without waiting: false when another
/// open file description holds a lock on it.
fn lock_exclusive(file: &File) -> std::io::Result<bool> {
    // SAFETY: flock on a descriptor `file` owns; it only sets a lock.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) { Ok(false) } else { Err(e) }
}

fn open_as(path: &Path, access: Access, lock: bool) -> Result<Exclusive, OpenError> {
    let failed = |source: std::io::Error| OpenError::Io { path: path.to_path_buf(), source };
    // A path moved aside or made again between the open and the lock is
    // opened again; a few rounds, as each needs another mqvisor at work.
    let mut rounds = 0;
    let (file, created, meta) = loop {
        rounds += 1;
        let exists = match std::fs::symlink_metadata(path) {
            Ok(meta) => {
                require_regular(path, meta.file_type())?;
                true
            }
            Err(e) if e.kind() == ErrorKind::NotFound && access == Access::ReadWriteCreate => false,
            Err(e) => return Err(failed(e)),
        };
        let mut options = std::fs::OpenOptions::new();
        options.read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY);
        if access == Access::ReadWriteCreate {
            options.write(true);
            if !exists {
                // The tenant's messages and sessions: readable by the VMM's
                // user only. Made here, or not at all (O_EXCL): a file that
                // appeared meanwhile is looked at again.
                options.create_new(true).mode(0o600);
            }
        }
        let file = match options.open(path) {
            Ok(file) => file,
            Err(e) if rounds < 5 && matches!(e.kind(), ErrorKind::AlreadyExists | ErrorKind::NotFound) => continue,
            // O_NOFOLLOW met a link made since the look above.
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(OpenError::Symlink { path: path.to_path_buf() });
            }
            Err(e) => return Err(failed(e)),
        };
        let meta = file.metadata().map_err(failed)?;
        require_regular(path, meta.file_type())?;
        if lock {
            if !lock_exclusive(&file).map_err(failed)? {
                return Err(OpenError::InUse { path: path.to_path_buf() });
            }
            if !same_file(&file, path) {
                if rounds < 5 {
                    continue;
                }
                return Err(OpenError::InUse { path: path.to_path_buf() });
            }
        }
        break (file, !exists, meta);
    };
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
        None => Ok(Exclusive { file, created }),
    }
}

/// Whether another process holds a `flock` on `file` (a running mqvisor
/// does, on its state file), read from `/proc/locks`: this takes no lock
/// itself, so it can never make a VM starting meanwhile find the file in
/// use. False when that cannot be told.
pub fn in_use(file: &File) -> bool {
    let Ok(meta) = file.metadata() else { return false };
    let Ok(locks) = std::fs::read_to_string("/proc/locks") else { return false };
    // "1: FLOCK  ADVISORY  WRITE 4242 fe:00:10011144 0 EOF": the device's
    // major and minor in hex, the inode in decimal.
    let want = format!("{:02x}:{:02x}:{}", libc::major(meta.dev()), libc::minor(meta.dev()), meta.ino());
    locks.lines().any(|line| {
        let words: Vec<&str> = line.split_whitespace().collect();
        words.iter().position(|&w| w == "FLOCK").is_some_and(|at| words.get(at + 4) == Some(&want.as_str()))
    })
}

/// The smallest state file, in bytes: what the log needs.
pub const MIN_BYTES: u64 = MIN_SECTORS * SECTOR;

/// Refuses a state file of `len` bytes that is too small to be one. An
/// empty file is not refused: it is laid out (see [`lay_out`]).
pub fn refuse_size(path: &Path, len: u64) -> Result<(), String> {
    if len == 0 || len >= MIN_BYTES {
        return Ok(());
    }
    Err(format!("the state file {} is {len} bytes; a state file is at least {} MiB", path.display(), MIN_BYTES >> 20))
}

/// `len` bytes in MiB when whole, else in bytes.
pub fn size_text(len: u64) -> String {
    if len.is_multiple_of(1 << 20) { format!("{} MiB", len >> 20) } else { format!("{len} bytes") }
}

/// Bytes in each of the two regions of a state file of `len` bytes: what
/// follows the first MiB, halved, rounded down to a sector (as the log
/// lays them out).
pub fn region_bytes(len: u64) -> u64 {
    (len / SECTOR * SECTOR).saturating_sub(DATA_START) / 2 / SECTOR * SECTOR
}

/// The region a packet of `max_packet_size` bytes needs: its record (the
/// packet and the record's own fields, a client id of up to 64 KiB among
/// them) beside the rest of a compacted state, whose batches each carry a
/// header; one batch more covers both.
fn region_needed(max_packet_size: u64) -> u64 {
    max_packet_size + MAX_BATCH as u64
}

/// The largest packet a state file of `len` bytes holds in its region.
pub fn largest_packet(len: u64) -> u64 {
    region_bytes(len).saturating_sub(MAX_BATCH as u64)
}

/// The smallest state file, in MiB, whose regions hold a packet of
/// `max_packet_size` bytes.
pub fn size_mib_for(max_packet_size: u64) -> u64 {
    (2 * region_needed(max_packet_size) + DATA_START).div_ceil(1 << 20).max(MIN_BYTES >> 20)
}

/// Refuses a `max_packet_size` that a state file of `len` bytes cannot
/// hold: a retained message that large would not fit in a region, so it
/// would fail at its first compaction ("the live state does not fit")
/// instead of at start. `new`: the file is being made (at `len`), so
/// `--state-size` is what to change.
pub fn fits(path: &Path, len: u64, max_packet_size: u64, new: bool) -> Result<(), String> {
    if region_needed(max_packet_size) <= region_bytes(len) {
        return Ok(());
    }
    let (need, most, shown) = (size_mib_for(max_packet_size), largest_packet(len), path.display());
    let size = size_text(len);
    Err(if new {
        format!(
            "--max-packet-size {max_packet_size} does not fit in the new state file {shown} of {size}: its regions \
             hold packets of at most {most} bytes; give --state-size {need} or more, or a smaller --max-packet-size"
        )
    } else {
        format!(
            "--max-packet-size {max_packet_size} does not fit in the state file {shown} ({size}): its regions hold \
             packets of at most {most} bytes; give --max-packet-size {most} or less (a new file of {need} MiB \
             would hold it)"
        )
    })
}

/// The size the log in `file` (`len` bytes) was laid out for, which places
/// its regions: `len` for a file with no state yet (its first KiB zero),
/// else the size the newest intact superblock records
/// (docs/state-format.md: magic, format version, generation at 16, size in
/// sectors at 40, CRC-32C of bytes 0..64 at 64). `None` when no superblock
/// is intact: the guest refuses such a file, or tells why, itself.
pub fn laid_out_len(file: &File, len: u64) -> Option<u64> {
    let mut head = [0u8; HEAD_BYTES];
    file.read_exact_at(&mut head, 0).ok()?;
    if head.iter().all(|&b| b == 0) {
        return Some(len);
    }
    let le32 = |s: &[u8], at: usize| u32::from_le_bytes(s[at..at + 4].try_into().unwrap_or_default());
    let le64 = |s: &[u8], at: usize| u64::from_le_bytes(s[at..at + 8].try_into().unwrap_or_default());
    head.chunks(HEAD_BYTES / 2)
        .filter(|s| &s[..8] == b"MQVSTATE" && le32(s, 8) == FORMAT_VERSION && crc32c(&s[..64]) == le32(s, 64))
        .max_by_key(|s| le64(s, 16))
        .map(|s| le64(s, 40).saturating_mul(SECTOR))
}

/// Lays out an empty state file (just opened by [`open_exclusive`]) at
/// `len` bytes: mode 0600 (a file that was there, empty, may have had any
/// mode), sparse at `len`, and its first file-system block allocated, where
/// the guest writes the superblocks first: a full file system is refused
/// here in one line, not found by the guest as a failed write. On failure
/// the file is empty again.
pub fn lay_out(file: &File, path: &Path, len: u64) -> Result<(), String> {
    let shown = path.display();
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot make the state file {shown} mode 0600: {e}"))?;
    // SIGXFSZ is ignored (mqvisor run does so first): past a file-size
    // limit this fails with EFBIG instead of killing the process.
    file.set_len(len).map_err(|e| format!("cannot size the state file {shown} to {}: {e}", size_text(len)))?;
    let block = file.metadata().map(|m| m.blksize()).unwrap_or(4096).clamp(HEAD, 1 << 20).min(len);
    // SAFETY: posix_fallocate on a descriptor `file` owns; it only
    // allocates blocks of the file (a range within its size).
    let err = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, libc::off_t::try_from(block).unwrap_or(0)) };
    if err != 0 {
        let _ = file.set_len(0);
        let e = std::io::Error::from_raw_os_error(err);
        return Err(format!("cannot allocate the first {block} bytes of the state file {shown}: {e}"));
    }
    Ok(())
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

/// Whether `error` is damage to a log (a batch, a record or the current
/// superblock), which `--discard-corrupt-state` may move aside. Every
/// other refusal (a resized file, not a state file, another format
/// version, too small, an I/O error) says the file is not this build's
/// intact log, or could not be read: it is no reason to start over.
pub fn is_damage(error: &LogError) -> bool {
    matches!(error, LogError::Corrupt { .. } | LogError::BadRecord { .. })
}

/// Reads the whole log in `file` (from [`open`]) as the guest would at
/// boot: what it would recover, or why it would refuse to start. A file
/// with no state yet (empty, which `mqvisor run` lays out, or all zeros,
/// which [`open`] made sure of when its first KiB is zero) recovers as
/// fresh; check [`refuse_size`] first.
pub fn check(file: &File) -> Result<Recovered, LogError> {
    let len = file.metadata().map_err(|_| LogError::Io)?.len();
    if len == 0 {
        return Ok(Recovered { fresh: true, ..Recovered::default() });
    }
    if len < MIN_BYTES {
        return Err(LogError::TooSmall(len / SECTOR));
    }
    let mut head = [0u8; HEAD_BYTES];
    if file.read_exact_at(&mut head, 0).is_ok() && head.iter().all(|&b| b == 0) {
        return Ok(Recovered { fresh: true, ..Recovered::default() });
    }
    // Read-only: no key or log id is ever made, so no randomness is needed.
    let no_entropy = [0; ENTROPY_BYTES];
    let (_, recovered) = Log::open(ReadOnlyFile(file, len), &no_entropy, |body| Record::decode(body).is_ok())?;
    Ok(recovered)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_region_must_hold_the_largest_packet_and_a_batch_more() {
        const MIB: u64 = 1 << 20;
        // (4 MiB - 1 MiB) / 2: 1.5 MiB, of which a batch is slack.
        assert_eq!(region_bytes(4 * MIB), 3 * MIB / 2);
        assert_eq!(largest_packet(4 * MIB), MIB / 2);
        assert!(fits(Path::new("t"), 4 * MIB, MIB / 2, true).is_ok());
        let refused = fits(Path::new("t"), 4 * MIB, MIB / 2 + 1, true).unwrap_err();
        assert!(refused.contains("give --state-size 5 or more"), "{refused}");
        // Rounded down to a sector, like the log's own regions.
        assert_eq!(region_bytes(4 * MIB + 1024), 3 * MIB / 2 + 512);
        assert_eq!(region_bytes(4 * MIB + 1023), 3 * MIB / 2);
        // 32 MiB holds 14.5 MiB packets; 16 MiB needs 35 MiB.
        assert_eq!(largest_packet(32 * MIB), 29 * MIB / 2);
        assert_eq!(size_mib_for(16 * MIB), 35);
        assert!(fits(Path::new("t"), 35 * MIB, 16 * MIB, true).is_ok());
        // The default file holds the largest packet MQTT can carry.
        let largest = mqvisor_broker::broker::MAX_PACKET_SIZE_LIMIT as u64;
        assert!(fits(Path::new("t"), 1024 * MIB, largest, false).is_ok());
        assert_eq!(size_mib_for(16), 4, "never under the smallest file");
    }

    #[test]
    fn a_persistence_mode_is_one_name_everywhere_and_a_number_in_boot_info() {
        use clap::ValueEnum;
        use mqvisor_boot_abi::persistence::{BATCH, OFF, SYNC};
        for mode in Persistence::value_variants() {
            let flag = mode.to_possible_value().map(|v| v.get_name().to_string());
            assert_eq!(flag.as_deref(), Some(mode.name()), "the flag's value is the file's");
            assert_eq!(Persistence::from_name(mode.name()), Some(*mode));
            let in_file = toml::Value::try_from(mode).unwrap();
            assert_eq!(in_file.as_str(), Some(mode.name()));
        }
        assert_eq!(Persistence::from_name("always"), None);
        let numbers = [Persistence::Off, Persistence::Sync, Persistence::Batch].map(Persistence::boot_abi);
        assert_eq!(numbers, [OFF, SYNC, BATCH]);
    }
}
