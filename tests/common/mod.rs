//! Shared helpers for the end-to-end tests: running the real `mqvisor` binary
//! and deciding what to do when this machine has no KVM.
#![allow(dead_code)] // each test file uses its own subset

pub mod daemon;
pub mod pki;
pub mod wire;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `mqvisor` binary cargo built for these tests.
pub fn mqvisor() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mqvisor"))
}

/// True when VM tests can run. Without `/dev/kvm` they cannot: that is said
/// loudly, and under `CI=true` it is a failure, never a silent pass.
pub fn kvm_available(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(!ci, "{test}: /dev/kvm is missing and CI=true: VM tests cannot run on this machine");
    eprintln!("\n*** {test}: SKIPPED: /dev/kvm is missing, this VM test did not run ***\n");
    false
}

/// Runs `mqvisor run` with `args` and returns its output. Without a
/// `--service`, the boot demo runs (it exits by itself).
pub fn run_vm(args: &[&str]) -> Output {
    let mut command = mqvisor();
    command.arg("run");
    if !args.contains(&"--service") {
        command.args(["--service", "demo"]);
    }
    command.args(args).output().expect("spawning mqvisor")
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts the exit code and that stderr is exactly one line containing `needle`.
pub fn assert_fails_with(out: &Output, code: i32, needle: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    assert!(err.contains(needle), "expected {needle:?} in stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "error should be one line: {err}");
}

/// A `mqvisor run` in the background, stopped (SIGTERM) when dropped.
pub struct RunningVm {
    pub child: std::process::Child,
    pub addr: std::net::SocketAddr,
    /// stderr lines after the "listening" line, read on demand.
    stderr: std::io::Lines<std::io::BufReader<std::process::ChildStderr>>,
}

impl RunningVm {
    /// Starts `mqvisor run --listen 127.0.0.1:0 <args>` and waits until it
    /// reports the address it listens on.
    pub fn start(args: &[&str]) -> RunningVm {
        let mut full = vec!["run", "--listen", "127.0.0.1:0"];
        full.extend_from_slice(args);
        RunningVm::start_command(&full, "mqvisor: tenant VM listening on ")
    }

    /// Starts `mqvisor broker --listen 127.0.0.1:0` (the host-native runner).
    pub fn start_host_broker() -> RunningVm {
        RunningVm::start_command(&["broker", "--listen", "127.0.0.1:0"], "mqvisor: broker listening on ")
    }

    fn start_command(args: &[&str], marker: &str) -> RunningVm {
        let child = mqvisor()
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawning mqvisor");
        RunningVm::from_child(child, marker)
    }

    /// Takes a spawned `mqvisor` (stderr piped) and waits for `marker`
    /// followed by the address it listens on.
    pub fn from_child(mut child: std::process::Child, marker: &str) -> RunningVm {
        use std::io::BufRead;
        let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = loop {
            let line = stderr.next().expect("mqvisor ended before listening").unwrap();
            if let Some(addr) = line.strip_prefix(marker) {
                break addr.parse().expect("a socket address");
            }
        };
        RunningVm { child, addr, stderr }
    }

    /// Sends SIGTERM and returns the exit status and the rest of stderr.
    pub fn stop(mut self) -> (std::process::ExitStatus, String) {
        self.terminate();
        let status = self.child.wait().unwrap();
        let rest: Vec<String> = self.stderr.by_ref().map_while(Result::ok).collect();
        (status, rest.join("\n"))
    }

    /// Waits for the VM to end by itself (its `--timeout`, a crash) and
    /// returns the exit status and the rest of stderr.
    pub fn wait_end(mut self) -> (std::process::ExitStatus, String) {
        let status = self.child.wait().unwrap();
        let rest: Vec<String> = self.stderr.by_ref().map_while(Result::ok).collect();
        (status, rest.join("\n"))
    }

    fn terminate(&mut self) {
        // SAFETY: kill(2) with our own child's pid and a valid signal.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
    }

    /// Anonymous memory of the mqvisor process (guest RAM it touched, its
    /// heap and stacks), in KiB. Unlike PSS or private memory it does not
    /// move when other processes map the same binary and exit, so tests
    /// running side by side cannot disturb it.
    pub fn anonymous_kib(&self) -> u64 {
        let rollup = std::fs::read_to_string(format!("/proc/{}/smaps_rollup", self.child.id())).unwrap();
        let line = rollup.lines().find(|l| l.starts_with("Anonymous:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// Resident set of the mqvisor process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
            let _ = self.child.wait();
        }
    }
}

/// True when `probe` (a shell command) succeeds, i.e. the external tool
/// `what` is installed. A missing tool is said loudly, and under `CI=true`
/// it is a failure (CI installs it).
pub fn tool_available(test: &str, what: &str, probe: &str) -> bool {
    let ok = Command::new("sh").args(["-c", probe]).output().is_ok_and(|o| o.status.success());
    if ok {
        return true;
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(!ci, "{test}: {what} is not installed and CI=true (.ci/run installs it)");
    eprintln!("\n*** {test}: SKIPPED: {what} is not installed ***\n");
    false
}

/// True when this process may make control groups (it is root). Without,
/// the limit tests say so loudly and fail under `CI=true`, which runs as root.
pub fn limits_available(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(!ci, "{test}: resource limits need root and CI=true");
    eprintln!("\n*** {test}: SKIPPED: resource limits need root ***\n");
    false
}

/// The directory of the VM group `name` (`run-PID`, `serve-PID-TENANT`) for
/// `controller`: below this test's own group (mqvisor starts in it), in the
/// v1 hierarchy that mounts the controller or else in cgroup v2.
pub fn group_dir(name: &str, controller: &str) -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let own_path = |listed: &dyn Fn(&str) -> bool| {
        own.lines().find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, names, path) = (parts.next()?, parts.next()?, parts.next()?);
            listed(names).then(|| path.trim_start_matches('/').to_string())
        })
    };
    let mut v2 = None;
    for line in mounts.lines() {
        let (left, right) = line.split_once(" - ").unwrap();
        let mount_point = left.split(' ').nth(4).unwrap();
        let mut right = right.split(' ');
        match (right.next(), right.nth(1)) {
            (Some("cgroup"), Some(options)) if options.split(',').any(|o| o == controller) => {
                let path = own_path(&|names| names.split(',').any(|n| n == controller)).unwrap();
                return PathBuf::from(mount_point).join(path).join("mqvisor").join(name);
            }
            (Some("cgroup2"), _) => v2 = Some(mount_point.to_string()),
            _ => {}
        }
    }
    let path = own_path(&|names| names.is_empty()).unwrap();
    PathBuf::from(v2.expect("no cgroup hierarchy")).join(path).join("mqvisor").join(name)
}

/// `mqvisor ARGS` as an ordinary user: as is when this process is not
/// root, else as `nobody` (setpriv, util-linux), the binary copied where
/// `nobody` can execute it.
pub fn mqvisor_unprivileged(args: &[&std::ffi::OsStr]) -> Output {
    let (mut command, exe) = mqvisor_unprivileged_command();
    let out = command.args(args).output().expect("setpriv (util-linux) is needed to run mqvisor as another user");
    if let Some(exe) = exe {
        let _ = std::fs::remove_file(exe);
    }
    out
}

/// `mqvisor` as an ordinary user, as [`mqvisor_unprivileged`] runs it, to
/// add arguments to; with the copy of the binary it runs, if it made one
/// (the caller removes it when done).
pub fn mqvisor_unprivileged_command() -> (Command, Option<PathBuf>) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return (mqvisor(), None);
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("mqvisor-unprivileged-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join(format!("mqvisor-{:?}", std::thread::current().id()).replace(['(', ')'], ""));
    std::fs::copy(env!("CARGO_BIN_EXE_mqvisor"), &exe).unwrap();
    for path in [&dir, &exe] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut command = Command::new("setpriv");
    command.args(["--reuid=65534", "--regid=65534", "--clear-groups"]).arg(&exe);
    (command, Some(exe))
}

/// Starts `command` with its `resource` limit (`libc::RLIMIT_*`) at
/// `soft`, and at `hard` too when given (else the hard limit stays).
pub fn limit_child(command: &mut Command, resource: libc::__rlimit_resource_t, soft: u64, hard: Option<u64>) {
    // SAFETY: between fork and exec this only calls getrlimit and
    // setrlimit, which are async-signal-safe, on the child itself.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(command, move || {
            let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            if libc::getrlimit(resource, &mut limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            limit.rlim_cur = soft;
            limit.rlim_max = hard.unwrap_or(limit.rlim_max);
            if libc::setrlimit(resource, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Python's `ssl` module doing a TLS handshake with `server_name` whose
/// ClientHello goes out one byte per write (what a proxy that reads only the
/// hello must reassemble), then an MQTT CONNECT: success when the CONNACK
/// accepts it.
pub fn tls_connect_a_byte_at_a_time(port: u16, ca: &str, server_name: &str) -> Output {
    const SCRIPT: &str = r#"
import socket, ssl, sys, time
port, ca, name = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
tls = ctx.wrap_bio(inc, out, server_hostname=name)
s = socket.create_connection(("127.0.0.1", port))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
s.settimeout(10)
def pump():
    data = out.read()
    if data:
        s.sendall(data)
try:
    tls.do_handshake()
except ssl.SSLWantReadError:
    pass
hello = out.read()
for b in hello:
    s.send(bytes([b]))
    time.sleep(0.0005)
while True:
    try:
        tls.do_handshake()
        break
    except ssl.SSLWantReadError:
        pump()
        inc.write(s.recv(65536))
pump()
tls.write(bytes([0x10, 12, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 30, 0, 0]))
pump()
got = b""
while len(got) < 4:
    try:
        got += tls.read(4 - len(got))
    except ssl.SSLWantReadError:
        pump()
        inc.write(s.recv(65536))
print(got.hex(), len(hello))
sys.exit(0 if got == bytes([0x20, 2, 0, 0]) else 1)
"#;
    Command::new("python3").args(["-c", SCRIPT, &port.to_string(), ca, server_name]).output().expect("running python3")
}
