//! `mqvisor bench mqtt`: MQTT throughput and latency, mqvisor beside
//! Mosquitto on the same machine in the same run.
//!
//! Owns a small load generator built on the broker crate's codec: blocking
//! sockets, one thread per client, MQTT 3.1.1. Publishers stamp each 100-byte
//! payload with its send time; subscribers count messages and record
//! latencies. Topologies 1->1, 10->1 and 1->100 at QoS 0, 1 and 2. Targets:
//! Mosquitto (started here from the Debian binary), the host-native runner
//! (`mqvisor broker`) and a tenant VM (`mqvisor run`). Prints figures and
//! ratios to Mosquitto; never judges them.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use mqvisor_broker::packet::{
    self, Ack, Connect, Packet, Payload, Publish, QoS, Subscribe, SubscriptionOptions, Version,
};
use mqvisor_broker::properties::Properties;
use mqvisor_broker::wire as packet_error;

use super::percentile;

const PAYLOAD: usize = 100;
/// QoS 1/2 messages a publisher keeps unacknowledged (the brokers' default
/// inflight window is 20 as well).
pub(super) const WINDOW: usize = 20;
const TOPIC: &str = "bench/topic";
/// Per-session queue limit on every target: high, so that the figures
/// measure throughput rather than each broker's drop policy.
pub(super) const QUEUE: usize = 100_000;

/// One benchmark shape.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub publishers: usize,
    pub subscribers: usize,
    pub qos: QoS,
    /// Messages per publisher.
    pub messages: usize,
    /// Subscribers keep their session (clean session 0, a fresh client id
    /// per run), so a broker that persists has something to persist.
    pub durable: bool,
}

/// What one shape achieved against one target.
#[derive(Debug, Clone, Copy, Default)]
pub struct Figures {
    /// Messages received by subscribers per second.
    pub delivered_per_s: f64,
    /// Fraction of expected deliveries that arrived.
    pub delivered_fraction: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

pub(super) fn io_err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Reads one packet from a blocking reader.
pub(super) fn read_packet(r: &mut impl Read, buf: &mut Vec<u8>) -> std::io::Result<Packet> {
    let bad = |e: packet_error::DecodeError| std::io::Error::other(format!("{e:?}"));
    buf.clear();
    let mut byte = [0u8; 1];
    r.read_exact(&mut byte)?;
    buf.push(byte[0]);
    let mut remaining = 0usize;
    for shift in [0, 7, 14, 21] {
        r.read_exact(&mut byte)?;
        buf.push(byte[0]);
        remaining |= usize::from(byte[0] & 0x7f) << shift;
        if byte[0] & 0x80 == 0 {
            break;
        }
    }
    let start = buf.len();
    buf.resize(start + remaining, 0);
    r.read_exact(&mut buf[start..])?;
    let frame =
        packet::frame(buf, usize::MAX).map_err(bad)?.ok_or_else(|| std::io::Error::other("incomplete packet"))?;
    packet::decode_from_server(frame, buf, Version::V3_1_1).map_err(bad)
}

pub(super) fn encode(p: &Packet) -> Vec<u8> {
    let mut out = Vec::new();
    packet::encode(p, Version::V3_1_1, &mut out);
    out
}

pub(super) fn connect(addr: SocketAddr, client_id: &str) -> Result<(TcpStream, BufReader<TcpStream>), String> {
    connect_as(addr, client_id, None)
}

/// Connects with a user name (for `mqvisor serve`: `TENANT:USER`).
pub(super) fn connect_as(
    addr: SocketAddr,
    client_id: &str,
    username: Option<&str>,
) -> Result<(TcpStream, BufReader<TcpStream>), String> {
    connect_with(addr, client_id, username, true)
}

fn connect_with(
    addr: SocketAddr,
    client_id: &str,
    username: Option<&str>,
    clean: bool,
) -> Result<(TcpStream, BufReader<TcpStream>), String> {
    let stream = TcpStream::connect(addr).map_err(io_err)?;
    stream.set_nodelay(true).map_err(io_err)?;
    let c = Connect {
        version: Version::V3_1_1,
        clean_start: clean,
        keep_alive: 60,
        properties: Properties::default(),
        client_id: client_id.into(),
        will: None,
        username: username.map(Into::into),
        password: None,
    };
    let mut w = stream.try_clone().map_err(io_err)?;
    w.write_all(&encode(&Packet::Connect(Box::new(c)))).map_err(io_err)?;
    let mut reader = BufReader::with_capacity(256 * 1024, stream.try_clone().map_err(io_err)?);
    let mut buf = Vec::new();
    match read_packet(&mut reader, &mut buf).map_err(io_err)? {
        Packet::Connack(c) if c.code == 0 => Ok((stream, reader)),
        other => Err(format!("{client_id}: expected CONNACK, got {other:?}")),
    }
}

fn ack(id: u16) -> Ack {
    Ack { packet_id: id, code: 0, properties: Properties::default() }
}

/// Runs one shape against `addr`.
pub fn run_shape(addr: SocketAddr, shape: Shape) -> Result<Figures, String> {
    run_shape_as(addr, shape, None)
}

/// Runs one shape against `addr`, every client with `username`.
pub fn run_shape_as(addr: SocketAddr, shape: Shape, username: Option<&str>) -> Result<Figures, String> {
    let expected = (shape.publishers * shape.messages * shape.subscribers) as u64;
    let received = Arc::new(AtomicU64::new(0));
    // Nanoseconds from `epoch` to the latest delivery.
    let last_delivery = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(usize::try_from(expected).unwrap_or(0))));
    let epoch = Instant::now();
    let ready = Arc::new(Barrier::new(shape.subscribers + 1));
    let mut subscribers = Vec::new();
    // Durable sessions outlive the run: each run has its own client ids.
    static RUN: AtomicU64 = AtomicU64::new(0);
    let run = RUN.fetch_add(1, Ordering::Relaxed);
    for i in 0..shape.subscribers {
        let id = format!("bench-sub-{}-{run}-{i}", std::process::id());
        let (mut stream, mut reader) = connect_with(addr, &id, username, !shape.durable)?;
        let (received, latencies, ready) = (received.clone(), latencies.clone(), ready.clone());
        let last_delivery = last_delivery.clone();
        subscribers.push(thread::spawn(move || -> Result<(), String> {
            let options =
                SubscriptionOptions { qos: shape.qos, no_local: false, retain_as_published: false, retain_handling: 0 };
            let s =
                Subscribe { packet_id: 1, properties: Properties::default(), filters: vec![(TOPIC.into(), options)] };
            stream.write_all(&encode(&Packet::Subscribe(s))).map_err(io_err)?;
            let mut buf = Vec::new();
            read_packet(&mut reader, &mut buf).map_err(io_err)?; // SUBACK
            ready.wait();
            stream.set_read_timeout(Some(Duration::from_secs(3))).map_err(io_err)?;
            let mut local = Vec::new();
            let mut writer = BufWriter::new(stream);
            // A read error is 3 quiet seconds: the run is over (or lost messages).
            while let Ok(packet) = read_packet(&mut reader, &mut buf) {
                match packet {
                    Packet::Publish(p) => {
                        let sent = u64::from_le_bytes(p.payload[..8].try_into().unwrap_or([0; 8]));
                        let now = u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
                        local.push(now.saturating_sub(sent) as f64 / 1e3);
                        last_delivery.fetch_max(now, Ordering::Relaxed);
                        match (p.qos, p.packet_id) {
                            (QoS::AtLeastOnce, Some(id)) => {
                                writer.write_all(&encode(&Packet::Puback(ack(id)))).map_err(io_err)?
                            }
                            (QoS::ExactlyOnce, Some(id)) => {
                                writer.write_all(&encode(&Packet::Pubrec(ack(id)))).map_err(io_err)?
                            }
                            _ => {}
                        }
                        let total = received.fetch_add(1, Ordering::Relaxed) + 1;
                        if reader.buffer().is_empty() {
                            writer.flush().map_err(io_err)?;
                        }
                        if total >= expected {
                            break;
                        }
                    }
                    Packet::Pubrel(a) => {
                        writer.write_all(&encode(&Packet::Pubcomp(ack(a.packet_id)))).map_err(io_err)?;
                        if reader.buffer().is_empty() {
                            writer.flush().map_err(io_err)?;
                        }
                    }
                    _ => {}
                }
                if received.load(Ordering::Relaxed) >= expected {
                    break;
                }
            }
            let _ = writer.flush();
            latencies.lock().map_err(io_err)?.extend(local);
            Ok(())
        }));
    }
    ready.wait();
    let started = Instant::now();
    let mut publishers = Vec::new();
    for i in 0..shape.publishers {
        let (stream, reader) = connect_as(addr, &format!("bench-pub-{i}"), username)?;
        publishers.push(thread::spawn(move || publish_all(stream, reader, shape, epoch, i)));
    }
    for p in publishers {
        p.join().map_err(|_| "publisher panicked")??;
    }
    for s in subscribers {
        s.join().map_err(|_| "subscriber panicked")??;
    }
    let got = received.load(Ordering::Relaxed);
    // Subscribers stop at the last message or after 3 quiet seconds: time
    // the run from the first publish to the last delivery.
    let mut lat = std::mem::take(&mut *latencies.lock().map_err(io_err)?);
    let start_ns = u64::try_from(started.duration_since(epoch).as_nanos()).unwrap_or(0);
    let elapsed = last_delivery.load(Ordering::Relaxed).saturating_sub(start_ns) as f64 / 1e9;
    lat.sort_by(f64::total_cmp);
    Ok(Figures {
        delivered_per_s: got as f64 / elapsed.max(1e-6),
        delivered_fraction: got as f64 / expected.max(1) as f64,
        p50_us: percentile(&lat, 0.5),
        p99_us: percentile(&lat, 0.99),
    })
}

fn publish_all(
    stream: TcpStream,
    mut reader: BufReader<TcpStream>,
    shape: Shape,
    epoch: Instant,
    me: usize,
) -> Result<(), String> {
    let template = |id: Option<u16>, seq: usize| {
        let mut payload = vec![0u8; PAYLOAD];
        let now = u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        payload[..8].copy_from_slice(&now.to_le_bytes());
        payload[8..16].copy_from_slice(&(seq as u64).to_le_bytes());
        payload[16] = u8::try_from(me % 256).unwrap_or(0);
        Packet::Publish(Publish {
            dup: false,
            qos: shape.qos,
            retain: false,
            topic: Arc::from(TOPIC),
            packet_id: id,
            properties: Default::default(),
            payload: Payload::from(payload),
        })
    };
    if shape.qos == QoS::AtMostOnce {
        let mut w = BufWriter::with_capacity(64 * 1024, stream);
        for seq in 0..shape.messages {
            w.write_all(&encode(&template(None, seq))).map_err(io_err)?;
        }
        w.flush().map_err(io_err)?;
        // A round trip proves the broker has read everything we sent.
        w.write_all(&encode(&Packet::Pingreq)).map_err(io_err)?;
        w.flush().map_err(io_err)?;
        let mut buf = Vec::new();
        while !matches!(read_packet(&mut reader, &mut buf).map_err(io_err)?, Packet::Pingresp) {}
        return Ok(());
    }
    // QoS 1/2: a window of WINDOW unacknowledged messages.
    let writer = Arc::new(Mutex::new(stream));
    let (permits_tx, permits_rx) = mpsc::sync_channel::<()>(WINDOW);
    let ack_writer = writer.clone();
    let qos = shape.qos;
    let messages = shape.messages;
    let acks = thread::spawn(move || -> Result<(), String> {
        let mut buf = Vec::new();
        let mut done = 0;
        while done < messages {
            match read_packet(&mut reader, &mut buf).map_err(io_err)? {
                Packet::Puback(_) if qos == QoS::AtLeastOnce => {
                    done += 1;
                    let _ = permits_rx.recv();
                }
                Packet::Pubrec(a) => {
                    let mut w = ack_writer.lock().map_err(io_err)?;
                    w.write_all(&encode(&Packet::Pubrel(ack(a.packet_id)))).map_err(io_err)?;
                }
                Packet::Pubcomp(_) => {
                    done += 1;
                    let _ = permits_rx.recv();
                }
                _ => {}
            }
        }
        Ok(())
    });
    for seq in 0..shape.messages {
        permits_tx.send(()).map_err(|_| "acknowledgement reader ended")?;
        let id = u16::try_from(seq % 65_535 + 1).unwrap_or(1);
        let bytes = encode(&template(Some(id), seq));
        writer.lock().map_err(io_err)?.write_all(&bytes).map_err(io_err)?;
    }
    acks.join().map_err(|_| "ack reader panicked")?
}

/// A broker under test, stopped when dropped.
pub(super) struct Target {
    pub(super) name: &'static str,
    pub(super) addr: SocketAddr,
    pub(super) child: Child,
    pub(super) _config_dir: Option<std::path::PathBuf>,
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) on our own child with a valid signal.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let _ = self.child.wait();
        if let Some(dir) = &self._config_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

pub(super) fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(io_err)?;
    Ok(l.local_addr().map_err(io_err)?.port())
}

fn wait_listening(addr: SocketAddr) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(50));
    }
    Err(format!("nothing listening on {addr}"))
}

pub(super) fn start_mosquitto(extra_conf: &str) -> Result<Target, String> {
    let port = free_port()?;
    let dir = std::env::temp_dir().join(format!("mqvisor-bench-mosquitto-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(io_err)?;
    let conf = dir.join("mosquitto.conf");
    // The same limits as the mqvisor targets get (see `mqtt`).
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages {QUEUE}\n\
             max_inflight_messages {WINDOW}\npersistence false\nlog_dest none\n{extra_conf}"
        ),
    )
    .map_err(io_err)?;
    let binary =
        ["/usr/sbin/mosquitto", "mosquitto"].into_iter().find(|b| Path::new(b).exists()).unwrap_or("mosquitto");
    let child = Command::new(binary)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting mosquitto (apt-get install mosquitto): {e}"))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let target = Target { name: "mosquitto", addr, child, _config_dir: Some(dir) };
    wait_listening(addr)?;
    Ok(target)
}

pub(super) fn start_mqvisor(exe: &Path, name: &'static str, args: &[&str]) -> Result<Target, String> {
    let port = free_port()?;
    let listen = format!("127.0.0.1:{port}");
    let child = Command::new(exe)
        .args(args)
        .args(["--listen", &listen])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", exe.display()))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let target = Target { name, addr, child, _config_dir: None };
    wait_listening(addr)?;
    Ok(target)
}

/// The shapes of the issue: 1->1, 10->1, 1->100 at QoS 0, 1, 2.
pub fn shapes(scale: f64) -> Vec<Shape> {
    // scale is in (0, 100]: the product is positive and far below usize::MAX.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let n = |base: usize| ((base as f64 * scale) as usize).max(10);
    let mut out = Vec::new();
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        let per = match qos {
            QoS::AtMostOnce => 100_000,
            QoS::AtLeastOnce => 20_000,
            QoS::ExactlyOnce => 10_000,
        };
        out.push(Shape { publishers: 1, subscribers: 1, qos, messages: n(per), durable: false });
        out.push(Shape { publishers: 10, subscribers: 1, qos, messages: n(per / 10), durable: false });
        out.push(Shape { publishers: 1, subscribers: 100, qos, messages: n(per / 100), durable: false });
    }
    out
}

/// Runs every shape against every target and prints the comparison.
pub fn mqtt(exe: &Path, scale: f64, include_vm: bool, memory_mib: u32) -> Result<(), String> {
    let memory = memory_mib.to_string();
    let queue = QUEUE.to_string();
    let limits = ["--max-queued-messages", &queue];
    let mut targets =
        vec![start_mosquitto("")?, start_mqvisor(exe, "mqvisor host", &[&["broker"][..], &limits].concat())?];
    if include_vm {
        let args = [&["run", "--service", "mqtt", "--memory", &memory][..], &limits].concat();
        targets.push(start_mqvisor(exe, "mqvisor VM", &args)?);
    }
    println!(
        "MQTT benchmark: 100-byte payloads, MQTT 3.1.1, inflight window {WINDOW}, queues {QUEUE}; \
         delivered messages/s from first publish to last delivery"
    );
    println!(
        "{:<14} {:<3} {:>6} | {:<13} {:>11} {:>7} {:>9} {:>9} {:>7}",
        "topology", "QoS", "msgs", "target", "msg/s", "deliv", "p50 us", "p99 us", "vs mosq"
    );
    for shape in shapes(scale) {
        let mut anchor = None;
        for target in &targets {
            eprintln!(
                "bench mqtt: {} {}->{} QoS {} ...",
                target.name, shape.publishers, shape.subscribers, shape.qos as u8
            );
            let f = run_shape(target.addr, shape)?;
            let anchor_rate = *anchor.get_or_insert(f.delivered_per_s);
            println!(
                "{:<14} {:<3} {:>6} | {:<13} {:>11.0} {:>6.1}% {:>9.0} {:>9.0} {:>6.2}x",
                format!("{}->{}", shape.publishers, shape.subscribers),
                shape.qos as u8,
                shape.publishers * shape.messages,
                target.name,
                f.delivered_per_s,
                f.delivered_fraction * 100.0,
                f.p50_us,
                f.p99_us,
                f.delivered_per_s / anchor_rate
            );
        }
    }
    Ok(())
}
