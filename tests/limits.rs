//! Resource limits of `mqvisor run` (`--cpus`, `--memory-limit`,
//! `--pids-limit`) on real VMs: a guest spinning without exits is held to
//! its CPU share, a guest touching all its RAM has its VMM killed by the
//! kernel at the memory limit, a healthy tenant serves within its limits
//! (KVM's worker thread counted in its tasks), a KVM_RUN that keeps failing
//! ends the VM, a clean stop leaves no group behind, and limits that cannot
//! be applied are refused with one line. Limits need root (or a delegated
//! cgroup); as another user only the refusals run.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use common::wire::{self, read_packet};
use common::{RunningVm, assert_fails_with, group_dir, kvm_available, limits_available, run_vm};

const HOSTILE: &str = env!("MQVISOR_HOSTILE_IMAGE");

/// One limited VM at a time: a VMM starting removes the groups of VMMs that
/// are gone, which would race a test reading a killed VMM's group.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The number after `key` in `dir/file` (a `key value` line), if any.
fn counter(dir: &std::path::Path, file: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join(file)).ok()?;
    text.lines().find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
}

/// CPU time (user and system) of process `pid`, seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start at "state".
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ticks as f64 / hz as f64
}

#[test]
fn a_guest_spinning_without_exits_is_held_to_its_cpu_limit() {
    let test = "a_guest_spinning_without_exits_is_held_to_its_cpu_limit";
    if !kvm_available(test) || !limits_available(test) {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let spinner =
        RunningVm::start(&["--image", HOSTILE, "--cmdline", "attack=busy-loop", "--timeout", "5", "--cpus", "0.2"]);
    let pid = spinner.child.id();
    let dir = group_dir(&format!("run-{pid}"), "cpu");
    std::thread::sleep(Duration::from_millis(500));
    let (cpu_before, wall) = (cpu_seconds(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(2));
    let used = (cpu_seconds(pid) - cpu_before) / wall.elapsed().as_secs_f64();
    eprintln!("a guest spinning under --cpus 0.2 used {used:.3} CPUs");
    // A quota is a ceiling: a busy machine can only lower the figure. The
    // slack covers the sampling (10 ms ticks) and one period's overrun.
    assert!(used <= 0.3, "the spinning guest used {used:.3} CPUs under --cpus 0.2");
    let quota = std::fs::read_to_string(dir.join("cpu.max"))
        .or_else(|_| std::fs::read_to_string(dir.join("cpu.cfs_quota_us")))
        .unwrap();
    assert_eq!(quota.split_whitespace().next(), Some("20000"), "{}", dir.display());
    let throttled = counter(&dir, "cpu.stat", "nr_throttled ").unwrap();
    assert!(throttled > 0, "the kernel never throttled the spinning guest");
    let (status, _) = spinner.wait_end();
    assert_eq!(status.code(), Some(124), "the VM runs on, slowed, until its --timeout");
}

#[test]
fn a_guest_touching_more_than_the_memory_limit_has_its_vmm_killed_by_the_kernel() {
    let test = "a_guest_touching_more_than_the_memory_limit_has_its_vmm_killed_by_the_kernel";
    if !kvm_available(test) || !limits_available(test) {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let filler = RunningVm::start(&[
        "--image",
        HOSTILE,
        "--cmdline",
        "attack=fill-memory",
        "--memory",
        "256",
        "--memory-limit",
        "64",
        "--timeout",
        "30",
    ]);
    let dir = group_dir(&format!("run-{}", filler.child.id()), "memory");
    let (status, stderr) = filler.wait_end();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "the VMM outlived its memory limit: {status:?} {stderr}");
    assert!(!stderr.contains("every page touched"), "the guest touched 256 MiB under a 64 MiB limit");
    let kills =
        counter(&dir, "memory.events", "oom_kill ").or_else(|| counter(&dir, "memory.oom_control", "oom_kill "));
    assert_eq!(kills, Some(1), "the group's OOM kills ({})", dir.display());
    let _ = std::fs::remove_dir(&dir);
}

#[test]
fn a_tenant_serves_within_its_limits() {
    let test = "a_tenant_serves_within_its_limits";
    if !kvm_available(test) || !limits_available(test) {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let vm = RunningVm::start(&["--memory-limit", "96", "--pids-limit", "8", "--cpus", "1", "--timeout", "30"]);
    let mut client = TcpStream::connect(vm.addr).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    client.write_all(&wire::connect_packet("limited")).unwrap();
    assert_eq!(read_packet(&mut client).0, 0x20);
    client.write_all(&wire::subscribe("t", 1, 1)).unwrap();
    assert_eq!(read_packet(&mut client).0, 0x90);
    client.write_all(&wire::publish("t", &[7; 4096], 1, 1, false)).unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        seen.push(read_packet(&mut client).0 >> 4);
    }
    seen.sort_unstable();
    assert_eq!(seen, [3, 4], "PUBLISH back and PUBACK");
    let pid = vm.child.id();
    let pids = group_dir(&format!("run-{pid}"), "pids");
    assert_eq!(std::fs::read_to_string(pids.join("pids.max")).unwrap().trim(), "8");
    let tasks: u32 = std::fs::read_to_string(pids.join("pids.current")).unwrap().trim().parse().unwrap();
    let threads = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().count();
    assert_eq!(usize::try_from(tasks).unwrap(), threads, "every thread of the VMM is in its group");
    let memory = group_dir(&format!("run-{pid}"), "memory");
    let limit = std::fs::read_to_string(memory.join("memory.max"))
        .or_else(|_| std::fs::read_to_string(memory.join("memory.limit_in_bytes")))
        .unwrap();
    assert_eq!(limit.trim(), (96u64 << 20).to_string());
    let (status, _) = vm.stop();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
}

/// A directory for this test's state files.
fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("mqvisor-limits-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Connects, and publishes one QoS 1 retained message (a record on the
/// state disk) to its PUBACK.
fn serves(addr: std::net::SocketAddr) {
    let mut client = TcpStream::connect(addr).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    client.write_all(&wire::connect_packet("tasks")).unwrap();
    assert_eq!(read_packet(&mut client).0, 0x20, "CONNACK");
    client.write_all(&wire::publish("t", b"kept", 1, 1, true)).unwrap();
    assert_eq!(read_packet(&mut client).0, 0x40, "PUBACK");
}

#[test]
fn the_task_limit_counts_kvms_worker_thread() {
    let test = "the_task_limit_counts_kvms_worker_thread";
    if !kvm_available(test) || !limits_available(test) {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let state = scratch("tasks").join("tenant.state");
    let state = state.to_str().unwrap();
    // The old minimum with a state disk: main, vcpu0, net and block fit, KVM's
    // worker did not, and the VM spun at a whole CPU without serving. Now
    // refused before anything starts.
    let out = common::mqvisor()
        .args(["run", "--listen", "127.0.0.1:0", "--timeout", "10", "--pids-limit", "4", "--state", state])
        .output()
        .unwrap();
    assert_fails_with(&out, 125, "the task limit must be at least 5");
    // The new minimum serves, with every task of the VMM in its group.
    let vm = RunningVm::start(&["--pids-limit", "5", "--state", state, "--timeout", "30"]);
    serves(vm.addr);
    let pid = vm.child.id();
    let pids = group_dir(&format!("run-{pid}"), "pids");
    let tasks: usize = std::fs::read_to_string(pids.join("pids.current")).unwrap().trim().parse().unwrap();
    let threads = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().count();
    assert_eq!((tasks, threads), (5, 5), "main, vcpu0, net, block and KVM's worker");
    let (status, _) = vm.stop();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
    let _ = std::fs::remove_dir_all(std::path::Path::new(state).parent().unwrap());
}

#[test]
fn a_kvm_run_that_keeps_failing_ends_the_vm_with_one_line() {
    let test = "a_kvm_run_that_keeps_failing_ends_the_vm_with_one_line";
    if !kvm_available(test) || !limits_available(test) {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    // A group with room for the boot demo's two threads but not for KVM's
    // worker (as `mqvisor serve` would hand one over): every KVM_RUN fails
    // with EAGAIN. It was retried without end, at a whole CPU.
    let group = group_dir(&format!("run-{}-eagain", std::process::id()), "pids");
    std::fs::create_dir_all(&group).unwrap();
    std::fs::write(group.join("pids.max"), "2").unwrap();
    let started = Instant::now();
    let out = run_vm(&["--cgroup", group.to_str().unwrap(), "--timeout", "20"]);
    let took = started.elapsed();
    let _ = std::fs::remove_dir(&group);
    assert_fails_with(&out, 125, "KVM_RUN failed with EAGAIN for 1 s on end");
    assert!(took < Duration::from_secs(10), "it took {took:?} to give up");
}

/// The groups of `run-PID` in each hierarchy a VM may use.
fn groups_of(name: &str) -> Vec<std::path::PathBuf> {
    ["cpu", "memory", "pids"].map(|controller| group_dir(name, controller)).to_vec()
}

#[test]
fn a_clean_stop_leaves_no_group_behind() {
    let test = "a_clean_stop_leaves_no_group_behind";
    if !kvm_available(test) || !limits_available(test) {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let state = scratch("clean-stop").join("tenant.state");
    let limits = ["--cpus", "1", "--memory-limit", "96", "--pids-limit", "8"];
    let mut args = vec!["--state", state.to_str().unwrap(), "--timeout", "30"];
    args.extend_from_slice(&limits);
    let vm = RunningVm::start(&args);
    serves(vm.addr);
    let groups = groups_of(&format!("run-{}", vm.child.id()));
    assert!(groups.iter().all(|g| g.exists()), "{groups:?}");
    let (status, _) = vm.stop();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
    let left: Vec<_> = groups.iter().filter(|g| g.exists()).collect();
    assert!(left.is_empty(), "left behind after SIGTERM: {left:?}");
    let _ = std::fs::remove_dir_all(state.parent().unwrap());
}

#[test]
fn groups_of_gone_vmms_are_swept_from_every_hierarchy() {
    let test = "groups_of_gone_vmms_are_swept_from_every_hierarchy";
    if !kvm_available(test) || !limits_available(test) {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    // Left by a VMM that is gone (no process has this id) in all three
    // hierarchies; the next VMM limits tasks only.
    let gone = groups_of(&format!("run-{}", i32::MAX));
    for group in &gone {
        std::fs::create_dir_all(group).unwrap();
    }
    let out = run_vm(&["--pids-limit", "8"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let left: Vec<_> = gone.iter().filter(|g| g.exists()).collect();
    for group in &left {
        let _ = std::fs::remove_dir(group);
    }
    assert!(left.is_empty(), "not swept: {left:?}");
}

#[test]
fn limits_that_cannot_hold_are_refused_with_one_line() {
    for (flag, value, message) in [
        ("--cpus", "0", "cpus must be between 0.01 and 4096"),
        ("--cpus", "5000", "cpus must be between 0.01 and 4096"),
        ("--memory-limit", "8", "the memory limit must be at least 16 MiB"),
        ("--pids-limit", "2", "the task limit must be at least 5"),
        // The VMM's 4 threads fit, KVM's worker thread would not.
        ("--pids-limit", "4", "the task limit must be at least 5: the VMM's 4 threads and KVM's worker thread"),
    ] {
        let out = run_vm(&[flag, value]);
        assert_fails_with(&out, 125, message);
    }
    let out = run_vm(&["--cpus", "half"]);
    assert_eq!(out.status.code(), Some(2), "clap refuses a value that is not a number");
    // serve's group (internal) and limits of one's own do not mix.
    let out = run_vm(&["--cgroup", "/sys/fs/cgroup/x", "--cpus", "1"]);
    assert_eq!(out.status.code(), Some(2), "{}", common::stderr(&out));
    assert!(common::stderr(&out).contains("cannot be used with"), "{}", common::stderr(&out));
}

#[test]
fn limits_without_the_right_to_make_groups_are_refused_with_one_line() {
    let args = ["run", "--service", "demo", "--cpus", "0.5"].map(std::ffi::OsStr::new);
    let out = common::mqvisor_unprivileged(&args);
    assert_fails_with(&out, 125, "limits need root, or a group delegated to this user");
}

/// The same code on a pure cgroup v2 hierarchy, which these machines do not
/// have: `scripts/cgroup-v2-vm.sh` boots a Debian kernel under QEMU (no KVM
/// needed) with this binary in its initramfs and reports each scenario.
#[test]
fn groups_are_made_on_a_pure_cgroup_v2_host_too() {
    let test = "groups_are_made_on_a_pure_cgroup_v2_host_too";
    let probe = "command -v qemu-system-x86_64 && command -v cpio && ! ldd \"$(command -v busybox)\"";
    if !common::tool_available(test, "qemu-system-x86, busybox-static and cpio", probe) {
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/cgroup-v2-vm.sh");
    let out = std::process::Command::new(script).arg(env!("CARGO_BIN_EXE_mqvisor")).output().unwrap();
    let text = common::stdout(&out);
    assert!(out.status.success() && text.contains("== end"), "{text}{}", common::stderr(&out));
    // Started in the root group: its group holds every limit.
    assert!(text.contains("cpu.max=50000 100000 memory.max=67108864 memory.swap.max=0 pids.max=8"), "{text}");
    assert!(text.contains("groups: 1"), "the second start removes the first's empty group: {text}");
    // Alone in a delegated group: it moved into a leaf, and its group below got the quota.
    assert!(text.contains("svc/mqvisor/run-") && text.contains("cpu.max=25000 100000"), "{text}");
    assert!(text.contains("svc: processes 0, shares cpu"), "{text}");
    // With another process in its group: one line, exit 125.
    assert!(text.contains("/sys/fs/cgroup/busy holds other processes") && text.contains("exit 125"), "{text}");
    // `serve` alone in a delegated group with two limited tenants: one leaf
    // for the daemon, both groups beside it, both gone at exit.
    assert!(text.contains("-a: cpu.max=50000 100000 pids.max=max"), "{text}");
    assert!(text.contains("-b: cpu.max=50000 100000 pids.max=8"), "{text}");
    assert!(text.contains("daemon in /svc2/mqvisor/serve-"), "{text}");
    assert!(text.contains("tenant groups after exit: 0"), "{text}");
}
