//! MQTT.js in a real browser: headless Chromium loads a page that uses
//! MQTT.js's browser bundle (the `mqtt` package from npm) to connect to a
//! tenant VM over WebSockets (`--listen-ws`) and secure WebSockets
//! (`--listen-wss`, a test CA made with `openssl`), subscribe, publish and
//! receive its own message on each. The page is served by a small HTTP
//! server in this test, and it reports its result by POSTing it back there
//! (and in `document.title`, for a person looking).
//!
//! Chromium trusts the server's certificate by its key alone
//! (`--ignore-certificate-errors-spki-list` with the SHA-256 of its
//! SubjectPublicKeyInfo), not by ignoring every certificate error.
//! `.ci/run` installs Chromium (Debian `chromium`) and MQTT.js
//! (`npm install mqtt@5` into `target/browser`).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use common::{kvm_available, mqvisor, tool_available};

const CHROMIUM: &str = "chromium (apt-get install chromium)";
const CHROMIUM_PROBE: &str = "command -v chromium";
const OPENSSL: &str = "openssl (apt-get install openssl)";
const OPENSSL_PROBE: &str = "command -v openssl";
const MQTTJS: &str = "MQTT.js (npm install --no-audit --no-fund mqtt@5, in target/browser)";

const WS: &str = "mqvisor: tenant VM listening for MQTT over WebSockets on ";
const WSS: &str = "mqvisor: tenant VM listening for MQTT over secure WebSockets on ";

/// MQTT.js's browser bundle, where `.ci/run` installs it.
fn mqttjs_bundle() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/browser/node_modules/mqtt/dist/mqtt.min.js")
}

/// A fresh folder of this test's own, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("mqvisor-browser-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self, file: &str) -> String {
        self.0.join(file).to_string_lossy().into_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A test CA and a server certificate for localhost and 127.0.0.1 signed
/// by it; returns the base64 SHA-256 of the server's SubjectPublicKeyInfo.
fn make_pki(dir: &TempDir) -> String {
    let script = r#"set -e
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=mqvisor-test-ca 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=localhost 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' > server.ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile server.ext 2>/dev/null
openssl x509 -in server.pem -pubkey -noout | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | openssl base64 -A
"#;
    let out = Command::new("sh").args(["-c", script]).current_dir(&dir.0).output().expect("running openssl");
    assert!(out.status.success(), "making the test PKI: {}", String::from_utf8_lossy(&out.stderr));
    let spki = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(spki.len(), 44, "a base64 SHA-256: {spki:?}");
    spki
}

/// A running `mqvisor run` serving only ws and wss, stopped when dropped.
struct Vm {
    child: Child,
    ws: SocketAddr,
    wss: SocketAddr,
}

impl Vm {
    fn start(dir: &TempDir) -> Vm {
        let mut child = mqvisor()
            .args(["run", "--listen", "none", "--listen-ws", "127.0.0.1:0", "--listen-wss", "127.0.0.1:0"])
            .args(["--tls-cert", &dir.path("server.pem"), "--tls-key", &dir.path("server.key"), "--timeout", "120"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning mqvisor");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let (mut ws, mut wss) = (None, None);
        while ws.is_none() || wss.is_none() {
            let line = lines.next().expect("mqvisor ended before listening").unwrap();
            for (marker, slot) in [(WS, &mut ws), (WSS, &mut wss)] {
                if let Some(addr) = line.strip_prefix(marker) {
                    *slot = Some(addr.parse::<SocketAddr>().unwrap());
                }
            }
        }
        // Keep reading stderr (shown in the test's output), so the VM never blocks on it.
        thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                eprintln!("mqvisor: {line}");
            }
        });
        Vm { child, ws: ws.unwrap(), wss: wss.unwrap() }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // SAFETY: kill(2) with our own child's pid and a valid signal.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// The page: MQTT.js connects over `ws_url`, then `wss_url`; on each it
/// subscribes (QoS 1), publishes (QoS 1) and waits for its own message.
/// It POSTs `PASS ...` or `FAIL ...` to `/result`.
fn page(ws_url: &str, wss_url: &str) -> String {
    let script = r#"
const urls = [WS_URL, WSS_URL];
function report(line) {
  document.title = line;
  document.getElementById("result").textContent = line;
  fetch("/result", { method: "POST", body: line });
}
window.addEventListener("error", (e) => report("FAIL page error: " + e.message));
function roundTrip(url, n) {
  return new Promise((resolve, reject) => {
    const topic = "browser/" + url.split(":")[0] + "/" + n;
    const payload = "hello from MQTT.js over " + url;
    const client = mqtt.connect(url, {
      clientId: "chromium-" + n, reconnectPeriod: 0, connectTimeout: 10000, clean: true,
    });
    const fail = (why) => { clearTimeout(timer); client.end(true); reject(new Error(url + ": " + why)); };
    const timer = setTimeout(() => fail("no message within 20 s"), 20000);
    client.on("error", (e) => fail("error: " + e.message));
    client.on("close", () => fail("closed before its message came back"));
    client.on("connect", () => {
      client.subscribe(topic, { qos: 1 }, (err, granted) => {
        if (err) return fail("subscribe: " + err.message);
        if (!granted || granted.length !== 1 || granted[0].qos !== 1) return fail("granted " + JSON.stringify(granted));
        client.publish(topic, payload, { qos: 1 }, (err) => { if (err) fail("publish: " + err.message); });
      });
    });
    client.on("message", (t, message) => {
      if (t === topic && message.toString() === payload) {
        clearTimeout(timer);
        client.removeAllListeners("close");
        client.end(false, () => resolve(url));
      }
    });
  });
}
(async () => {
  if (typeof mqtt === "undefined") return report("FAIL the MQTT.js bundle did not load");
  try {
    const done = [];
    for (const [n, url] of urls.entries()) done.push(await roundTrip(url, n));
    report("PASS " + done.join(" "));
  } catch (e) {
    report("FAIL " + e.message);
  }
})();
"#
    .replace("WS_URL", &format!("{ws_url:?}"))
    .replace("WSS_URL", &format!("{wss_url:?}"));
    format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>running</title>\n\
         <script src=\"/mqtt.min.js\"></script></head>\n\
         <body><pre id=\"result\">running</pre><script>{script}</script></body></html>\n"
    )
}

/// A tiny HTTP server: `GET /` is the page, `GET /mqtt.min.js` the bundle,
/// `POST /result` sends its body to the returned channel; anything else 404.
fn serve_page(html: String, bundle: Vec<u8>) -> (SocketAddr, mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    let (html, bundle) = (std::sync::Arc::new(html), std::sync::Arc::new(bundle));
    thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            let (tx, html, bundle) = (tx.clone(), html.clone(), bundle.clone());
            thread::spawn(move || {
                let _ = answer(stream, &html, &bundle, &tx);
            });
        }
    });
    (addr, rx)
}

fn answer(stream: TcpStream, html: &str, bundle: &[u8], tx: &mpsc::Sender<String>) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut length = 0;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, kind, body): (&str, &str, &[u8]) = match (method, path) {
        ("GET", "/") => ("200 OK", "text/html; charset=utf-8", html.as_bytes()),
        ("GET", "/mqtt.min.js") => ("200 OK", "text/javascript", bundle),
        ("POST", "/result") => {
            let mut body = vec![0; length.min(64 * 1024)];
            reader.read_exact(&mut body)?;
            let _ = tx.send(String::from_utf8_lossy(&body).into_owned());
            ("204 No Content", "text/plain", b"")
        }
        _ => ("404 Not Found", "text/plain", b"not found"),
    };
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(body)?;
    stream.flush()
}

/// Headless Chromium on `url`, in a process group of its own (its helper
/// processes with it), ended when dropped.
struct Chromium {
    child: Child,
    _profile: TempDir,
}

impl Chromium {
    fn open(url: &str, spki: &str) -> Chromium {
        let profile = TempDir::new("profile");
        let child = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                // Keeps the browser running after the page loads, until we end it.
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.0.display()))
            .arg(format!("--ignore-certificate-errors-spki-list={spki}"))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("spawning chromium");
        Chromium { child, _profile: profile }
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let group = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) of the process group our own child leads.
        unsafe { libc::kill(-group, libc::SIGTERM) };
        for _ in 0..50 {
            if self.child.try_wait().ok().flatten().is_some() {
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
        // SAFETY: as above; whatever of the group is left.
        unsafe { libc::kill(-group, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

#[test]
fn mqttjs_in_headless_chromium_over_websockets_and_secure_websockets() {
    let test = "mqttjs_in_headless_chromium_over_websockets_and_secure_websockets";
    if !kvm_available(test)
        || !tool_available(test, OPENSSL, OPENSSL_PROBE)
        || !tool_available(test, CHROMIUM, CHROMIUM_PROBE)
        || !tool_available(test, MQTTJS, &format!("test -s '{}'", mqttjs_bundle().display()))
    {
        return;
    }
    let bundle = std::fs::read(mqttjs_bundle()).unwrap();
    let pki = TempDir::new("pki");
    let spki = make_pki(&pki);
    let vm = Vm::start(&pki);
    // The certificate names 127.0.0.1; the page is http://127.0.0.1 too, so
    // neither URL is mixed content.
    let ws_url = format!("ws://127.0.0.1:{}/mqtt", vm.ws.port());
    let wss_url = format!("wss://127.0.0.1:{}/mqtt", vm.wss.port());
    let (http, results) = serve_page(page(&ws_url, &wss_url), bundle);
    let browser = Chromium::open(&format!("http://{http}/"), &spki);
    let result = results.recv_timeout(Duration::from_secs(90)).expect("no result from the page within 90 s");
    drop(browser);
    assert_eq!(result, format!("PASS {ws_url} {wss_url}"), "the page's result");
}
