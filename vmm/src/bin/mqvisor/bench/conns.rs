//! `mqvisor bench conns`: what connections cost, mqvisor beside Mosquitto
//! on the same machine in the same run.
//!
//! Owns five measurements per target: PSS per idle CONNECTed connection
//! (N held at once), QoS 1 messages per second 1->1 beside them, new
//! connections per second (sequential CONNECT,
//! CONNACK, DISCONNECT), PSS after that churn against before it, and one
//! large message's QoS 1 round trip (publish to one's own subscription,
//! until the PUBACK and the message are back). Targets: Mosquitto, the
//! host-native runner and a tenant VM. Prints figures and ratios; never
//! judges them.

use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use mqvisor_broker::packet::{Packet, Payload, Publish, QoS, Subscribe, SubscriptionOptions};
use mqvisor_broker::properties::Properties;

use super::mqtt::{Shape, Target, connect, encode, io_err, read_packet, run_shape, start_mosquitto, start_mqvisor};
use super::raise_fd_limit;

/// What one target achieved.
#[derive(Clone, Copy)]
struct Figures {
    idle_bytes_per_connection: f64,
    /// QoS 1 messages per second 1->1 while the idle connections are held.
    busy_beside_idle_per_s: f64,
    connections_per_s: f64,
    churn_pss_change: f64,
    round_trip_s: f64,
    pss_after_kib: u64,
}

/// The proportional set size of `pid`, KiB.
fn pss_kib(pid: u32) -> Result<u64, String> {
    crate::procfs::pss_kib(pid).ok_or_else(|| format!("no Pss in /proc/{pid}/smaps_rollup"))
}

/// One client subscribes to its own topic and sends `size` bytes at QoS 1;
/// returns the seconds until both the PUBACK and the message are back.
fn round_trip(target: &Target, size: usize) -> Result<f64, String> {
    let (stream, mut reader) = connect(target.addr, "bench-large")?;
    let mut writer = stream.try_clone().map_err(io_err)?;
    let subscribe = Subscribe {
        packet_id: 1,
        properties: Properties::default(),
        filters: vec![(
            "bench/large".into(),
            SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                no_local: false,
                retain_as_published: false,
                retain_handling: 0,
            },
        )],
    };
    writer.write_all(&encode(&Packet::Subscribe(subscribe))).map_err(io_err)?;
    let mut buf = Vec::new();
    read_packet(&mut reader, &mut buf).map_err(io_err)?;
    let publish = Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: Arc::from("bench/large"),
        packet_id: Some(2),
        properties: Default::default(),
        payload: Payload::from(vec![0x5a; size]),
    };
    let bytes = encode(&Packet::Publish(publish));
    let started = Instant::now();
    // Read while writing: a broker may echo before it has all of it.
    let reading = thread::spawn(move || -> Result<(), String> {
        let mut buf = Vec::new();
        let (mut acked, mut echoed) = (false, false);
        while !(acked && echoed) {
            match read_packet(&mut reader, &mut buf).map_err(io_err)? {
                Packet::Puback(_) => acked = true,
                Packet::Publish(p) if p.payload.len() == size => {
                    echoed = true;
                    if let Some(id) = p.packet_id {
                        let ack =
                            mqvisor_broker::packet::Ack { packet_id: id, code: 0, properties: Properties::default() };
                        let mut w = reader.get_ref().try_clone().map_err(io_err)?;
                        w.write_all(&encode(&Packet::Puback(ack))).map_err(io_err)?;
                    }
                }
                other => return Err(format!("unexpected {other:?}")),
            }
        }
        Ok(())
    });
    writer.write_all(&bytes).map_err(io_err)?;
    reading.join().map_err(|_| "reader panicked".to_string())??;
    Ok(started.elapsed().as_secs_f64())
}

/// One CONNECT, CONNACK, DISCONNECT.
fn connect_once(target: &Target, i: usize) -> Result<(), String> {
    let (mut stream, _reader): (TcpStream, BufReader<TcpStream>) = connect(target.addr, &format!("churn-{i}"))?;
    stream.write_all(&[0xe0, 0]).map_err(io_err)
}

fn measure(target: &Target, idle: usize, churn: usize, large: usize) -> Result<Figures, String> {
    let pid = target.child.id();
    let (_first, _first_reader) = connect(target.addr, "bench-first")?;
    let before = pss_kib(pid)?;
    let mut held = Vec::with_capacity(idle);
    for i in 0..idle {
        // One descriptor per connection: the reader's; the writer's is a
        // duplicate, and closing it leaves the connection open.
        held.push(connect(target.addr, &format!("idle-{i}"))?.1);
    }
    let after = pss_kib(pid)?;
    let shape =
        Shape { publishers: 1, subscribers: 1, qos: QoS::AtLeastOnce, messages: 20_000, durable: false, rate: None };
    let busy_beside_idle_per_s = run_shape(target.addr, shape)?.delivered_per_s;
    drop(held);
    thread::sleep(std::time::Duration::from_millis(500));
    let idle_bytes_per_connection = after.saturating_sub(before) as f64 * 1024.0 / idle.max(1) as f64;

    let before_churn = pss_kib(pid)?;
    let started = Instant::now();
    for i in 0..churn {
        connect_once(target, i)?;
    }
    let connections_per_s = churn as f64 / started.elapsed().as_secs_f64();
    thread::sleep(std::time::Duration::from_millis(500));
    let after_churn = pss_kib(pid)?;
    let churn_pss_change = (after_churn as f64 - before_churn as f64) / before_churn as f64;

    let round_trip_s = round_trip(target, large)?;
    Ok(Figures {
        idle_bytes_per_connection,
        busy_beside_idle_per_s,
        connections_per_s,
        churn_pss_change,
        round_trip_s,
        pss_after_kib: pss_kib(pid)?,
    })
}

/// Runs every measurement against every target and prints the comparison.
pub fn conns(exe: &Path, idle: usize, churn: usize, large_mib: usize, include_vm: bool) -> Result<(), String> {
    let fds = raise_fd_limit();
    if fds < idle as u64 + 64 {
        return Err(format!("{idle} idle connections need {} file descriptors; the hard limit is {fds}", idle + 64));
    }
    let large = large_mib << 20;
    // Every target holds the idle connections plus a few, and the large message.
    let limit = (idle + 16).to_string();
    let packet = (large + 1024).to_string();
    // The message, its copy on the way out, and the link and connections.
    let memory = (2 * large_mib + 128).to_string();
    let mqvisor_limits = ["--max-connections", &limit, "--max-packet-size", &packet];
    let mut targets = vec![start_mosquitto("")?];
    targets.push(start_mqvisor(exe, "mqvisor host", &[&["broker"][..], &mqvisor_limits].concat())?);
    if include_vm {
        let args = [&["run", "--service", "mqtt", "--memory", &memory][..], &mqvisor_limits].concat();
        targets.push(start_mqvisor(exe, "mqvisor VM", &args)?);
    }
    println!(
        "Connections benchmark: {idle} idle CONNECTed clients held, {churn} sequential connect/CONNACK/DISCONNECT, \
         a {large_mib} MiB QoS 1 round trip; PSS from /proc/PID/smaps_rollup"
    );
    println!(
        "{:<13} | {:>12} {:>7} | {:>10} {:>7} | {:>9} {:>7} | {:>10} | {:>9} {:>7} | {:>10}",
        "target",
        "idle B/conn",
        "vs mosq",
        "QoS1 msg/s",
        "vs mosq",
        "conn/s",
        "vs mosq",
        "churn PSS",
        "RTT s",
        "vs mosq",
        "PSS after"
    );
    let mut anchor: Option<Figures> = None;
    for target in &targets {
        eprintln!("bench conns: {} ...", target.name);
        let f = measure(target, idle, churn, large)?;
        let a = *anchor.get_or_insert(f);
        println!(
            "{:<13} | {:>12.0} {:>6.2}x | {:>10.0} {:>6.2}x | {:>9.0} {:>6.2}x | {:>+9.1}% | {:>9.3} {:>6.2}x | {:>7} KiB",
            target.name,
            f.idle_bytes_per_connection,
            f.idle_bytes_per_connection / a.idle_bytes_per_connection,
            f.busy_beside_idle_per_s,
            f.busy_beside_idle_per_s / a.busy_beside_idle_per_s,
            f.connections_per_s,
            f.connections_per_s / a.connections_per_s,
            f.churn_pss_change * 100.0,
            f.round_trip_s,
            f.round_trip_s / a.round_trip_s,
            f.pss_after_kib
        );
    }
    Ok(())
}
