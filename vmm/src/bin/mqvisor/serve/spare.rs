//! Starting tenants' VMM processes, with one spare started ahead of need.
//!
//! Creating a process is most of what a cold tenant waits for on these
//! machines (fork of the daemon, exec, loading: 3 to 4 ms of a 12 ms first
//! CONNACK). So the daemon keeps one `mqvisor run` started and waiting on
//! its handoff socket for the settings of the tenant it will be; a tenant
//! that boots takes it and sends it its settings file ([`ASSIGN_TENANT`]),
//! and another spare is started once the daemon's loop is free again.
//!
//! Owns the spawn of every tenant process (descriptors, death signal) and
//! the spare. The spare knows nothing of any tenant until it is assigned
//! one: it has not read a setting, joined a group, opened a state file or
//! created a VM, so handing it to a tenant shares nothing between tenants.
//! Must only run on the daemon's runtime thread: the death signal is tied
//! to the thread that forked.

use std::cell::RefCell;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use mqvisor::net::ingress::ASSIGN_TENANT;

/// The descriptor number the handoff socket has in the tenant's process.
const HANDOFF_FD: i32 = 3;

/// A started `mqvisor run`, with the daemon's end of its handoff socket.
pub struct Started {
    pub child: tokio::process::Child,
    pub socket: UnixDatagram,
    /// The executable it was started from, as it was then.
    exe: Option<Executable>,
}

/// Which file an executable path named, and when it last changed: a spare
/// started before the binary was replaced (an upgrade) is not used, so
/// every tenant booted after the upgrade runs the new binary, as it would
/// without a spare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Executable {
    device: u64,
    inode: u64,
    modified: i64,
    modified_ns: i64,
}

impl Executable {
    fn of(path: &Path) -> Option<Executable> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).ok()?;
        Some(Executable {
            device: meta.dev(),
            inode: meta.ino(),
            modified: meta.mtime(),
            modified_ns: meta.mtime_nsec(),
        })
    }
}

thread_local! {
    /// The spare, when one is started and not yet taken.
    static SPARE: RefCell<Option<Started>> = const { RefCell::new(None) };
}

/// A process running the tenant whose settings are `settings`: the spare,
/// told so, when there is a live one, else a process started for it. A
/// new spare is started once the daemon's loop comes back to it.
pub fn start_tenant(exe: &Path, settings: &Path) -> std::io::Result<Started> {
    let spare = SPARE.with(|spare| spare.borrow_mut().take());
    let current = Executable::of(exe);
    let spare = spare.filter(|spare| spare.exe.is_some() && spare.exe == current);
    let started = match spare.and_then(|spare| assign(spare, settings)) {
        Some(started) => started,
        None => start(exe, Some(settings))?,
    };
    keep_spare(exe);
    Ok(started)
}

/// Starts the spare (if there is none) once the daemon's loop is free:
/// after the tenant that took the last one has been handed its clients.
pub fn keep_spare(exe: &Path) {
    let exe = exe.to_path_buf();
    tokio::spawn(async move {
        if SPARE.with(|spare| spare.borrow().is_some()) {
            return;
        }
        match start(&exe, None) {
            Ok(started) => SPARE.with(|spare| *spare.borrow_mut() = Some(started)),
            // Tenants then start their own process, as without a spare.
            Err(e) => tracing::warn!("cannot start a spare tenant process: {e}"),
        }
    });
}

/// Replaces a spare that ended before it was used (its zombie reaped
/// here); called every second.
pub fn check(exe: &Path) {
    let ended = SPARE.with(|spare| {
        let mut spare = spare.borrow_mut();
        let ended = spare.as_mut().is_some_and(|s| !matches!(s.child.try_wait(), Ok(None)));
        if ended {
            *spare = None;
        }
        ended
    });
    if ended {
        tracing::warn!("the spare tenant process ended before it was used: starting another");
        keep_spare(exe);
    }
}

/// Kills the spare and waits for it: the daemon stops.
pub async fn discard() {
    if let Some(mut spare) = SPARE.with(|spare| spare.borrow_mut().take()) {
        let _ = spare.child.start_kill();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), spare.child.wait()).await;
    }
}

/// Sends the spare its tenant's settings; `None` if it has gone (then it
/// is reaped and dropped here, and the tenant starts its own). A spare not
/// used (gone, or of a replaced binary) is killed as it is dropped.
fn assign(mut spare: Started, settings: &Path) -> Option<Started> {
    if !matches!(spare.child.try_wait(), Ok(None)) {
        return None;
    }
    let mut datagram = vec![ASSIGN_TENANT];
    datagram.extend_from_slice(settings.as_os_str().as_bytes());
    // The spare's socket is empty (it is sent nothing else before this),
    // so the one datagram always fits.
    spare.socket.send(&datagram).ok()?;
    Some(spare)
}

/// Starts `mqvisor run` on a new handoff socket: with `settings`, as that
/// tenant; without, as the spare, waiting to be told.
fn start(exe: &Path, settings: Option<&Path>) -> std::io::Result<Started> {
    let (ours, theirs) = UnixDatagram::pair()?;
    ours.set_nonblocking(true)?;
    let their_fd = theirs.as_raw_fd();
    let mut command = tokio::process::Command::new(exe);
    command.arg("run").args(["--handoff-fd", &HANDOFF_FD.to_string()]);
    match settings {
        Some(settings) => command.arg("--tenant-settings").arg(settings),
        None => command.arg("--tenant-settings-from-handoff"),
    };
    command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::inherit()).kill_on_drop(true);
    // SAFETY: between fork and exec this runs only async-signal-safe
    // calls (dup2, fcntl, prctl) on descriptors of the child itself.
    unsafe {
        command.pre_exec(move || {
            if their_fd == HANDOFF_FD {
                // Already in place: only keep it across exec.
                if libc::fcntl(HANDOFF_FD, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(their_fd, HANDOFF_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The tenant ends with the daemon, never outlives it.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let exe_then = Executable::of(exe);
    let child = command.spawn()?;
    drop(theirs);
    Ok(Started { child, socket: ours, exe: exe_then })
}

/// The settings file a spare was assigned, from the first datagram on its
/// handoff socket (`mqvisor run --tenant-settings-from-handoff`). Blocks
/// until it comes; an end of the socket, or anything else, is an error.
pub fn await_assignment(socket: &UnixDatagram) -> Result<PathBuf, String> {
    // A path of PATH_MAX bytes and its kind byte fit with one byte to spare,
    // so a datagram that fills the buffer was cut short.
    let mut datagram = vec![0u8; libc::PATH_MAX as usize + 2];
    let len = socket.recv(&mut datagram).map_err(|e| format!("waiting for a tenant: {e}"))?;
    if len == datagram.len() {
        return Err("the tenant's settings path is longer than PATH_MAX".into());
    }
    match datagram[..len].split_first() {
        Some((&ASSIGN_TENANT, path)) if !path.is_empty() => Ok(PathBuf::from(std::ffi::OsStr::from_bytes(path))),
        Some(_) => Err("the first datagram on the handoff socket is not a tenant's settings".into()),
        None => Err("the handoff socket ended before a tenant was assigned".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assignment_of(datagram: &[u8]) -> Result<PathBuf, String> {
        let (daemon, spare) = UnixDatagram::pair().unwrap();
        daemon.send(datagram).unwrap();
        await_assignment(&spare)
    }

    #[test]
    fn a_spare_takes_only_a_tenants_settings_path() {
        let mut assign = vec![ASSIGN_TENANT];
        assign.extend_from_slice(b"state/tenants/acme.toml");
        assert_eq!(assignment_of(&assign).unwrap(), PathBuf::from("state/tenants/acme.toml"));
        // A client's datagram, an empty path and nothing at all are refused.
        assert!(assignment_of(b"\x00\x10\x0c").unwrap_err().contains("not a tenant's settings"));
        assert!(assignment_of(&[ASSIGN_TENANT]).is_err());
        assert!(assignment_of(&[]).unwrap_err().contains("ended before"));
        // A path longer than PATH_MAX is refused, not cut short.
        let mut long = vec![ASSIGN_TENANT];
        long.resize(libc::PATH_MAX as usize + 2, b'a');
        assert!(assignment_of(&long).unwrap_err().contains("PATH_MAX"));
    }
}
