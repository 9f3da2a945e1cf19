//! `mqvisor bench mqtt`: MQTT throughput (and latency), mqvisor beside
//! Mosquitto, and rumqttd when it is installed, on the same machine in the
//! same run.
//!
//! Two load generators. The own one is built on the broker crate's codec:
//! blocking sockets, one thread per client, MQTT 3.1.1; publishers stamp
//! each 100-byte payload with its send time, subscribers count messages and
//! record latencies. The other is libmosquitto's command-line clients
//! (`mosquitto_pub -l`, `mosquitto_sub -C`, see `mosquitto_clients`). By
//! default both drive five shapes (QoS 0/1/2 1->1, QoS 0/1 1->20), best of
//! two runs, against Mosquitto (started here from the Debian binary, the
//! anchor), rumqttd, the host-native runner (`mqvisor broker`) and a tenant
//! VM (`mqvisor run --stats`, whose exits per delivered message are
//! printed), each server started fresh per shape; `--shapes topologies`
//! keeps the own client's 1->1, 10->1 and 1->100 at QoS 0, 1 and 2 with
//! p50/p99 latency. Prints figures and ratios; never judges them.

use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
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

use super::mosquitto_clients::{self, Delivery, Endpoint, cpu_seconds, have_program, rusage_seconds};
use super::percentile;
use crate::cli::{MqttClients, MqttShapes};

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
    /// Messages per second offered by all publishers together, each on a
    /// schedule; `None`: as fast as each publisher's window allows. A
    /// latency compares brokers only at the same offered rate: unpaced,
    /// the one that takes publishes faster than its subscriber drains
    /// them shows its backlog as latency.
    pub rate: Option<f64>,
}

/// Sleeps until the `seq`th message of a publisher sending one every
/// `every` since `started` is due (no sleep when it is already late, so a
/// publisher behind its schedule catches up in a burst).
fn wait_turn(every: Option<Duration>, started: Instant, seq: usize) {
    if let Some(every) = every {
        let due = started + every.mul_f64(seq as f64);
        let now = Instant::now();
        if due > now {
            thread::sleep(due - now);
        }
    }
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
    let every = shape.rate.map(|rate| Duration::from_secs_f64(shape.publishers as f64 / rate));
    let started = Instant::now();
    if shape.qos == QoS::AtMostOnce {
        let mut w = BufWriter::with_capacity(64 * 1024, stream);
        for seq in 0..shape.messages {
            if every.is_some() {
                w.flush().map_err(io_err)?;
                wait_turn(every, started, seq);
            }
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
        wait_turn(every, started, seq);
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

/// The shapes of `--shapes topologies`: 1->1, 10->1, 1->100 at QoS 0, 1, 2.
pub fn shapes(scale: f64) -> Vec<Shape> {
    let mut out = Vec::new();
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        let per = match qos {
            QoS::AtMostOnce => 100_000,
            QoS::AtLeastOnce => 20_000,
            QoS::ExactlyOnce => 10_000,
        };
        out.push(Shape {
            publishers: 1,
            subscribers: 1,
            qos,
            messages: scaled(per, scale),
            durable: false,
            rate: None,
        });
        out.push(Shape {
            publishers: 10,
            subscribers: 1,
            qos,
            messages: scaled(per / 10, scale),
            durable: false,
            rate: None,
        });
        out.push(Shape {
            publishers: 1,
            subscribers: 100,
            qos,
            messages: scaled(per / 100, scale),
            durable: false,
            rate: None,
        });
    }
    out
}

/// `base` times `scale`, at least 10.
fn scaled(base: usize, scale: f64) -> usize {
    // scale is in (0, 100]: the product is positive and far below usize::MAX.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let n = (base as f64 * scale) as usize;
    n.max(10)
}

/// The settings of one `mqvisor bench mqtt` run.
pub struct Options {
    pub scale: f64,
    pub include_vm: bool,
    pub memory_mib: u32,
    pub clients: MqttClients,
    pub shapes: MqttShapes,
}

/// Runs `bench mqtt` as `o` asks and prints the comparison.
pub fn mqtt(exe: &Path, o: &Options) -> Result<(), String> {
    match (o.shapes, o.clients) {
        (MqttShapes::Topologies, MqttClients::Mosquitto) => {
            Err("--shapes topologies is measured with the own client only (--clients own)".into())
        }
        (MqttShapes::Topologies, _) => topologies(exe, o.scale, o.include_vm, o.memory_mib),
        (MqttShapes::Quotas, _) => quotas(exe, o.scale, o.memory_mib),
        (MqttShapes::Five, clients) => five(exe, o, clients),
    }
}

/// Every topology against Mosquitto, the runner and a VM with the own
/// client, with latency percentiles.
fn topologies(exe: &Path, scale: f64, include_vm: bool, memory_mib: u32) -> Result<(), String> {
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

/// Quotas far above any load this machine makes: every limit is checked,
/// none is ever reached.
const HIGH_QUOTAS: [&str; 10] = [
    "--max-publish-rate",
    "100000000",
    "--max-client-publish-rate",
    "100000000",
    "--max-ingress-bytes-rate",
    "1000000000000",
    "--max-egress-bytes-rate",
    "1000000000000",
    "--max-connection-rate",
    "1000000",
];

/// `--shapes quotas`: QoS 0 1->1 (the own client) through a VM without
/// quotas and one with [`HIGH_QUOTAS`], alternating, best of three each:
/// the rate limiter's cost when it limits nothing.
fn quotas(exe: &Path, scale: f64, memory_mib: u32) -> Result<(), String> {
    let memory = memory_mib.to_string();
    let queue = QUEUE.to_string();
    let base = ["run", "--service", "mqtt", "--memory", &memory, "--max-queued-messages", &queue];
    let shape = Shape {
        publishers: 1,
        subscribers: 1,
        qos: QoS::AtMostOnce,
        messages: scaled(2_000_000, scale),
        durable: false,
        rate: None,
    };
    let unlimited = start_mqvisor(exe, "no quota", &base)?;
    let limited = start_mqvisor(exe, "high quotas", &[&base[..], &HIGH_QUOTAS].concat())?;
    let (mut best_none, mut best_high) = (0.0f64, 0.0f64);
    for round in 1..=3 {
        eprintln!("bench mqtt: quotas, round {round} of 3 ...");
        best_none = best_none.max(run_shape(unlimited.addr, shape)?.delivered_per_s);
        best_high = best_high.max(run_shape(limited.addr, shape)?.delivered_per_s);
    }
    println!(
        "Rate limiter's cost: QoS 0 1->1, {} 100-byte messages through a tenant VM, best of 3 (own client)",
        shape.messages
    );
    println!("{:<40} {:>11}", "tenant VM", "msg/s");
    println!("{:<40} {:>11.0}", "no quota set", best_none);
    println!("{:<40} {:>11.0}", "every quota set, far above the load", best_high);
    println!("{:<40} {:>10.1}%", "cost of the limiter", (1.0 - best_high / best_none) * 100.0);
    Ok(())
}

// ---------------------------------------------------------------------------
// The five shapes, with the own client and with libmosquitto's.

/// Subscribers of the fan-out shapes.
const FAN_OUT: usize = 20;

/// One of the five shapes: one publisher, 100-byte messages.
#[derive(Debug, Clone, Copy)]
struct Case {
    qos: QoS,
    subscribers: usize,
    messages: usize,
}

impl Case {
    fn label(&self) -> String {
        format!("QoS {} 1->{}", self.qos as u8, self.subscribers)
    }
}

/// QoS 0/1/2 1->1 and QoS 0/1 1->20.
fn cases(scale: f64) -> Vec<Case> {
    let case = |qos, subscribers, base| Case { qos, subscribers, messages: scaled(base, scale) };
    vec![
        case(QoS::AtMostOnce, 1, 50_000),
        case(QoS::AtLeastOnce, 1, 10_000),
        case(QoS::ExactlyOnce, 1, 5_000),
        case(QoS::AtMostOnce, FAN_OUT, 5_000),
        case(QoS::AtLeastOnce, FAN_OUT, 1_000),
    ]
}

/// The servers of the comparison, in the order of the tables' columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Server {
    Mosquitto,
    Rumqttd,
    Broker,
    Vm,
}

impl Server {
    fn name(self) -> &'static str {
        match self {
            Server::Mosquitto => "Mosquitto",
            Server::Rumqttd => "rumqttd",
            Server::Broker => "mqvisor broker",
            Server::Vm => "tenant VM",
        }
    }
}

/// The load generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Own,
    Mosquitto,
}

impl Kind {
    fn title(self) -> &'static str {
        match self {
            Kind::Own => {
                "mqvisor's own client (one thread per client, 64 KiB write batches at QoS 0, window 20 at QoS 1/2, \
                 timed from the first publish to the last delivery)"
            }
            Kind::Mosquitto => {
                "libmosquitto's clients (mosquitto_pub -l, mosquitto_sub -C; timed from the first delivery to the last)"
            }
        }
    }
}

/// `rumqttd` on PATH or in ~/.cargo/bin (where `cargo install` puts it).
fn find_rumqttd() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let cargo = std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo/bin"));
    std::env::split_paths(&path).chain(cargo).map(|dir| dir.join("rumqttd")).find(|p| p.is_file())
}

/// rumqttd with a v4 (MQTT 3.1.1) listener on 127.0.0.1 and limits high
/// enough not to throttle: it reads up to 1000 packets of a connection per
/// batch, forwards up to 200 per batch, and keeps 10 x 100 MiB of log per
/// topic.
fn start_rumqttd(binary: &Path) -> Result<Target, String> {
    let port = free_port()?;
    let dir = std::env::temp_dir().join(format!("mqvisor-bench-rumqttd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(io_err)?;
    let conf = dir.join("rumqttd.toml");
    std::fs::write(
        &conf,
        format!(
            "id = 0\n\n[router]\nid = 0\nmax_connections = 1000\nmax_outgoing_packet_count = 200\n\
             max_segment_size = 104857600\nmax_segment_count = 10\n\n[v4.1]\nname = \"v4-1\"\n\
             listen = \"127.0.0.1:{port}\"\nnext_connection_delay_ms = 0\n\
             [v4.1.connections]\nconnection_timeout_ms = 60000\nmax_payload_size = 20480\n\
             max_inflight_count = 1000\ndynamic_filters = true\n"
        ),
    )
    .map_err(io_err)?;
    let child = Command::new(binary)
        .arg("--quiet")
        .arg("--config")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", binary.display()))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let target = Target { name: "rumqttd", addr, child, _config_dir: Some(dir) };
    wait_listening(addr)?;
    Ok(target)
}

/// The VM's counters at its end (`mqvisor run --stats`).
#[derive(Debug, Clone, Copy, Default)]
struct VmStats {
    exits: u64,
    notifications: u64,
    /// virtio-net frames, both directions.
    frames: u64,
}

impl VmStats {
    fn minus(self, other: VmStats) -> VmStats {
        VmStats {
            exits: self.exits.saturating_sub(other.exits),
            notifications: self.notifications.saturating_sub(other.notifications),
            frames: self.frames.saturating_sub(other.frames),
        }
    }
}

/// Reads the `mqvisor: stats:` line: exits and notifications as `bench
/// echo` reads them, and the frame counts beside them.
fn parse_vm_stats(line: &str) -> Option<VmStats> {
    let counters = super::echo::parse_stats(line)?;
    let frames = |key: &str| {
        let at = line.find(key)? + key.len();
        line[at..].split(|c: char| !c.is_ascii_digit()).next()?.parse::<u64>().ok()
    };
    Some(VmStats {
        exits: counters.exits,
        notifications: counters.notifications,
        frames: frames("guest tx ").unwrap_or(0) + frames("guest rx ").unwrap_or(0),
    })
}

/// A started server; a VM's stderr is read for its stats line.
struct Running {
    target: Target,
    stats: Option<thread::JoinHandle<Option<VmStats>>>,
}

impl Running {
    /// Stops the server; a VM's counters.
    fn stop(self) -> Option<VmStats> {
        let Running { target, stats } = self;
        let stats = stats.and_then(|reader| {
            if let Ok(pid) = libc::pid_t::try_from(target.child.id()) {
                // SAFETY: kill(2) on our own child (not yet reaped) with a valid signal.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            // The pipe ends when the VM has exited.
            reader.join().ok().flatten()
        });
        drop(target);
        stats
    }
}

/// Starts `server` fresh, with the same queue limit for each.
fn start(exe: &Path, server: Server, rumqttd: Option<&Path>, memory_mib: u32) -> Result<Running, String> {
    let queue = QUEUE.to_string();
    let limits = ["--max-queued-messages", queue.as_str()];
    let target = match server {
        Server::Mosquitto => start_mosquitto("")?,
        Server::Rumqttd => start_rumqttd(rumqttd.ok_or("rumqttd is not installed")?)?,
        Server::Broker => start_mqvisor(exe, "mqvisor broker", &[&["broker"][..], &limits].concat())?,
        Server::Vm => return start_vm_with_stats(exe, memory_mib),
    };
    Ok(Running { target, stats: None })
}

/// `mqvisor run --stats`, as `bench mqtt` starts a tenant VM otherwise,
/// its stderr drained by a thread that keeps the stats line.
fn start_vm_with_stats(exe: &Path, memory_mib: u32) -> Result<Running, String> {
    let port = free_port()?;
    let (memory, queue, listen) = (memory_mib.to_string(), QUEUE.to_string(), format!("127.0.0.1:{port}"));
    let mut child = Command::new(exe)
        .args(["run", "--service", "mqtt", "--memory", &memory, "--max-queued-messages", &queue, "--stats"])
        .args(["--listen", &listen])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", exe.display()))?;
    let stderr = child.stderr.take().ok_or("no stderr pipe")?;
    let stats = thread::spawn(move || {
        BufReader::new(stderr).lines().map_while(Result::ok).filter_map(|l| parse_vm_stats(&l)).last()
    });
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let target = Target { name: "tenant VM", addr, child, _config_dir: None };
    wait_listening(addr)?;
    Ok(Running { target, stats: Some(stats) })
}

/// One shape against one server with one kind of client, over both runs.
#[derive(Debug, Clone, Copy, Default)]
struct Cell {
    /// The better of the two runs.
    per_s: f64,
    /// The worse of the two runs' delivered fractions.
    fraction: f64,
    /// Messages delivered in both runs.
    delivered: f64,
    client_cpu_s: Option<f64>,
    server_cpu_s: Option<f64>,
    /// The VM's counters over both runs, an idle VM's start and stop subtracted.
    vm: Option<VmStats>,
    /// libmosquitto's clients: what the better run delivered, counted.
    check: Option<Delivery>,
}

/// What every measurement shares.
struct Setup<'a> {
    exe: &'a Path,
    rumqttd: Option<&'a Path>,
    memory_mib: u32,
    /// An idle VM's counters, subtracted from each VM's.
    idle_vm: Option<VmStats>,
    /// Where `mosquitto_pub -l`'s input is written.
    dir: &'a Path,
}

/// Runs `case` twice against a fresh `server` with `kind` clients.
fn measure(setup: &Setup, server: Server, kind: Kind, case: Case) -> Result<Cell, String> {
    let running = start(setup.exe, server, setup.rumqttd, setup.memory_mib)?;
    let (addr, pid) = (running.target.addr, running.target.child.id());
    let server_before = cpu_seconds(pid);
    let mut cell = Cell { fraction: f64::INFINITY, client_cpu_s: Some(0.0), ..Cell::default() };
    for _ in 0..2 {
        let (per_s, fraction, delivered, client_cpu, check) = match kind {
            Kind::Own => {
                let before = rusage_seconds(libc::RUSAGE_SELF);
                let shape = Shape {
                    publishers: 1,
                    subscribers: case.subscribers,
                    qos: case.qos,
                    messages: case.messages,
                    durable: false,
                    rate: None,
                };
                let f = run_shape(addr, shape)?;
                let cpu = before.zip(rusage_seconds(libc::RUSAGE_SELF)).map(|(a, b)| b - a);
                let delivered = f.delivered_fraction * (case.messages * case.subscribers) as f64;
                (f.delivered_per_s, f.delivered_fraction, delivered, cpu, None)
            }
            Kind::Mosquitto => {
                let endpoint = Endpoint { addr, ca: None };
                let d = mosquitto_clients::run(endpoint, case.qos, case.subscribers, case.messages, setup.dir)?;
                (d.per_s, d.fraction(), d.delivered as f64, d.client_cpu_s, Some(d))
            }
        };
        if per_s > cell.per_s {
            cell.per_s = per_s;
            cell.check = check;
        }
        cell.fraction = cell.fraction.min(fraction);
        cell.delivered += delivered;
        cell.client_cpu_s = cell.client_cpu_s.zip(client_cpu).map(|(a, b)| a + b);
    }
    cell.server_cpu_s = server_before.zip(cpu_seconds(pid)).map(|(a, b)| b - a);
    let stats = running.stop();
    cell.vm = stats.zip(setup.idle_vm).map(|(busy, idle)| busy.minus(idle));
    Ok(cell)
}

/// What every kind measured: `cells[kind][case][server]`.
type Grid = Vec<Vec<Vec<Option<Cell>>>>;

/// The five shapes against every server with each kind of client.
fn five(exe: &Path, o: &Options, clients: MqttClients) -> Result<(), String> {
    let kinds = match clients {
        MqttClients::Own => vec![Kind::Own],
        MqttClients::Mosquitto => vec![Kind::Mosquitto],
        MqttClients::Both => vec![Kind::Own, Kind::Mosquitto],
    };
    if kinds.contains(&Kind::Mosquitto) {
        for (program, package) in [("mosquitto_pub", "mosquitto-clients"), ("mosquitto_sub", "mosquitto-clients")] {
            if !have_program(program) {
                return Err(format!("`{program}` not found: apt-get install {package}"));
            }
        }
    }
    let rumqttd = find_rumqttd();
    let mut servers = vec![Server::Mosquitto];
    if rumqttd.is_some() {
        servers.push(Server::Rumqttd);
    } else {
        println!("rumqttd not found on PATH or in ~/.cargo/bin (cargo install rumqttd): no rumqttd column");
    }
    servers.push(Server::Broker);
    if o.include_vm {
        servers.push(Server::Vm);
    }
    let cases = cases(o.scale);
    let dir = std::env::temp_dir().join(format!("mqvisor-bench-mqtt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(io_err)?;
    let result = (|| {
        // An idle VM's start, listening probe and stop: subtracted from each shape's counters.
        let idle_vm = if o.include_vm { start_vm_with_stats(exe, o.memory_mib)?.stop() } else { None };
        let setup = Setup { exe, rumqttd: rumqttd.as_deref(), memory_mib: o.memory_mib, idle_vm, dir: &dir };
        let mut grid: Grid = Vec::new();
        for &kind in &kinds {
            let mut rows = Vec::new();
            for &case in &cases {
                let mut row = Vec::new();
                for &server in &servers {
                    eprintln!("bench mqtt: {:?} clients, {}, {} ...", kind, case.label(), server.name());
                    let cell = measure(&setup, server, kind, case)?;
                    row.push(Some(cell));
                }
                rows.push(row);
            }
            grid.push(rows);
        }
        Ok::<_, String>(grid)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    let grid = result?;
    println!(
        "MQTT benchmark: one publisher, 100-byte payloads, MQTT 3.1.1, best of two runs, each server started \
         fresh per shape; inflight window {WINDOW}, queues {QUEUE}; delivered messages/s"
    );
    println!(
        "messages per publisher: {}",
        cases.iter().map(|c| format!("{} {}", c.label(), c.messages)).collect::<Vec<_>>().join(", ")
    );
    for (kind, rows) in kinds.iter().zip(&grid) {
        print_kind(*kind, &cases, &servers, rows);
    }
    if o.include_vm {
        print_vm_counters(&kinds, &cases, &servers, &grid);
    }
    if kinds.len() == 2 {
        explain(&cases, &servers, &grid);
    }
    Ok(())
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    }
}

fn rate_of(row: &[Option<Cell>], servers: &[Server], which: Server) -> Option<f64> {
    servers.iter().position(|s| *s == which).and_then(|i| row[i]).map(|c| c.per_s)
}

/// The throughput table, deliveries, and CPU per message of one kind.
fn print_kind(kind: Kind, cases: &[Case], servers: &[Server], rows: &[Vec<Option<Cell>>]) {
    println!();
    println!("Clients: {}", kind.title());
    let mut header = format!("{:<12}", "shape");
    for s in servers {
        header += &format!(" {:>14}", s.name());
    }
    header += &format!(" {:>8} {:>10} {:>9}", "VM/mosq", "VM/rumqttd", "VM/broker");
    println!("{header}");
    for (case, row) in cases.iter().zip(rows) {
        let mut line = format!("{:<12}", case.label());
        for cell in row {
            line += &format!(" {:>14}", cell.map_or("-".into(), |c| format!("{:.0}", c.per_s)));
        }
        let vm = rate_of(row, servers, Server::Vm);
        line += &format!(
            " {:>8} {:>10} {:>9}",
            ratio(vm, rate_of(row, servers, Server::Mosquitto)),
            ratio(vm, rate_of(row, servers, Server::Rumqttd)),
            ratio(vm, rate_of(row, servers, Server::Broker))
        );
        println!("{line}");
    }
    // What arrived: every shortfall, and the generator check of QoS 0 1->1.
    let mut losses = Vec::new();
    for (case, row) in cases.iter().zip(rows) {
        for (server, cell) in servers.iter().zip(row) {
            let Some(c) = cell else { continue };
            let checked = c.check.filter(|_| case.qos == QoS::AtMostOnce && case.subscribers == 1);
            if let Some(d) = checked {
                println!(
                    "generator check, {} on {}: {} of {} delivered, {} missing, {} duplicated, {} out of order",
                    case.label(),
                    server.name(),
                    d.delivered - d.duplicates,
                    d.expected,
                    d.missing,
                    d.duplicates,
                    d.reordered
                );
            } else if c.fraction < 1.0 || c.check.is_some_and(|d| d.duplicates + d.reordered > 0) {
                losses.push(format!("{} on {}: {:.2}% delivered", case.label(), server.name(), c.fraction * 100.0));
            }
        }
    }
    if losses.is_empty() {
        println!("delivered: every expected message of the other shapes, in both runs");
    } else {
        println!("delivered (the worse run): {}", losses.join("; "));
    }
    println!("CPU per delivered message, microseconds, clients + server (both runs):");
    for (case, row) in cases.iter().zip(rows) {
        let cells: Vec<String> = servers
            .iter()
            .zip(row)
            .map(|(server, cell)| {
                let per = |cpu: Option<f64>| {
                    cell.and_then(|c| cpu.map(|s| s * 1e6 / c.delivered.max(1.0)))
                        .map_or("-".to_string(), |us| format!("{us:.1}"))
                };
                let cell_ref = cell.as_ref();
                format!(
                    "{} {} + {}",
                    server.name(),
                    per(cell_ref.and_then(|c| c.client_cpu_s)),
                    per(cell_ref.and_then(|c| c.server_cpu_s))
                )
            })
            .collect();
        println!("  {:<12} {}", case.label(), cells.join(", "));
    }
}

/// The tenant VM's exits, queue notifications and virtio-net frames per
/// delivered message, for each shape and kind of client.
fn print_vm_counters(kinds: &[Kind], cases: &[Case], servers: &[Server], grid: &Grid) {
    let Some(vm) = servers.iter().position(|s| *s == Server::Vm) else { return };
    println!();
    println!(
        "Tenant VM per delivered message (mqvisor run --stats, both runs, an idle VM's start and stop subtracted): \
         exits to the VMM / queue notifications / virtio-net frames"
    );
    let mut header = format!("{:<12}", "shape");
    for kind in kinds {
        header += &format!(" {:>28}", format!("{kind:?} clients"));
    }
    println!("{header}");
    for (i, case) in cases.iter().enumerate() {
        let mut line = format!("{:<12}", case.label());
        for rows in grid {
            let text = rows[i][vm].and_then(|c| c.vm.map(|s| (s, c.delivered))).map_or("-".into(), |(s, n)| {
                let per = |v: u64| v as f64 / n.max(1.0);
                format!("{:.3} / {:.3} / {:.3}", per(s.exits), per(s.notifications), per(s.frames))
            });
            line += &format!(" {text:>28}");
        }
        println!("{line}");
    }
}

/// Why the two generators disagree, with the figures of this run.
fn explain(cases: &[Case], servers: &[Server], grid: &Grid) {
    let Some(i) = cases.iter().position(|c| c.qos == QoS::AtMostOnce && c.subscribers == 1) else { return };
    let (own, lib) = (&grid[0][i], &grid[1][i]);
    let cell = |row: &Vec<Option<Cell>>, s: Server| servers.iter().position(|x| *x == s).and_then(|k| row[k]);
    let fmt = |v: Option<f64>, digits: usize| v.map_or("-".to_string(), |v| format!("{v:.digits$}"));
    let rate = |row, s| fmt(cell(row, s).map(|c| c.per_s), 0);
    let per_msg = |c: Cell, v: Option<f64>, scale: f64| v.map(|v| v * scale / c.delivered.max(1.0));
    let server_us = |row, s| fmt(cell(row, s).and_then(|c| per_msg(c, c.server_cpu_s, 1e6)), 1);
    let client_us = |row, s| fmt(cell(row, s).and_then(|c| per_msg(c, c.client_cpu_s, 1e6)), 1);
    let vm = |row, f: fn(VmStats) -> u64| {
        fmt(cell(row, Server::Vm).and_then(|c| per_msg(c, c.vm.map(|s| f(s) as f64), 1.0)), 3)
    };
    let vm_ratio = |row| ratio(cell(row, Server::Vm).map(|c| c.per_s), cell(row, Server::Mosquitto).map(|c| c.per_s));
    println!();
    println!(
        "Why the generators differ (QoS 0 1->1 of this run): the tenant VM did {} of Mosquitto's rate with the own \
         client and {} with libmosquitto's. Mosquitto spends about the same CPU per message under both ({} and {} \
         us), so its rate hardly moves ({} and {} msg/s). The tenant VM spends \
         {} and {} us, so its rate is set by the clients. The own publisher encodes into a 64 KiB buffer and writes \
         hundreds of PUBLISH packets per send(), its subscriber parses them out of a 256 KiB read buffer: {} us of \
         client CPU per message, and the VM got {} msg/s. mosquitto_pub -l reads a line with fgets and calls \
         mosquitto_publish for it; the library's network thread writes each packet with a send() of its own \
         (Nagle's algorithm on: --nodelay is not given), with no window at QoS 0 and at most 20 unacknowledged \
         messages at QoS 1/2 (-M, 20 by default); mosquitto_sub reads each packet in several reads (header byte, \
         length, body) and writes and flushes every message to its stdout (strace -c: about 4 reads, 3 writes and \
         a pselect per QoS 1 message). Those clients spent {} us of CPU per message, and the VM got {} msg/s. \
         Their small writes also reach the VM as more, smaller segments: {} against {} virtio-net frames and {} \
         against {} exits per delivered message. So the own client measures the servers' capacity and the gap \
         between their costs per message; libmosquitto's measures what such a client sees, where a cheaper \
         server gains only until the clients are the bottleneck.",
        vm_ratio(own),
        vm_ratio(lib),
        server_us(own, Server::Mosquitto),
        server_us(lib, Server::Mosquitto),
        rate(own, Server::Mosquitto),
        rate(lib, Server::Mosquitto),
        server_us(own, Server::Vm),
        server_us(lib, Server::Vm),
        client_us(own, Server::Vm),
        rate(own, Server::Vm),
        client_us(lib, Server::Vm),
        rate(lib, Server::Vm),
        vm(lib, |s| s.frames),
        vm(own, |s| s.frames),
        vm(lib, |s| s.exits),
        vm(own, |s| s.exits),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_frames_beside_exits() {
        let line = "mqvisor: stats: exits 1849 (port I/O 1803, MMIO 46, other 0), queue notifications 22976, \
                    guest tx 12157 frames / 134874231 bytes, guest rx 10753 frames / 134798417 bytes, refused chains 0";
        let s = parse_vm_stats(line);
        assert_eq!(s.map(|s| (s.exits, s.notifications, s.frames)), Some((1849, 22976, 12157 + 10753)));
        assert!(parse_vm_stats("mqvisor: tenant VM listening on 127.0.0.1:1").is_none());
    }

    #[test]
    fn five_shapes_with_fan_out_to_twenty() {
        let c = cases(1.0);
        let labels: Vec<String> = c.iter().map(Case::label).collect();
        assert_eq!(labels, ["QoS 0 1->1", "QoS 1 1->1", "QoS 2 1->1", "QoS 0 1->20", "QoS 1 1->20"]);
        assert!(cases(0.000_001).iter().all(|c| c.messages == 10));
    }
}
