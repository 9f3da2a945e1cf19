//! `mqvisor bench state`: what durable state costs and how fast it comes
//! back, beside Mosquitto in the same run.
//!
//! Owns three measurements: QoS 1 1->1 and 10->1 to durable subscribers
//! with `--persistence sync`, `batch` and `off` beside Mosquitto with and
//! without `persistence true` (Mosquitto saves its database periodically,
//! every `autosave_interval`, and at exit: it acknowledges messages that a
//! crash loses), with the VM's flushes per message, each shape as fast as
//! the publishers' windows allow and again paced at 80% of Mosquitto's
//! rate (latencies compare only at the same offered rate: unpaced, a
//! broker that takes publishes faster than its one subscriber's inflight
//! window drains them shows that backlog as latency); the time to recover N
//! retained messages after a restart, beside Mosquitto reloading its
//! database; and the state file's size against the live state it holds.

use std::io::{BufWriter, Write};
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mqvisor_broker::packet::{Packet, Payload, Publish, QoS};

use super::mqtt::{self, Shape, Target, encode, io_err, read_packet, start_mosquitto};

const RETAINED_PAYLOAD: usize = 16;

fn scratch(name: &str) -> Result<PathBuf, String> {
    let dir = std::env::temp_dir().join(format!("mqvisor-bench-state-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(io_err)?;
    // Mosquitto started as root drops to its own user, which must be able
    // to write its database here.
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).map_err(io_err)?;
    Ok(dir)
}

/// A tenant VM whose console and stderr go to files in `dir`.
fn start_vm(exe: &Path, name: &'static str, dir: &Path, args: &[&str]) -> Result<Target, String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(io_err)?.port();
    let file = |n: &str| std::fs::File::create(dir.join(n)).map_err(io_err);
    let child = Command::new(exe)
        .args(["run", "--stats", "--max-queued-messages", "100000"])
        .args(args)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::from(file("console.log")?))
        .stderr(Stdio::from(file("stderr.log")?))
        .spawn()
        .map_err(|e| format!("starting {}: {e}", exe.display()))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let target = Target { name, addr, child, _config_dir: None };
    wait_connack(addr, Duration::from_secs(120))?;
    Ok(target)
}

/// Stops a target (SIGTERM) and waits for it.
fn stop(mut target: Target) {
    if let Ok(pid) = libc::pid_t::try_from(target.child.id()) {
        // SAFETY: kill(2) on our own child with a valid signal.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let _ = target.child.wait();
}

/// Waits until `addr` answers a CONNECT; returns how long that took.
fn wait_connack(addr: SocketAddr, limit: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if mqtt::connect(addr, "bench-probe").is_ok() {
            return Ok(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Err(format!("no CONNACK from {addr} within {limit:?}"))
}

/// A number printed as `NAME N` in `text`, if any.
fn counter(text: &str, name: &str) -> Option<u64> {
    let at = text.rfind(name)? + name.len();
    text[at..].split_whitespace().next()?.trim_end_matches(',').parse().ok()
}

/// Mosquitto with and without persistence, and a VM with each of ours.
const TARGETS: [(&str, Option<&[&str]>); 5] = [
    ("mosquitto (no persistence)", None),
    ("mosquitto persistence true", None),
    ("VM --persistence off", Some(&[])),
    ("VM --persistence batch", Some(&["--persistence", "batch"])),
    ("VM --persistence sync", Some(&["--persistence", "sync"])),
];

/// One run of `shape` against a fresh target: its figures, and its flushes
/// per message ("-" for a target that does not say).
fn measure(
    exe: &Path,
    shape: Shape,
    name: &'static str,
    vm_args: Option<&[&str]>,
) -> Result<(mqtt::Figures, String), String> {
    let dir = scratch("throughput")?;
    let state = dir.join("tenant.state");
    let target = match vm_args {
        None if name.contains("true") => {
            start_mosquitto(&format!("persistence true\npersistence_location {}/\n", dir.display()))?
        }
        None => start_mosquitto("")?,
        Some([]) => start_vm(exe, name, &dir, &[])?,
        Some(args) => {
            let mut all = vec!["--state", state.to_str().unwrap_or("")];
            all.extend_from_slice(args);
            start_vm(exe, name, &dir, &all)?
        }
    };
    let f = mqtt::run_shape(target.addr, shape)?;
    stop(target);
    let stderr = std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
    let total = (shape.publishers * shape.messages) as f64;
    let flushes = match counter(&stderr, "flushes") {
        Some(flushes) => format!("{:.4}", flushes as f64 / total),
        None => "-".into(),
    };
    let _ = std::fs::remove_dir_all(&dir);
    Ok((f, flushes))
}

/// QoS 1 to durable subscribers, each persistence beside Mosquitto's.
fn throughput(exe: &Path, scale: f64) -> Result<(), String> {
    // scale is in (0, 100]: the product is positive and far below usize::MAX.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let n = |base: usize| ((base as f64 * scale) as usize).max(10);
    let shapes = [
        Shape { publishers: 1, subscribers: 1, qos: QoS::AtLeastOnce, messages: n(20_000), durable: true, rate: None },
        Shape { publishers: 10, subscribers: 1, qos: QoS::AtLeastOnce, messages: n(2_000), durable: true, rate: None },
    ];
    println!("QoS 1 to a durable subscriber (clean session 0), 100-byte payloads, inflight window 20");
    println!(
        "{:<14} | {:<28} {:>8} {:>7} {:>9} {:>9} {:>11} {:>8}",
        "shape", "target", "msg/s", "deliv", "p50 us", "p99 us", "flush/msg", "vs mosq"
    );
    for shape in shapes {
        // Unpaced first; then every target again at 80% of what Mosquitto
        // (no persistence) delivered unpaced, where latencies compare.
        let mut anchor = None;
        for pass in 0..2 {
            let shape = match (pass, anchor) {
                (0, _) => shape,
                (_, Some(rate)) => Shape { rate: Some(rate * 0.8), ..shape },
                (_, None) => break,
            };
            let label = match shape.rate {
                Some(rate) => format!("{}->{} @{:.0}k/s", shape.publishers, shape.subscribers, rate / 1000.0),
                None => format!("{}->{}", shape.publishers, shape.subscribers),
            };
            let mut pass_anchor = None;
            for (name, vm_args) in TARGETS {
                eprintln!("bench state: {name} {label} ...");
                let (f, flushes) = measure(exe, shape, name, vm_args)?;
                let anchor_rate = *pass_anchor.get_or_insert(f.delivered_per_s);
                anchor.get_or_insert(f.delivered_per_s);
                println!(
                    "{:<14} | {:<28} {:>8.0} {:>6.1}% {:>9.0} {:>9.0} {:>11} {:>7.2}x",
                    label,
                    name,
                    f.delivered_per_s,
                    f.delivered_fraction * 100.0,
                    f.p50_us,
                    f.p99_us,
                    flushes,
                    f.delivered_per_s / anchor_rate
                );
            }
        }
    }
    println!(
        "(mosquitto persistence true writes its database every autosave_interval, 1800 s by default, and at exit: \
         what it acknowledged in between is lost by a crash; --persistence batch may lose its last 100 ms)"
    );
    Ok(())
}

/// Publishes `count` retained QoS 0 messages and waits until the broker has read them all.
fn publish_retained(addr: SocketAddr, count: usize) -> Result<(), String> {
    let (stream, mut reader) = mqtt::connect(addr, "bench-retained")?;
    let mut w = BufWriter::with_capacity(256 * 1024, stream);
    let payload = Payload::from(vec![b'r'; RETAINED_PAYLOAD]);
    for i in 0..count {
        let p = Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: true,
            topic: format!("ret/{i}").into(),
            packet_id: None,
            properties: Default::default(),
            payload: payload.clone(),
        };
        w.write_all(&encode(&Packet::Publish(p))).map_err(io_err)?;
    }
    w.write_all(&encode(&Packet::Pingreq)).map_err(io_err)?;
    w.flush().map_err(io_err)?;
    let mut buf = Vec::new();
    while !matches!(read_packet(&mut reader, &mut buf).map_err(io_err)?, Packet::Pingresp) {}
    Ok(())
}

fn live_bytes(count: usize) -> u64 {
    (0..count).map(|i| (format!("ret/{i}").len() + RETAINED_PAYLOAD) as u64).sum()
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

/// Restart with `count` retained messages: the VM against Mosquitto.
fn recovery(exe: &Path, count: usize, memory_mib: u32) -> Result<(), String> {
    let live = live_bytes(count);
    println!(
        "\nRecovery of {count} retained messages ({RETAINED_PAYLOAD}-byte payloads, {:.1} MiB of topics and payloads)",
        mib(live)
    );
    println!(
        "{:<28} {:>14} {:>18} {:>16} {:>12}",
        "target", "load (s)", "restart->CONNACK", "state on disk", "disk/live"
    );

    let dir = scratch("recovery-mosquitto")?;
    let conf = format!("persistence true\npersistence_location {}/\n", dir.display());
    let mosquitto = start_mosquitto(&conf)?;
    let loaded = Instant::now();
    publish_retained(mosquitto.addr, count)?;
    let load_s = loaded.elapsed().as_secs_f64();
    // Mosquitto writes its database at exit; its restart reads it.
    drop(mosquitto);
    let db = std::fs::metadata(dir.join("mosquitto.db")).map(|m| m.len()).unwrap_or(0);
    let restarted = Instant::now();
    let again = start_mosquitto(&conf)?;
    let mosq_ready = wait_connack(again.addr, Duration::from_secs(120))?.max(restarted.elapsed());
    drop(again);
    println!(
        "{:<28} {:>14.2} {:>15.0} ms {:>12.1} MiB {:>11.2}x",
        "mosquitto persistence true",
        load_s,
        mosq_ready.as_secs_f64() * 1e3,
        mib(db),
        db as f64 / live as f64
    );
    let _ = std::fs::remove_dir_all(&dir);

    let dir = scratch("recovery-vm")?;
    let state = dir.join("tenant.state");
    let memory = memory_mib.to_string();
    let limit = (count * 2).to_string();
    let args = [
        "--state",
        state.to_str().unwrap_or(""),
        "--memory",
        &memory,
        "--max-retained-messages",
        &limit,
        "--max-retained-bytes",
        "1073741824",
    ];
    let vm = start_vm(exe, "VM --persistence sync", &dir, &args)?;
    let loaded = Instant::now();
    publish_retained(vm.addr, count)?;
    let load_s = loaded.elapsed().as_secs_f64();
    stop(vm);
    let allocated = std::fs::metadata(&state).map(|m| m.blocks() * 512).unwrap_or(0);
    let restarted = Instant::now();
    let vm = start_vm(exe, "VM --persistence sync", &dir, &args)?;
    let ready = restarted.elapsed();
    stop(vm);
    let console = std::fs::read_to_string(dir.join("console.log")).unwrap_or_default();
    let line = console.lines().find(|l| l.starts_with("state: recovered")).unwrap_or("state: (no recovery line)");
    println!(
        "{:<28} {:>14.2} {:>15.0} ms {:>12.1} MiB {:>11.2}x",
        "VM --persistence sync",
        load_s,
        ready.as_secs_f64() * 1e3,
        mib(allocated),
        allocated as f64 / live as f64
    );
    println!("  guest: {line}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Runs the state benchmark.
pub fn state(exe: &Path, scale: f64, retained: usize, memory_mib: u32) -> Result<(), String> {
    throughput(exe, scale)?;
    if retained > 0 {
        recovery(exe, retained, memory_mib)?;
    }
    Ok(())
}
