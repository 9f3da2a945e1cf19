//! `mqvisor serve` as the end-to-end tests drive it: a fresh configuration
//! in a temporary directory, the daemon's log lines, its control socket and
//! its metrics page. Never shared between tests: each owns its directory.

use std::io::{BufRead, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A running daemon with its log lines.
pub struct Daemon {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: Arc<Mutex<Vec<String>>>,
    pub dir: PathBuf,
}

impl Daemon {
    /// Writes `tenants` (TOML tables after `[defaults]`) into a fresh
    /// configuration and starts `mqvisor serve` on a free port.
    pub fn start(name: &str, tenants: &str, files: &[(&str, &str)]) -> Daemon {
        Daemon::spawn(Daemon::configure(name, tenants, files))
    }

    /// The directory of a fresh configuration with `tenants` and `files`.
    pub fn configure(name: &str, tenants: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mqvisor-serve-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (file, text) in files {
            std::fs::write(dir.join(file), text).unwrap();
        }
        let config = dir.join("serve.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\nstate_dir = \"state\"\nmetrics_listen = \"127.0.0.1:{}\"\n\
                 [defaults]\nmemory = 64\nmax_connections = 100\n{tenants}",
                free_port()
            ),
        )
        .unwrap();
        dir
    }

    /// Starts `mqvisor serve` on `dir/serve.toml` and waits until it listens.
    pub fn spawn(dir: PathBuf) -> Daemon {
        Daemon::spawn_with_descriptors(dir, None)
    }

    /// As `spawn`, with the daemon's descriptor limit (soft and hard) set.
    pub fn spawn_with_descriptors(dir: PathBuf, descriptors: Option<u64>) -> Daemon {
        let mut command = super::mqvisor();
        if let Some(n) = descriptors {
            super::limit_child(&mut command, libc::RLIMIT_NOFILE, n, Some(n));
        }
        Daemon::spawn_command(dir, command)
    }

    /// As `spawn`, the daemon being `command` (`mqvisor`, as some user).
    pub fn spawn_command(dir: PathBuf, mut command: std::process::Command) -> Daemon {
        let config = dir.join("serve.toml");
        command.arg("serve").arg("--config").arg(&config).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawning mqvisor serve");
        let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let addr: SocketAddr = loop {
            let line = lines.next().expect("mqvisor serve ended before listening").unwrap();
            if let Some(addr) = line.strip_prefix("mqvisor: serve listening on ") {
                break addr.parse().unwrap();
            }
        };
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Daemon { child, addr, log, dir }
    }

    /// Waits for a log line containing every one of `needles`.
    pub fn wait_for(&self, needles: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(line) = self.log.lock().unwrap().iter().find(|l| needles.iter().all(|n| l.contains(n))) {
                return line.clone();
            }
            assert!(Instant::now() < deadline, "no log line with {needles:?}: {:?}", self.log.lock().unwrap());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid_of(&self, tenant: &str) -> i32 {
        let line = self.wait_for(&["booted", &format!("tenant={tenant} ")]);
        let pid = line.split("pid=").nth(1).and_then(|r| r.split_whitespace().next()).unwrap();
        pid.parse().unwrap()
    }

    /// `mqvisor tenant ARGS` against this daemon: success, stdout, stderr.
    pub fn tenant(&self, args: &[&str]) -> (bool, String, String) {
        self.ask("tenant", args)
    }

    /// `mqvisor COMMAND ARGS` (`tenant`, `node`) through this daemon's
    /// control socket: success, stdout, stderr.
    pub fn ask(&self, command: &str, args: &[&str]) -> (bool, String, String) {
        let out = super::mqvisor()
            .arg(command)
            .args(args)
            .arg("--socket")
            .arg(self.dir.join("state/control.sock"))
            .output()
            .unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.success(), text(&out.stdout), text(&out.stderr))
    }

    /// The tenants as `mqvisor tenant list --json` shows them.
    pub fn list(&self) -> Vec<serde_json::Value> {
        let (ok, json, err) = self.tenant(&["list", "--json"]);
        assert!(ok, "tenant list failed: {err}");
        serde_json::from_str::<Vec<serde_json::Value>>(&json).unwrap()
    }

    /// The daemon's `GET /metrics` page.
    pub fn metrics(&self) -> String {
        let config = std::fs::read_to_string(self.dir.join("serve.toml")).unwrap();
        let line = config.lines().find(|l| l.starts_with("metrics_listen")).unwrap();
        let port = line.split("127.0.0.1:").nth(1).and_then(|r| r.split('"').next()).unwrap().to_string();
        let mut http = TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
        http.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut page = String::new();
        std::io::Read::read_to_string(&mut http, &mut page).unwrap();
        page
    }

    /// The value of the series `name` on the metrics page.
    pub fn metric(&self, name: &str) -> u64 {
        let page = self.metrics();
        page.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {page}"))
    }

    pub fn log_has(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    /// Stops the daemon (SIGTERM) and waits for it; its files stay until
    /// it is dropped.
    pub fn stop(&mut self) {
        // Already waited for (killed by the test): its pid may be another
        // process's by now.
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: kill(2) on our own child with valid signals. SIGCONT: a
        // test that stopped it (SIGSTOP) and failed must not wait forever.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
            libc::kill(self.child.id() as libc::pid_t, libc::SIGCONT);
        }
        let _ = self.child.wait();
    }

    /// `mqvisor tenant ARGS` with `stdin`: success, stdout, stderr.
    pub fn tenant_with_stdin(&self, args: &[&str], stdin: &[u8]) -> (bool, String, String) {
        let mut child = super::mqvisor()
            .arg("tenant")
            .args(args)
            .arg("--socket")
            .arg(self.dir.join("state/control.sock"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // A command that refuses before reading stdin closes it: no matter.
        let _ = child.stdin.take().unwrap().write_all(stdin);
        let out = child.wait_with_output().unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.success(), text(&out.stdout), text(&out.stderr))
    }
    /// One request to the control socket, as curl would send it: the status
    /// and the body.
    pub fn http(&self, method: &str, path: &str, body: impl AsRef<[u8]>) -> (u16, String) {
        let body = body.as_ref();
        let mut socket = std::os::unix::net::UnixStream::connect(self.dir.join("state/control.sock")).unwrap();
        let length = body.len();
        write!(socket, "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {length}\r\n\r\n")
            .unwrap();
        // The daemon may answer (413) before taking the whole body.
        let _ = socket.write_all(body);
        let mut answer = Vec::new();
        let _ = std::io::Read::read_to_end(&mut socket, &mut answer);
        let answer = String::from_utf8_lossy(&answer).into_owned();
        let status = answer.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        (status, answer.split_once("\r\n\r\n").map_or(String::new(), |(_, body)| body.to_string()))
    }

    /// The tenant `name` as `mqvisor tenant show NAME --json` shows it.
    pub fn show(&self, name: &str) -> serde_json::Value {
        let (ok, json, err) = self.tenant(&["show", name, "--json"]);
        assert!(ok, "tenant show {name} failed: {err}");
        serde_json::from_str(&json).unwrap()
    }

    /// The tenants' names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.list().iter().map(|t| t["name"].as_str().unwrap().to_string()).collect();
        names.sort();
        names
    }

    /// The `GET /metrics` response's header and body.
    pub fn metrics_response(&self) -> (String, String) {
        let page = self.metrics();
        let (head, body) = page.split_once("\r\n\r\n").expect("an HTTP response");
        (head.to_string(), body.to_string())
    }

    /// The pid of tenant `name`'s process (`None`: not running).
    pub fn pid(&self, name: &str) -> Option<u64> {
        let (status, body) = self.http("GET", &format!("/tenants/{name}"), b"");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["pid"].as_u64()
    }

    pub fn put_user(&self, tenant: &str, user: &str, password: &str) -> (u16, String) {
        let body = serde_json::json!({ "password": password }).to_string();
        self.http("PUT", &format!("/tenants/{tenant}/users/{user}"), body.as_bytes())
    }

    pub fn users(&self, tenant: &str) -> Vec<String> {
        let (status, body) = self.http("GET", &format!("/tenants/{tenant}/users"), b"");
        assert_eq!(status, 200, "{body}");
        assert!(!body.contains('$'), "hashes are never shown: {body}");
        serde_json::from_str(&body).unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
