//! Per-VM resource limits through the kernel's control groups: CPU time (a
//! CFS quota), memory (guest RAM as the guest touches it, plus the VMM's
//! own) and tasks.
//!
//! Owns finding where groups can be made (each controller a limit needs
//! from cgroup v2 when it offers it, else from its v1 hierarchy), making
//! one group per VM under `mqvisor/` below the caller's own group (so
//! limits set above still apply), writing its limits, moving a
//! process in, reading what the kernel counted, and removing groups whose
//! VMM is gone. Must be joined before the VMM maps guest memory or starts a
//! thread: memory is charged to the group it is touched in, and a thread
//! starts in its creator's group. Never kills anything itself: the kernel
//! enforces the limits.
//!
//! A handful of files are written, so this is done by hand rather than
//! through a general cgroup crate.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The CFS period a CPU quota is expressed in.
const CPU_PERIOD: Duration = Duration::from_millis(100);
/// Smallest CPU share accepted: the kernel's smallest quota is 1 ms.
pub const MIN_CPUS: f64 = 0.01;
/// Largest CPU share accepted (keeps the quota's arithmetic exact).
pub const MAX_CPUS: f64 = 4096.0;
/// Smallest memory limit accepted, MiB: below it the VMM cannot start.
pub const MIN_MEMORY_MIB: u64 = 16;
/// Smallest task limit accepted: the VMM's own threads (main, vCPU, net,
/// block) and the worker KVM starts in the VMM's group at the first
/// KVM_RUN (`kvm-nx-lpage-recovery`, a thread of the process) must fit.
/// With one task fewer, KVM_RUN fails with EAGAIN for good.
pub const MIN_PIDS: u32 = 5;
/// Controllers a VM's group may use: every hierarchy that mounts one of
/// them may hold groups of earlier VMMs.
const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];
/// How long a VMM leaving its group waits for the kernel to let go of it
/// (KVM's worker thread ends as the VM's descriptor closes).
const REMOVE_FOR: Duration = Duration::from_secs(1);
/// The directory, below the caller's group, that holds the VMs' groups.
const BASE: &str = "mqvisor";

/// What one VM may use; `None` is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    /// CPU time as a number of CPUs (0.5: half of one CPU's time).
    pub cpus: Option<f64>,
    /// Memory of the whole VMM process, MiB.
    pub memory_mib: Option<u64>,
    /// Tasks (processes and threads).
    pub pids: Option<u32>,
}

/// Why a group could not be made or joined.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cpus must be between {MIN_CPUS} and {MAX_CPUS} (got {0})")]
    Cpus(f64),
    #[error("the memory limit must be at least {MIN_MEMORY_MIB} MiB (got {0})")]
    Memory(u64),
    #[error("the task limit must be at least {MIN_PIDS}: the VMM's 4 threads and KVM's worker thread (got {0})")]
    Pids(u32),
    #[error(
        "this host has no cgroup controller `{0}`: cgroup v2 does not offer it and no v1 hierarchy mounts it \
         (see docs/security.md, \"Resource limits\")"
    )]
    NoController(&'static str),
    #[error(
        "cgroup v2: {0} holds other processes, so it cannot share `{1}` out to groups below it; start mqvisor \
         as the only process of a delegated group (systemd: Delegate=yes)"
    )]
    Busy(PathBuf, &'static str),
    #[error("{}: {source}{}", path.display(), if source.kind() == ErrorKind::PermissionDenied {
        " (limits need root, or a group delegated to this user)"
    } else {
        ""
    })]
    Io { path: PathBuf, source: std::io::Error },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io { path: path.to_path_buf(), source }
}

impl Limits {
    pub fn is_empty(&self) -> bool {
        self.cpus.is_none() && self.memory_mib.is_none() && self.pids.is_none()
    }

    /// Refuses limits the kernel would refuse or the VMM cannot live within.
    pub fn validate(&self) -> Result<(), CgroupError> {
        match *self {
            Limits { cpus: Some(c), .. } if !(MIN_CPUS..=MAX_CPUS).contains(&c) => Err(CgroupError::Cpus(c)),
            Limits { memory_mib: Some(m), .. } if m < MIN_MEMORY_MIB => Err(CgroupError::Memory(m)),
            Limits { pids: Some(p), .. } if p < MIN_PIDS => Err(CgroupError::Pids(p)),
            _ => Ok(()),
        }
    }

    /// The controllers these limits need, by name.
    fn controllers(&self) -> Vec<&'static str> {
        let mut names = Vec::new();
        if self.cpus.is_some() {
            names.push("cpu");
        }
        if self.memory_mib.is_some() {
            names.push("memory");
        }
        if self.pids.is_some() {
            names.push("pids");
        }
        names
    }
}

/// One VM's group: a directory in each hierarchy its limits use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub dirs: Vec<PathBuf>,
}

/// What the kernel counted for a group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Periods in which the CPU quota ran out.
    pub throttled_periods: u64,
    /// Times the kernel's OOM killer acted in the group (its memory limit).
    pub oom_kills: u64,
}

/// A mounted cgroup hierarchy and this process's group in it.
struct Hierarchy {
    /// The directory of this process's own group.
    own: PathBuf,
    unified: bool,
    /// Controllers it offers (v1: those it mounts; v2: those the own group can share out).
    controllers: Vec<String>,
}

/// This process's cgroup hierarchies, from `/proc/self/mountinfo` and
/// `/proc/self/cgroup`, as they were the first time: a daemon that stepped
/// into a leaf (see [`bases`]) keeps making its groups where the first went.
fn hierarchies() -> Result<&'static [Hierarchy], CgroupError> {
    static FOUND: std::sync::OnceLock<Vec<Hierarchy>> = std::sync::OnceLock::new();
    if let Some(found) = FOUND.get() {
        return Ok(found);
    }
    let mountinfo = Path::new("/proc/self/mountinfo");
    let mounts = std::fs::read_to_string(mountinfo).map_err(io(mountinfo))?;
    let membership = Path::new("/proc/self/cgroup");
    let groups = std::fs::read_to_string(membership).map_err(io(membership))?;
    Ok(FOUND.get_or_init(|| parse_hierarchies(&mounts, &groups)))
}

/// The cgroup hierarchies `mounts` (mountinfo) shows, each with the group
/// `groups` (a `/proc/PID/cgroup`) puts the process in.
fn parse_hierarchies(mounts: &str, groups: &str) -> Vec<Hierarchy> {
    let mut found = Vec::new();
    for line in mounts.lines() {
        // "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS"
        let Some((left, right)) = line.split_once(" - ") else { continue };
        let left: Vec<&str> = left.split(' ').collect();
        let right: Vec<&str> = right.split(' ').collect();
        let (Some(&root), Some(&mount_point), Some(&fstype)) = (left.get(3), left.get(4), right.first()) else {
            continue;
        };
        let unified = match fstype {
            "cgroup2" => true,
            "cgroup" => false,
            _ => continue,
        };
        let mounted: Vec<String> = if unified {
            Vec::new()
        } else {
            right.get(2).map_or_else(Vec::new, |o| o.split(',').map(str::to_string).collect())
        };
        // "ID:CONTROLLERS:PATH": v2 is ID 0 with no controllers; v1 lists the mounted ones.
        let own_path = groups.lines().find_map(|g| {
            let mut parts = g.splitn(3, ':');
            let (_, listed, path) = (parts.next()?, parts.next()?, parts.next()?);
            let matches = if unified {
                listed.is_empty()
            } else {
                !listed.is_empty() && listed.split(',').all(|c| mounted.iter().any(|m| m == c))
            };
            matches.then(|| path.to_string())
        });
        let Some(own_path) = own_path else { continue };
        // A mount may show a subtree (ROOT); the group's path is below it.
        let relative = own_path.strip_prefix(root).unwrap_or(&own_path).trim_start_matches('/');
        let own = Path::new(&unescape(mount_point)).join(relative);
        let controllers = if unified {
            std::fs::read_to_string(own.join("cgroup.controllers"))
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_string)
                .collect()
        } else {
            mounted
        };
        found.push(Hierarchy { own, unified, controllers });
    }
    found
}

/// Mount points in mountinfo escape spaces and the like as `\NNN` (octal).
fn unescape(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok());
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn write(path: &Path, text: &str) -> Result<(), CgroupError> {
    std::fs::write(path, text).map_err(io(path))
}

fn mkdir(path: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(path) {
        Err(e) if e.kind() != ErrorKind::AlreadyExists => Err(io(path)(e)),
        _ => Ok(()),
    }
}

/// Lets the groups below `dir` use `controllers` (cgroup v2 only).
fn share_out(dir: &Path, controllers: &[&'static str]) -> Result<(), CgroupError> {
    let file = dir.join("cgroup.subtree_control");
    for name in controllers {
        match std::fs::write(&file, format!("+{name}")) {
            // EBUSY: a non-root group with processes cannot share out.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                return Err(CgroupError::Busy(dir.to_path_buf(), name));
            }
            other => other.map_err(io(&file))?,
        }
    }
    Ok(())
}

/// The directories groups are made in, one per hierarchy used, ready for
/// `controllers`: each controller from cgroup v2 when it offers it, else
/// from its v1 hierarchy (hybrid hosts have both). `leaf` names the group
/// this process moves into when its own v2 group must be emptied first.
fn bases(found: &[Hierarchy], controllers: &[&'static str], leaf: &str) -> Result<Vec<PathBuf>, CgroupError> {
    let offers = |h: &Hierarchy, name: &str| h.controllers.iter().any(|c| c == name);
    let v2 = found.iter().find(|h| h.unified);
    let (unified, legacy): (Vec<&'static str>, Vec<&'static str>) =
        controllers.iter().partition(|name| v2.is_some_and(|h| offers(h, name)));
    let mut bases: Vec<PathBuf> = Vec::new();
    if let (Some(v2), false) = (v2, unified.is_empty()) {
        let base = v2.own.join(BASE);
        mkdir(&base)?;
        // A group other than the root that holds processes cannot share
        // controllers out (the kernel refuses domain controllers with
        // EBUSY, and makes the children of one that shares threaded
        // controllers invalid): alone in a delegated group, this process
        // steps into a leaf below first; with company, it cannot.
        let is_root = !v2.own.join("cgroup.type").exists();
        let procs = std::fs::read_to_string(v2.own.join("cgroup.procs")).unwrap_or_default();
        if !is_root && !procs.trim().is_empty() {
            if procs.split_whitespace().ne([std::process::id().to_string().as_str()]) {
                return Err(CgroupError::Busy(v2.own.clone(), unified[0]));
            }
            let own_leaf = base.join(leaf);
            mkdir(&own_leaf)?;
            write(&own_leaf.join("cgroup.procs"), &std::process::id().to_string())?;
        }
        share_out(&v2.own, &unified)?;
        share_out(&base, &unified)?;
        bases.push(base);
    }
    for name in legacy {
        let v1 = found.iter().find(|h| !h.unified && offers(h, name)).ok_or(CgroupError::NoController(name))?;
        let base = v1.own.join(BASE);
        if !bases.contains(&base) {
            mkdir(&base)?;
            bases.push(base);
        }
    }
    Ok(bases)
}

/// Sweeps `mqvisor/` in every hierarchy a VMM may have made groups in,
/// not only in those the caller's limits use: a VMM held in CPU alone
/// leaves its group in the `cpu` hierarchy, and the next may limit tasks
/// only.
fn sweep_all(found: &[Hierarchy]) {
    for hierarchy in found {
        if hierarchy.unified || hierarchy.controllers.iter().any(|c| CONTROLLERS.contains(&c.as_str())) {
            sweep(&hierarchy.own.join(BASE));
        }
    }
}

/// Removes the groups of VMMs that are gone (`run-PID`, `serve-PID-...`):
/// a VMM cannot remove its own group once it has given up root, nor one
/// killed by the kernel. Only empty groups can be removed, so a live one
/// is never touched.
fn sweep(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.split('-').nth(1)).and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        // SAFETY: kill with signal 0 only checks that the process exists.
        if unsafe { libc::kill(pid, 0) } != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
            let _ = std::fs::remove_dir(entry.path());
        }
    }
}

impl Group {
    /// Makes (or reuses) the group `name` with `limits` written. `name`
    /// starts `run-PID` or `serve-PID`, the process that owns it, so groups
    /// left by a process that is gone are removed by the next one to make
    /// groups.
    pub fn create(name: &str, limits: &Limits) -> Result<Group, CgroupError> {
        limits.validate()?;
        Group::create_in(hierarchies()?, name, limits)
    }

    fn create_in(found: &[Hierarchy], name: &str, limits: &Limits) -> Result<Group, CgroupError> {
        let mut dirs = Vec::new();
        // The owner's own group (`run-PID`, `serve-PID`), should it have to
        // leave its v2 group: a daemon never sits in a tenant's group.
        let owner = name.splitn(3, '-').take(2).collect::<Vec<_>>().join("-");
        // Swept once per process: a daemon making thousands of groups would
        // otherwise read each directory thousands of times.
        static SWEPT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if !SWEPT.swap(true, std::sync::atomic::Ordering::Relaxed) {
            sweep_all(found);
        }
        for base in bases(found, &limits.controllers(), &owner)? {
            let dir = base.join(name);
            mkdir(&dir)?;
            dirs.push(dir);
        }
        let group = Group { dirs };
        group.write_limits(limits)?;
        Ok(group)
    }

    fn write_limits(&self, limits: &Limits) -> Result<(), CgroupError> {
        for dir in &self.dirs {
            let has = |file: &str| dir.join(file).exists();
            if let Some(cpus) = limits.cpus {
                // Rounded to whole microseconds; at least the kernel's 1 ms.
                let quota = CPU_PERIOD.mul_f64(cpus).as_micros().max(1000);
                let period = CPU_PERIOD.as_micros();
                if has("cpu.max") {
                    write(&dir.join("cpu.max"), &format!("{quota} {period}"))?;
                } else if has("cpu.cfs_quota_us") {
                    write(&dir.join("cpu.cfs_period_us"), &period.to_string())?;
                    write(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
                }
            }
            if let Some(mib) = limits.memory_mib {
                let bytes = (mib << 20).to_string();
                if has("memory.max") {
                    write(&dir.join("memory.max"), &bytes)?;
                    // Guest RAM must not be pushed out to swap instead of the limit holding.
                    if has("memory.swap.max") {
                        write(&dir.join("memory.swap.max"), "0")?;
                    }
                } else if has("memory.limit_in_bytes") {
                    // With swap accounting, memory+swap is held to the same
                    // figure; it may never be below the memory limit, so it
                    // is written on both sides of it (raising or lowering).
                    let memsw = dir.join("memory.memsw.limit_in_bytes");
                    let swap_too = memsw.exists();
                    if swap_too {
                        let _ = std::fs::write(&memsw, &bytes);
                    }
                    write(&dir.join("memory.limit_in_bytes"), &bytes)?;
                    if swap_too {
                        write(&memsw, &bytes)?;
                    }
                }
            }
            if let Some(pids) = limits.pids
                && has("pids.max")
            {
                write(&dir.join("pids.max"), &pids.to_string())?;
            }
        }
        Ok(())
    }

    /// Moves the calling process (all its threads) into the group.
    pub fn join(&self) -> Result<(), CgroupError> {
        for dir in &self.dirs {
            write(&dir.join("cgroup.procs"), &std::process::id().to_string())?;
        }
        Ok(())
    }

    /// What the kernel counted so far (zeros for what it does not count).
    pub fn usage(&self) -> Usage {
        let mut usage = Usage::default();
        let field = |text: &str, key: &str| {
            text.lines().find_map(|l| l.strip_prefix(key)?.trim().parse::<u64>().ok()).unwrap_or(0)
        };
        for dir in &self.dirs {
            if let Ok(text) = std::fs::read_to_string(dir.join("cpu.stat")) {
                usage.throttled_periods += field(&text, "nr_throttled ");
            }
            // v2 counts in memory.events, v1 (4.13 and later) in memory.oom_control.
            for file in ["memory.events", "memory.oom_control"] {
                if let Ok(text) = std::fs::read_to_string(dir.join(file)) {
                    usage.oom_kills += field(&text, "oom_kill ");
                }
            }
        }
        usage
    }

    /// Removes the group; false while a process is still in it.
    pub fn remove(&self) -> bool {
        self.dirs.iter().all(|dir| match std::fs::remove_dir(dir) {
            Err(e) => e.kind() == ErrorKind::NotFound,
            Ok(()) => true,
        })
    }

    /// Prepares the calling process's way out of the group at its end
    /// ([`Departure::leave`]): opens, for each of the group's directories,
    /// `cgroup.procs` of the group the process started in (the one
    /// `mqvisor/` sits in). Call while files may still be opened, before the
    /// VMM's threads are filtered.
    pub fn departure(&self) -> Departure {
        let procs = self
            .dirs
            .iter()
            .filter_map(|dir| {
                let started_in = dir.parent()?.parent()?;
                std::fs::OpenOptions::new().write(true).open(started_in.join("cgroup.procs")).ok()
            })
            .collect();
        Departure { procs, dirs: self.dirs.clone() }
    }
}

/// What a VMM needs to remove its own group once its VM is gone: the
/// group's directories, and the group it started in, opened beforehand.
#[derive(Debug)]
pub struct Departure {
    procs: Vec<std::fs::File>,
    dirs: Vec<PathBuf>,
}

impl Departure {
    /// Moves the calling process back into the group it started in and
    /// removes its own group, retrying for up to [`REMOVE_FOR`] while the
    /// kernel still counts a task there (KVM's worker thread ends as the
    /// VM's descriptor closes). Call once the VM is gone. True when the
    /// group is gone; false when it stays for the next VMM's sweep: a VMM
    /// that gave up root may not remove it, and a delegated cgroup v2 group
    /// that shares controllers out cannot take the process back.
    pub fn leave(self) -> bool {
        let pid = std::process::id().to_string();
        let mut moved = self.procs.len() == self.dirs.len();
        for mut procs in &self.procs {
            moved &= std::io::Write::write_all(&mut procs, pid.as_bytes()).is_ok();
        }
        // Still in the group: one try, no wait.
        let deadline = std::time::Instant::now() + if moved { REMOVE_FOR } else { Duration::ZERO };
        let mut left = self.dirs;
        loop {
            let mut refused = false;
            left.retain(|dir| match std::fs::remove_dir(dir) {
                Ok(()) => false,
                Err(e) if e.kind() == ErrorKind::NotFound => false,
                Err(e) => {
                    // EBUSY: a task is still in it; anything else will not pass.
                    refused |= e.raw_os_error() != Some(libc::EBUSY);
                    true
                }
            });
            if left.is_empty() {
                return true;
            }
            if refused || std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_below_what_the_vmm_needs_are_refused() {
        let bad = [
            Limits { cpus: Some(0.0), ..Limits::default() },
            Limits { cpus: Some(f64::NAN), ..Limits::default() },
            Limits { memory_mib: Some(1), ..Limits::default() },
            Limits { pids: Some(2), ..Limits::default() },
            // The VMM's 4 threads and KVM's worker.
            Limits { pids: Some(4), ..Limits::default() },
        ];
        for limits in bad {
            assert!(limits.validate().is_err(), "{limits:?}");
        }
        let good = Limits { cpus: Some(0.25), memory_mib: Some(96), pids: Some(8) };
        good.validate().unwrap();
        assert_eq!(good.controllers(), ["cpu", "memory", "pids"]);
        assert!(Limits::default().is_empty());
    }

    /// A made-up host: cgroup hierarchies mounted (as plain directories)
    /// under a temporary directory, as `mountinfo` lines.
    fn host(name: &str, v2_offers: &str, v1: &[&str]) -> (PathBuf, String, String) {
        let root = std::env::temp_dir().join(format!("mqvisor-cgroup-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("unified/app")).unwrap();
        std::fs::write(root.join("unified/app/cgroup.controllers"), v2_offers).unwrap();
        let mut mounts = format!("41 31 0:38 / {}/unified rw,relatime - cgroup2 cgroup2 rw\n", root.display());
        let mut groups = String::from("0::/app\n");
        for (i, controllers) in v1.iter().enumerate() {
            std::fs::create_dir_all(root.join(controllers).join("app")).unwrap();
            mounts.push_str(&format!(
                "{} 31 0:{} / {}/{controllers} rw,relatime shared:9 - cgroup cgroup rw,{controllers}\n",
                50 + i,
                50 + i,
                root.display()
            ));
            groups.push_str(&format!("{}:{controllers}:/app\n", i + 1));
        }
        (root, mounts, groups)
    }

    #[test]
    fn each_controller_comes_from_v2_when_it_offers_it_else_from_v1() {
        let limits = Limits { cpus: Some(0.5), memory_mib: Some(64), pids: Some(8) };
        // Hybrid: v2 offers cpu and pids; memory is a v1 hierarchy.
        let (root, mounts, groups) = host("hybrid", "cpu pids", &["memory", "cpu,cpuacct"]);
        let group = Group::create_in(&parse_hierarchies(&mounts, &groups), "run-1", &limits).unwrap();
        assert_eq!(group.dirs, [root.join("unified/app/mqvisor/run-1"), root.join("memory/app/mqvisor/run-1")]);
        let shared = std::fs::read_to_string(root.join("unified/app/mqvisor/cgroup.subtree_control")).unwrap();
        assert_eq!(shared, "+pids", "the last controller written to a (here plain) subtree_control file");
        // v1 only, with cpu mounted together with cpuacct.
        let (root, mounts, groups) = host("v1", "", &["cpu,cpuacct", "memory", "pids"]);
        let group = Group::create_in(&parse_hierarchies(&mounts, &groups), "run-2", &limits).unwrap();
        let names = ["cpu,cpuacct", "memory", "pids"];
        assert_eq!(group.dirs, names.map(|n| root.join(n).join("app/mqvisor/run-2")));
        // A controller no hierarchy has.
        let (_, mounts, groups) = host("none", "memory", &[]);
        let err = Group::create_in(&parse_hierarchies(&mounts, &groups), "run-3", &limits).unwrap_err();
        assert!(matches!(err, CgroupError::NoController("cpu")), "{err}");
        for name in ["hybrid", "v1", "none"] {
            let _ = std::fs::remove_dir_all(
                std::env::temp_dir().join(format!("mqvisor-cgroup-{}-{name}", std::process::id())),
            );
        }
    }

    #[test]
    fn every_hierarchy_is_swept_and_a_departing_vmm_removes_its_group() {
        let (root, mounts, groups) = host("sweep", "", &["cpu,cpuacct", "memory", "pids"]);
        let found = parse_hierarchies(&mounts, &groups);
        // A process id above the kernel's largest is never alive.
        let gone = root.join("cpu,cpuacct/app/mqvisor/run-2147483647");
        let alive = root.join("memory/app/mqvisor").join(format!("run-{}", std::process::id()));
        for dir in [&gone, &alive] {
            std::fs::create_dir_all(dir).unwrap();
        }
        sweep_all(&found);
        assert!(!gone.exists(), "a gone VMM's group in a hierarchy this one does not use");
        assert!(alive.exists(), "a live VMM's group is never touched");

        let started_in = ["memory", "pids"].map(|c| root.join(c).join("app"));
        let dirs = started_in.clone().map(|dir| dir.join("mqvisor/run-1"));
        for (dir, own) in dirs.iter().zip(&started_in) {
            std::fs::create_dir_all(dir).unwrap();
            std::fs::write(own.join("cgroup.procs"), "").unwrap();
        }
        let departure = Group { dirs: dirs.to_vec() }.departure();
        assert!(departure.leave());
        for (dir, own) in dirs.iter().zip(&started_in) {
            assert!(!dir.exists());
            let procs = std::fs::read_to_string(own.join("cgroup.procs")).unwrap();
            assert_eq!(procs, std::process::id().to_string(), "the process went back where it started");
        }
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn mount_points_are_unescaped() {
        assert_eq!(unescape(r"/sys/fs/cgroup/a\040b"), "/sys/fs/cgroup/a b");
        assert_eq!(unescape(r"/plain\"), r"/plain\");
    }
}
