//! `mqvisor bench edge`: the TLS and WebSocket listeners of a tenant VM
//! (`mqvisor run --listen-tls/--listen-ws`) beside Mosquitto's, on the same
//! machine in the same run, with the same certificate and key.
//!
//! Owns a throwaway CA and localhost certificate (made with the `openssl`
//! command at start, removed at the end), Mosquitto's TLS and WebSocket
//! listeners, and four measurements per target: QoS 1 throughput over TLS
//! 1->1 and 1->20 driven by libmosquitto's own clients (`mosquitto_pub -l`,
//! `mosquitto_sub -C`), full TLS handshakes per second to CONNACK (rustls
//! client loops, no resumption), QoS 1 1->1 over WebSockets (a tungstenite
//! client), and PSS per idle TLS and plain connection, each on a fresh
//! server. Every process it starts is stopped by a guard when it returns.
//! Prints figures and ratios; never judges them.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use mqvisor_broker::packet::{Ack, Connect, Packet, Payload, Publish, QoS, Subscribe, SubscriptionOptions, Version};
use mqvisor_broker::properties::Properties;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};
use tungstenite::client::IntoClientRequest;
use tungstenite::{Message, WebSocket};

use super::mosquitto_clients::{self, Endpoint, PAYLOAD, QUIET, have_program};
use super::mqtt::{QUEUE, Target, WINDOW, encode, free_port, io_err, read_packet, start_mosquitto, start_mqvisor};
use super::raise_fd_limit;

/// Idle connections are opened in batches of this many, with progress.
const BATCH: usize = 1000;
/// Parallel openers of idle connections.
const OPENERS: usize = 4;

/// The settings of one `mqvisor bench edge` run.
pub struct Options {
    pub scale: f64,
    pub idle: usize,
    pub handshakers: usize,
    pub seconds: u64,
    pub rsa: bool,
    pub memory_mib: u32,
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The throwaway CA and the localhost certificate both servers use.
struct Certs {
    dir: TempDir,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    kind: &'static str,
}

/// Runs `openssl` with `command`'s words (file names in `dir`, no spaces).
fn openssl(command: &str, dir: &Path) -> Result<(), String> {
    let out = Command::new("openssl")
        .args(command.split_whitespace())
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running openssl: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    Err(format!("openssl {command}: {}", stderr.lines().next().unwrap_or("failed")))
}

/// A CA and a certificate for localhost and 127.0.0.1 signed by it.
fn make_certs(rsa: bool) -> Result<Certs, String> {
    let dir = TempDir(std::env::temp_dir().join(format!("mqvisor-bench-edge-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).map_err(io_err)?;
    let genkey = if rsa {
        "genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048"
    } else {
        "genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256"
    };
    openssl(&format!("{genkey} -out ca.key"), &dir.0)?;
    openssl("req -x509 -new -key ca.key -out ca.pem -days 2 -subj /CN=bench-ca", &dir.0)?;
    openssl(&format!("{genkey} -out server.key"), &dir.0)?;
    openssl("req -new -key server.key -out server.csr -subj /CN=localhost", &dir.0)?;
    std::fs::write(dir.0.join("server.ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n").map_err(io_err)?;
    openssl(
        "x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile server.ext",
        &dir.0,
    )?;
    // Mosquitto started as root reads its key as the `mosquitto` user; the
    // key is a throwaway in a directory of its own.
    std::fs::set_permissions(dir.0.join("server.key"), std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .map_err(io_err)?;
    let (ca, cert, key) = (dir.0.join("ca.pem"), dir.0.join("server.pem"), dir.0.join("server.key"));
    Ok(Certs { dir, ca, cert, key, kind: if rsa { "RSA 2048" } else { "ECDSA P-256" } })
}

/// Mosquitto's setting for TCP_NODELAY on its clients' sockets (off by
/// default: its CONNACK would then wait for the ACK of the TLS 1.3 session
/// tickets sent just before it, and the handshake rate would be the delayed
/// ACK's). mqvisor sets TCP_NODELAY on every client socket.
const NODELAY: &str = "set_tcp_nodelay true\n";

/// A broker under test with its TLS and WebSocket listeners.
struct Server {
    target: Target,
    tls: SocketAddr,
    /// None: this Mosquitto has no WebSocket support.
    ws: Option<SocketAddr>,
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn wait_for(target: &mut Target, addr: SocketAddr) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(status)) = target.child.try_wait() {
            return Err(format!("{} exited ({status}) before listening on {addr}", target.name));
        }
        if TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{}: nothing listening on {addr}", target.name));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn start_vm(exe: &Path, certs: &Certs, memory_mib: u32, connections: usize) -> Result<Server, String> {
    let (tls, ws) = (local(free_port()?), local(free_port()?));
    let (memory, queue, max) = (memory_mib.to_string(), QUEUE.to_string(), connections.to_string());
    let (tls_arg, ws_arg) = (tls.to_string(), ws.to_string());
    let (cert, key) = (certs.cert.to_string_lossy(), certs.key.to_string_lossy());
    let args = [
        "run",
        "--service",
        "mqtt",
        "--memory",
        &memory,
        "--max-queued-messages",
        &queue,
        "--max-connections",
        &max,
        "--listen-tls",
        &tls_arg,
        "--listen-ws",
        &ws_arg,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ];
    let mut target = start_mqvisor(exe, "mqvisor VM", &args)?;
    wait_for(&mut target, tls)?;
    wait_for(&mut target, ws)?;
    Ok(Server { target, tls, ws: Some(ws) })
}

fn start_mosquitto_edge(certs: &Certs) -> Result<Server, String> {
    let tls = local(free_port()?);
    let tls_conf = format!(
        "listener {} 127.0.0.1\ncertfile {}\nkeyfile {}\n",
        tls.port(),
        certs.cert.display(),
        certs.key.display()
    );
    let ws = local(free_port()?);
    let ws_conf = format!("listener {} 127.0.0.1\nprotocol websockets\n", ws.port());
    let with_ws = start_mosquitto(&format!("{NODELAY}{tls_conf}{ws_conf}")).and_then(|mut target| {
        wait_for(&mut target, tls)?;
        wait_for(&mut target, ws)?;
        Ok(target)
    });
    match with_ws {
        Ok(target) => Ok(Server { target, tls, ws: Some(ws) }),
        Err(e) => {
            eprintln!("bench edge: mosquitto with a websockets listener failed ({e}); trying without it");
            let mut target = start_mosquitto(&format!("{NODELAY}{tls_conf}"))?;
            wait_for(&mut target, tls)?;
            Ok(Server { target, tls, ws: None })
        }
    }
}

/// PSS of `pid` and every process below it, KiB.
fn tree_pss_kib(pid: u32) -> Result<u64, String> {
    let mut total = crate::procfs::pss_kib(pid).ok_or_else(|| format!("no Pss in /proc/{pid}/smaps_rollup"))?;
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).map_err(io_err)?;
    for task in tasks.flatten() {
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for child in children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()) {
            total += tree_pss_kib(child).unwrap_or(0);
        }
    }
    Ok(total)
}

// ---------------------------------------------------------------------------
// 1. QoS 1 over TLS with libmosquitto's clients.

/// One publisher to `subscribers` at QoS 1 over TLS, libmosquitto's clients;
/// delivered messages per second and the fraction delivered.
fn tls_shape(server: &Server, certs: &Certs, subscribers: usize, messages: usize) -> Result<(f64, f64), String> {
    let endpoint = Endpoint { addr: server.tls, ca: Some(&certs.ca) };
    let d = mosquitto_clients::run(endpoint, QoS::AtLeastOnce, subscribers, messages, &certs.dir.0)?;
    Ok((d.per_s, d.fraction()))
}

// ---------------------------------------------------------------------------
// 2. Full TLS handshakes to CONNACK, and idle TLS connections.

fn client_config(certs: &Certs) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    let ca = |e: rustls::pki_types::pem::Error| format!("{}: {e}", certs.ca.display());
    for cert in CertificateDer::pem_file_iter(&certs.ca).map_err(ca)? {
        roots.add(cert.map_err(ca)?).map_err(io_err)?;
    }
    let mut config = ClientConfig::builder_with_provider(mqvisor::net::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(io_err)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // Every handshake is a full one.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

fn connect_packet(client_id: &str, keep_alive: u16) -> Vec<u8> {
    encode(&Packet::Connect(Box::new(Connect {
        version: Version::V3_1_1,
        clean_start: true,
        keep_alive,
        properties: Properties::default(),
        client_id: client_id.into(),
        will: None,
        username: None,
        password: None,
    })))
}

/// TCP connect, a full TLS handshake, CONNECT and its CONNACK. Returns the
/// socket and the TLS session (the caller closes or keeps them).
fn tls_connect(
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
    client_id: &str,
    keep_alive: u16,
) -> Result<(TcpStream, ClientConnection), String> {
    let mut tcp = TcpStream::connect(addr).map_err(io_err)?;
    tcp.set_nodelay(true).map_err(io_err)?;
    let name = ServerName::try_from("localhost").map_err(io_err)?;
    let mut conn = ClientConnection::new(config.clone(), name).map_err(io_err)?;
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    tls.write_all(&connect_packet(client_id, keep_alive)).map_err(io_err)?;
    tls.flush().map_err(io_err)?;
    let mut buf = Vec::new();
    match read_packet(&mut tls, &mut buf).map_err(io_err)? {
        Packet::Connack(c) if c.code == 0 => Ok((tcp, conn)),
        other => Err(format!("{client_id}: expected CONNACK, got {other:?}")),
    }
}

/// What the handshake loops achieved.
struct Handshakes {
    per_s: f64,
    failed: u64,
    /// The first failure, if any.
    error: Option<String>,
    version: String,
}

/// `loops` clients each connecting, handshaking, CONNECTing and closing
/// (DISCONNECT, then close) over and over for `seconds`.
fn handshakes(addr: SocketAddr, config: &Arc<ClientConfig>, loops: usize, seconds: u64) -> Result<Handshakes, String> {
    let (_, first) = tls_connect(addr, config, "edge-hs-probe", 60)?;
    let version = match (first.protocol_version(), first.negotiated_cipher_suite()) {
        (Some(v), Some(suite)) => format!("{v:?}, {:?}", suite.suite()),
        _ => "unknown version".to_string(),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let workers: Vec<_> = (0..loops)
        .map(|w| {
            let (config, stop) = (config.clone(), stop.clone());
            thread::spawn(move || {
                let (mut done, mut failed, mut error) = (0u64, 0u64, None);
                while !stop.load(Ordering::Relaxed) {
                    match tls_connect(addr, &config, &format!("edge-hs-{w}-{done}"), 60) {
                        Ok((mut tcp, mut conn)) => {
                            let _ = rustls::Stream::new(&mut conn, &mut tcp).write_all(&[0xe0, 0]);
                            done += 1;
                        }
                        Err(e) => {
                            failed += 1;
                            error.get_or_insert(e);
                        }
                    }
                }
                (done, failed, error)
            })
        })
        .collect();
    thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    let (mut done, mut failed, mut error) = (0, 0, None);
    for w in workers {
        let (d, f, e) = w.join().map_err(|_| "handshake loop panicked")?;
        done += d;
        failed += f;
        error = error.or(e);
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok(Handshakes { per_s: done as f64 / elapsed, failed, error, version })
}

// ---------------------------------------------------------------------------
// 3. QoS 1 over WebSockets.

/// An MQTT client over a WebSocket (tungstenite): reads see the bytes of
/// binary messages as one stream; each packet sent is one binary message.
struct WsClient {
    ws: WebSocket<TcpStream>,
    inbox: Vec<u8>,
    at: usize,
}

impl Read for WsClient {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.inbox.len() {
            match self.ws.read().map_err(std::io::Error::other)? {
                Message::Binary(b) => {
                    self.inbox.clear();
                    self.inbox.extend_from_slice(&b);
                    self.at = 0;
                }
                Message::Close(_) => return Ok(0),
                _ => {}
            }
        }
        let n = out.len().min(self.inbox.len() - self.at);
        out[..n].copy_from_slice(&self.inbox[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

impl WsClient {
    fn connect(addr: SocketAddr, client_id: &str) -> Result<WsClient, String> {
        let tcp = TcpStream::connect(addr).map_err(io_err)?;
        tcp.set_nodelay(true).map_err(io_err)?;
        let mut request = format!("ws://{addr}/mqtt").into_client_request().map_err(io_err)?;
        request.headers_mut().insert("Sec-WebSocket-Protocol", tungstenite::http::HeaderValue::from_static("mqtt"));
        let (ws, _) = tungstenite::client::client(request, tcp).map_err(|e| format!("WebSocket handshake: {e}"))?;
        let mut client = WsClient { ws, inbox: Vec::new(), at: 0 };
        client.send(connect_packet(client_id, 60))?;
        client.flush()?;
        let mut buf = Vec::new();
        match read_packet(&mut client, &mut buf).map_err(io_err)? {
            Packet::Connack(c) if c.code == 0 => Ok(client),
            other => Err(format!("{client_id}: expected CONNACK, got {other:?}")),
        }
    }

    /// Queues one packet (written when the buffer fills or on flush).
    fn send(&mut self, packet: Vec<u8>) -> Result<(), String> {
        self.ws.write(Message::Binary(packet.into())).map_err(io_err)
    }

    fn flush(&mut self) -> Result<(), String> {
        self.ws.flush().map_err(io_err)
    }

    fn buffered(&self) -> bool {
        self.at < self.inbox.len()
    }
}

fn ack(id: u16) -> Ack {
    Ack { packet_id: id, code: 0, properties: Properties::default() }
}

/// One publisher to one subscriber at QoS 1 over WebSockets, inflight
/// window WINDOW; delivered messages per second from the first publish to
/// the last delivery, and the fraction delivered.
fn ws_shape(addr: SocketAddr, messages: usize) -> Result<(f64, f64), String> {
    let topic = format!("bench/edge/ws/{}", std::process::id());
    let mut sub = WsClient::connect(addr, "edge-ws-sub")?;
    let options =
        SubscriptionOptions { qos: QoS::AtLeastOnce, no_local: false, retain_as_published: false, retain_handling: 0 };
    let filters = vec![(topic.clone(), options)];
    sub.send(encode(&Packet::Subscribe(Subscribe { packet_id: 1, properties: Properties::default(), filters })))?;
    sub.flush()?;
    let mut buf = Vec::new();
    while !matches!(read_packet(&mut sub, &mut buf).map_err(io_err)?, Packet::Suback { .. }) {}
    sub.ws.get_ref().set_read_timeout(Some(QUIET)).map_err(io_err)?;
    let subscriber = thread::spawn(move || -> Result<(u64, Option<Instant>), String> {
        let (mut got, mut last, mut buf) = (0u64, None, Vec::new());
        // A read error is QUIET seconds without a message: some were lost.
        while let Ok(packet) = read_packet(&mut sub, &mut buf) {
            if let Packet::Publish(p) = packet {
                got += 1;
                last = Some(Instant::now());
                if let Some(id) = p.packet_id {
                    sub.send(encode(&Packet::Puback(ack(id))))?;
                }
                if !sub.buffered() {
                    sub.flush()?;
                }
                if got >= messages as u64 {
                    break;
                }
            }
        }
        let _ = sub.flush();
        Ok((got, last))
    });
    let mut publisher = WsClient::connect(addr, "edge-ws-pub")?;
    publisher.ws.get_ref().set_read_timeout(Some(QUIET)).map_err(io_err)?;
    let topic: Arc<str> = Arc::from(topic.as_str());
    let started = Instant::now();
    let (mut sent, mut acked) = (0usize, 0usize);
    while acked < messages {
        while sent < messages && sent - acked < WINDOW {
            let id = u16::try_from(sent % 65_535 + 1).unwrap_or(1);
            let mut payload = vec![b'x'; PAYLOAD];
            payload[..8].copy_from_slice(&(sent as u64).to_le_bytes());
            publisher.send(encode(&Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: topic.clone(),
                packet_id: Some(id),
                properties: Default::default(),
                payload: Payload::from(payload),
            })))?;
            sent += 1;
        }
        publisher.flush()?;
        loop {
            if let Packet::Puback(_) = read_packet(&mut publisher, &mut buf).map_err(io_err)? {
                acked += 1;
            }
            if !publisher.buffered() {
                break;
            }
        }
    }
    let (got, last) = subscriber.join().map_err(|_| "WebSocket subscriber panicked")??;
    let elapsed = last.unwrap_or(started).duration_since(started).as_secs_f64().max(1e-6);
    Ok((got as f64 / elapsed, got as f64 / messages.max(1) as f64))
}

// ---------------------------------------------------------------------------
// 4. PSS per idle connection.

/// Opens `n` connections with `open` (in batches, OPENERS at a time) and
/// holds them; returns the server's PSS growth per connection, KiB.
fn idle_kib_per_connection<F>(label: &str, target: &Target, n: usize, open: F) -> Result<f64, String>
where
    F: Fn(usize) -> Result<TcpStream, String> + Sync,
{
    let pid = target.child.id();
    let _first = open(usize::MAX)?;
    thread::sleep(Duration::from_millis(300));
    let before = tree_pss_kib(pid)?;
    let mut held: Vec<TcpStream> = Vec::with_capacity(n);
    let mut start = 0;
    while start < n {
        let end = (start + BATCH).min(n);
        let per = (end - start).div_ceil(OPENERS);
        let batch: Result<Vec<Vec<TcpStream>>, String> = thread::scope(|s| {
            let open = &open;
            let workers: Vec<_> = (start..end)
                .step_by(per)
                .map(|from| s.spawn(move || (from..(from + per).min(end)).map(open).collect::<Result<Vec<_>, _>>()))
                .collect();
            workers.into_iter().map(|w| w.join().map_err(|_| "opener panicked".to_string())?).collect()
        });
        held.extend(batch?.into_iter().flatten());
        start = end;
        eprintln!("bench edge: {label}: {start}/{n} idle connections open");
    }
    thread::sleep(Duration::from_millis(500));
    let after = tree_pss_kib(pid)?;
    drop(held);
    Ok(after.saturating_sub(before) as f64 / n.max(1) as f64)
}

fn idle_plain(target: &Target, n: usize, label: &str) -> Result<f64, String> {
    idle_kib_per_connection(label, target, n, |i| {
        // One descriptor per connection: the reader's (as `bench conns`).
        super::mqtt::connect(target.addr, &format!("edge-idle-{i}")).map(|(_, reader)| reader.into_inner())
    })
}

fn idle_tls(server: &Server, config: &Arc<ClientConfig>, n: usize, label: &str) -> Result<f64, String> {
    idle_kib_per_connection(label, &server.target, n, |i| {
        // The TLS session is dropped without a word: the server's stays.
        tls_connect(server.tls, config, &format!("edge-idle-{i}"), 0).map(|(tcp, _)| tcp)
    })
}

// ---------------------------------------------------------------------------

/// One row of the summary: a figure, the VM's, Mosquitto's.
struct Row {
    figure: String,
    vm: Option<f64>,
    mosquitto: Option<f64>,
}

fn print_rows(rows: &[Row]) {
    println!("{:<44} {:>12} {:>12} {:>9}", "figure", "mqvisor VM", "Mosquitto", "VM/mosq");
    let cell = |v: Option<f64>| {
        v.map_or("n/a".to_string(), |v| if v >= 100.0 { format!("{v:.0}") } else { format!("{v:.2}") })
    };
    for r in rows {
        let ratio = match (r.vm, r.mosquitto) {
            (Some(v), Some(m)) if m > 0.0 => format!("{:.2}x", v / m),
            _ => "n/a".into(),
        };
        println!("{:<44} {:>12} {:>12} {:>9}", r.figure, cell(r.vm), cell(r.mosquitto), ratio);
    }
}

/// Scales a base message count, at least 10.
fn scaled(base: usize, scale: f64) -> usize {
    // scale is in (0, 100]: the product is positive and far below usize::MAX.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let n = (base as f64 * scale) as usize;
    n.max(10)
}

/// Runs every measurement against both targets and prints the comparison.
pub fn edge(exe: &Path, o: &Options) -> Result<(), String> {
    for (program, package) in [
        ("mosquitto", "mosquitto"),
        ("mosquitto_pub", "mosquitto-clients"),
        ("mosquitto_sub", "mosquitto-clients"),
        ("openssl", "openssl"),
    ] {
        if !have_program(program) {
            return Err(format!("`{program}` not found: apt-get install {package}"));
        }
    }
    let fds = raise_fd_limit();
    if fds < o.idle as u64 + 256 {
        return Err(format!(
            "{} idle connections need {} file descriptors; the hard limit is {fds}",
            o.idle,
            o.idle + 256
        ));
    }
    let certs = make_certs(o.rsa)?;
    let config = client_config(&certs)?;
    let connections = o.idle + 64;
    let one = scaled(20_000, o.scale);
    let fan = scaled(2_000, o.scale);
    let ws_messages = scaled(20_000, o.scale);
    println!(
        "Edge benchmark: a tenant VM's --listen-tls/--listen-ws beside Mosquitto's TLS and websockets listeners, \
         one {} certificate for both; 100-byte payloads, inflight window {WINDOW}",
        certs.kind
    );
    let mut rows = Vec::new();
    {
        eprintln!("bench edge: starting mosquitto and a tenant VM ...");
        let mosquitto = start_mosquitto_edge(&certs)?;
        let vm = start_vm(exe, &certs, o.memory_mib, connections)?;
        let servers = [&vm, &mosquitto];

        let mut figures = |figure: String, f: &mut dyn FnMut(&Server) -> Result<Option<f64>, String>| {
            let mut values = [None, None];
            for (value, server) in values.iter_mut().zip(servers) {
                eprintln!("bench edge: {}: {figure} ...", server.target.name);
                *value = f(server)?;
            }
            rows.push(Row { figure, vm: values[0], mosquitto: values[1] });
            Ok::<(), String>(())
        };
        for (subscribers, messages) in [(1, one), (20, fan)] {
            figures(format!("TLS QoS 1 1->{subscribers} msg/s ({messages} msgs x {subscribers})"), &mut |server| {
                let (rate, fraction) = tls_shape(server, &certs, subscribers, messages)?;
                if fraction < 1.0 {
                    eprintln!("bench edge: {}: {:.1}% delivered", server.target.name, fraction * 100.0);
                }
                Ok(Some(rate))
            })?;
        }
        let mut version = String::new();
        figures(format!("TLS handshakes/s to CONNACK ({} loops)", o.handshakers), &mut |server| {
            let h = handshakes(server.tls, &config, o.handshakers, o.seconds)?;
            if h.failed > 0 {
                eprintln!(
                    "bench edge: {}: {} handshakes failed, the first: {}",
                    server.target.name,
                    h.failed,
                    h.error.unwrap_or_default()
                );
            }
            if version.is_empty() {
                version = h.version;
            } else if version != h.version {
                version = format!("{version} (VM); {} (Mosquitto)", h.version);
            }
            Ok(Some(h.per_s))
        })?;
        figures(format!("WebSocket QoS 1 1->1 msg/s ({ws_messages} msgs)"), &mut |server| match server.ws {
            Some(ws) => {
                let (rate, fraction) = ws_shape(ws, ws_messages)?;
                if fraction < 1.0 {
                    eprintln!("bench edge: {}: {:.1}% delivered over WebSockets", server.target.name, fraction * 100.0);
                }
                Ok(Some(rate))
            }
            None => {
                println!("Mosquitto here has no websockets listener: no WebSocket figure for it");
                Ok(None)
            }
        })?;
        println!(
            "TLS: {version}, no resumption (rustls client); TLS throughput driven by mosquitto_pub -l and \
             mosquitto_sub -C, timed from the first delivery to the last; WebSocket client: tungstenite (Rust), one MQTT 3.1.1 packet per binary message"
        );
    }
    if o.idle > 0 {
        // Each on a fresh server: memory a previous run touched would hide the cost.
        let n = o.idle;
        let vm_plain = idle_plain(&start_vm(exe, &certs, o.memory_mib, connections)?.target, n, "VM plain")?;
        let vm_tls = {
            let vm = start_vm(exe, &certs, o.memory_mib, connections)?;
            idle_tls(&vm, &config, n, "VM TLS")?
        };
        let mosquitto_plain = idle_plain(&start_mosquitto_edge(&certs)?.target, n, "mosquitto plain")?;
        let mosquitto_tls = {
            let mosquitto = start_mosquitto_edge(&certs)?;
            idle_tls(&mosquitto, &config, n, "mosquitto TLS")?
        };
        let rows_idle = [
            (format!("idle plain KiB/conn ({n} held)"), vm_plain, mosquitto_plain),
            (format!("idle TLS KiB/conn ({n} held)"), vm_tls, mosquitto_tls),
            ("TLS over plain, KiB/conn".to_string(), vm_tls - vm_plain, mosquitto_tls - mosquitto_plain),
        ];
        rows.extend(rows_idle.into_iter().map(|(figure, vm, m)| Row { figure, vm: Some(vm), mosquitto: Some(m) }));
        println!(
            "Idle connections: PSS growth of the server's processes (/proc/PID/smaps_rollup; the VM: its \
             `mqvisor run` process, guest RAM it touched included) over N held connections, each on a fresh server"
        );
    }
    print_rows(&rows);
    Ok(())
}
