//! Giving up privileges once the VMM holds what needed them: started as
//! root with `--user NAME`, it opens `/dev/kvm` and binds its listener, then
//! becomes that user and its group, with no supplementary groups, no
//! capabilities (effective, permitted, inheritable, ambient or bounding) and
//! `no_new_privs`.
//!
//! Owns the order of those steps and the check that they held. Must run
//! while the process has one thread: the calls change the calling thread.

use std::ffi::CString;

/// Whom to become.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub name: String,
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
}

/// Why privileges could not be given up.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("--user {0}: no such user")]
    NoSuchUser(String),
    #[error("--user needs the VMM to start as root (it starts as uid {0})")]
    NotRoot(libc::uid_t),
    #[error("dropping privileges ({step}): {source}")]
    Step { step: &'static str, source: std::io::Error },
    #[error("privileges remain after dropping them: {0}")]
    Remain(String),
    #[error("the parent process ended while privileges were being dropped")]
    ParentGone,
}

impl RunAs {
    /// The user `name` from the system's user database, when this process
    /// can become it (it runs as root).
    pub fn lookup(name: &str) -> Result<RunAs, PrivilegeError> {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        if euid != 0 {
            return Err(PrivilegeError::NotRoot(euid));
        }
        let c_name = CString::new(name).map_err(|_| PrivilegeError::NoSuchUser(name.into()))?;
        // SAFETY: a zeroed passwd is a valid out-parameter; getpwnam_r fills it
        // with pointers into `buf`, which outlives every use of them here.
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the sizes given.
        let rc = unsafe { libc::getpwnam_r(c_name.as_ptr(), &mut entry, buf.as_mut_ptr(), buf.len(), &mut found) };
        if rc != 0 || found.is_null() {
            return Err(PrivilegeError::NoSuchUser(name.into()));
        }
        Ok(RunAs { name: name.into(), uid: entry.pw_uid, gid: entry.pw_gid })
    }
}

fn step(step: &'static str, rc: libc::c_int) -> Result<(), PrivilegeError> {
    if rc == 0 { Ok(()) } else { Err(PrivilegeError::Step { step, source: std::io::Error::last_os_error() }) }
}

/// Becomes `run_as` for good.
pub fn drop_to(run_as: &RunAs) -> Result<(), PrivilegeError> {
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    if uid != 0 {
        return Err(PrivilegeError::NotRoot(uid));
    }
    // The kernel clears the parent-death signal when the credentials
    // change: a tenant of `mqvisor serve` would then outlive its daemon.
    let mut death_signal: libc::c_int = 0;
    // SAFETY: PR_GET_PDEATHSIG writes one c_int through the live pointer;
    // getppid has no preconditions.
    let (got, parent) = unsafe { (libc::prctl(libc::PR_GET_PDEATHSIG, &raw mut death_signal), libc::getppid()) };
    step("reading the parent-death signal", got)?;
    // SAFETY: each call below takes plain integers (or a null list of
    // groups with a zero count) and changes only this process's credentials.
    unsafe {
        // The bounding set first: dropping it needs CAP_SETPCAP, held as root.
        // Numbers past the kernel's last capability are refused: that ends it.
        for cap in 0..64 {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                break;
            }
        }
        step(
            "clearing ambient capabilities",
            libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0),
        )?;
        step("setgroups", libc::setgroups(0, std::ptr::null()))?;
        step("setresgid", libc::setresgid(run_as.gid, run_as.gid, run_as.gid))?;
        // Leaving uid 0 clears the permitted and effective capabilities.
        step("setresuid", libc::setresuid(run_as.uid, run_as.uid, run_as.uid))?;
        step("no_new_privs", libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
        if death_signal != 0 {
            step("setting the parent-death signal again", libc::prctl(libc::PR_SET_PDEATHSIG, death_signal))?;
            // A parent that died while the signal was cleared sent nothing.
            if libc::getppid() != parent {
                return Err(PrivilegeError::ParentGone);
            }
        }
    }
    check(run_as)
}

/// Reads back what the kernel says this process holds.
fn check(run_as: &RunAs) -> Result<(), PrivilegeError> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|source| PrivilegeError::Step { step: "reading /proc/self/status", source })?;
    let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).unwrap_or("");
    let ids = |name: &str| field(name).split_whitespace().map(str::to_string).collect::<Vec<_>>();
    let (uid, gid) = (run_as.uid.to_string(), run_as.gid.to_string());
    if ids("Uid:").iter().any(|u| *u != uid) || ids("Gid:").iter().any(|g| *g != gid) {
        return Err(PrivilegeError::Remain(format!("Uid: {:?}, Gid: {:?}", ids("Uid:"), ids("Gid:"))));
    }
    for caps in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
        if !field(caps).trim_start_matches('0').is_empty() {
            return Err(PrivilegeError::Remain(format!("{caps} {}", field(caps))));
        }
    }
    if !field("Groups:").is_empty() {
        return Err(PrivilegeError::Remain(format!("Groups: {}", field("Groups:"))));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_looked_up_and_strangers_named() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            assert!(matches!(RunAs::lookup("root"), Err(PrivilegeError::NotRoot(_))));
            return;
        }
        let root = RunAs::lookup("root").unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        let err = RunAs::lookup("no-such-user-here").unwrap_err();
        assert_eq!(err.to_string(), "--user no-such-user-here: no such user");
    }
}
