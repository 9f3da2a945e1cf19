//! `mqvisor bench hostile`: what a hostile tenant costs its neighbour. A
//! healthy tenant VM answers QoS 1 round trips while, round after round, a
//! VM booted from the hostile test image (`guest/unikernel/src/hostile.rs`)
//! attacks its own VMM beside it; the anchor is the same neighbour measured
//! just before each attack, and a second healthy VM is the control row.
//!
//! Owns the rounds and the ratios. Figures only: the tests judge outcomes.

use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mqvisor_broker::packet::{Ack, Packet, Payload, Publish, QoS, Subscribe, SubscriptionOptions};
use mqvisor_broker::properties::Properties;

use super::mqtt::{Target, connect, encode, io_err, read_packet, start_mqvisor};
use super::percentile;

/// Each row: what the second VM runs (`None`: a healthy VM, the control)
/// and its limits.
const ROWS: [(Option<&str>, &[&str]); 13] = [
    (None, &[]),
    (Some("rings-outside-ram"), &[]),
    (Some("descriptor-loop"), &[]),
    (Some("huge-lengths"), &[]),
    (Some("avail-overrun"), &[]),
    (Some("notify-storm"), &[]),
    (Some("disk-notify-storm"), &[]),
    (Some("unmapped-mmio"), &[]),
    (Some("busy-loop"), &[]),
    (Some("busy-loop"), &["--cpus", "0.25"]),
    (Some("garbage-config"), &[]),
    (Some("fill-memory"), &[]),
    (Some("fill-memory"), &["--memory-limit", "32"]),
];

/// A client publishing QoS 1 to its own subscription, one message at a time.
struct Prober {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    buf: Vec<u8>,
    next_id: u16,
}

impl Prober {
    fn connect(target: &Target) -> Result<Prober, String> {
        let (stream, reader) = connect(target.addr, "bench-prober")?;
        let mut prober = Prober { stream, reader, buf: Vec::new(), next_id: 1 };
        let options = SubscriptionOptions {
            qos: QoS::AtLeastOnce,
            no_local: false,
            retain_as_published: false,
            retain_handling: 0,
        };
        let subscribe =
            Subscribe { packet_id: 1, properties: Properties::default(), filters: vec![("rtt".into(), options)] };
        prober.stream.write_all(&encode(&Packet::Subscribe(subscribe))).map_err(io_err)?;
        read_packet(&mut prober.reader, &mut prober.buf).map_err(io_err)?;
        Ok(prober)
    }

    /// p50 and p99 of `samples` round trips, microseconds.
    fn percentiles_us(&mut self, samples: usize) -> Result<(f64, f64), String> {
        let mut times = Vec::with_capacity(samples);
        for _ in 0..samples {
            self.next_id = self.next_id % 60_000 + 1;
            let publish = Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: Arc::from("rtt"),
                packet_id: Some(self.next_id),
                properties: Default::default(),
                payload: Payload::from(b"ping".to_vec()),
            };
            let started = Instant::now();
            self.stream.write_all(&encode(&Packet::Publish(publish))).map_err(io_err)?;
            loop {
                if let Packet::Publish(echo) = read_packet(&mut self.reader, &mut self.buf).map_err(io_err)? {
                    let ack =
                        Ack { packet_id: echo.packet_id.unwrap_or(0), code: 0, properties: Properties::default() };
                    self.stream.write_all(&encode(&Packet::Puback(ack))).map_err(io_err)?;
                    break;
                }
            }
            times.push(started.elapsed().as_secs_f64() * 1e6);
        }
        times.sort_by(f64::total_cmp);
        Ok((percentile(&times, 0.5), percentile(&times, 0.99)))
    }
}

/// The median, smallest and largest of `values`.
fn spread(values: &mut [f64]) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    (percentile(values, 0.5), values[0], values[values.len() - 1])
}

pub fn hostile(exe: &Path, image: &Path, rounds: usize, samples: usize) -> Result<(), String> {
    if !image.exists() {
        return Err(format!(
            "the hostile image is not at {} (it is built with mqvisor from source; give --image)",
            image.display()
        ));
    }
    let image = image.to_str().ok_or("the hostile image's path is not UTF-8")?;
    let neighbour = start_mqvisor(exe, "neighbour", &["run"])?;
    let mut prober = Prober::connect(&neighbour)?;
    prober.percentiles_us(samples)?; // warm-up
    println!(
        "A hostile VM beside a neighbour tenant VM: the neighbour's QoS 1 round trips ({samples} per phase) \
         just before and during each attack, {rounds} rounds; median ratio during/before (smallest..largest)."
    );
    println!(
        "The control row is the cost of a second VM as such (on nested KVM, a healthy idle one too); \
         the last column is each attack's p99 ratio over the control's."
    );
    println!("{:<32} {:>24} {:>24} {:>14}", "second VM", "neighbour p50", "neighbour p99", "p99 / control");
    let state = std::env::temp_dir().join(format!("mqvisor-bench-hostile-{}.state", std::process::id()));
    let state = state.to_str().ok_or("the temporary directory's path is not UTF-8")?.to_string();
    let mut control_p99 = None;
    for (attack, limits) in ROWS {
        let (mut p50s, mut p99s) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let before = prober.percentiles_us(samples)?;
            let cmdline = attack.map(|a| format!("attack={a}"));
            let mut args = vec!["run", "--listen", "127.0.0.1:0", "--timeout", "60"];
            if let Some(cmdline) = &cmdline {
                // A 4 MiB state file holds packets of at most 512 KiB.
                args.extend(["--image", image, "--cmdline", cmdline, "--state", &state, "--state-size", "4"]);
                args.extend(["--max-packet-size", "524288"]);
            }
            args.extend_from_slice(limits);
            // Not waited for: a VM the VMM stops is gone within milliseconds.
            let mut second = Command::new(exe)
                .args(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("starting {}: {e}", exe.display()))?;
            std::thread::sleep(Duration::from_millis(200));
            let during = prober.percentiles_us(samples)?;
            let _ = second.kill();
            let _ = second.wait();
            let _ = std::fs::remove_file(&state);
            p50s.push(during.0 / before.0);
            p99s.push(during.1 / before.1);
        }
        let name = format!("{} {}", attack.unwrap_or("control: a healthy VM"), limits.join(" "));
        let show = |(median, low, high): (f64, f64, f64)| format!("{median:.2}x ({low:.2}..{high:.2})");
        let p99 = spread(&mut p99s);
        let control = *control_p99.get_or_insert(p99.0);
        println!(
            "{:<32} {:>24} {:>24} {:>13.2}x",
            name.trim_end(),
            show(spread(&mut p50s)),
            show(p99),
            p99.0 / control
        );
    }
    Ok(())
}
