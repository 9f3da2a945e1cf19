//! `mqvisor bench echo`: TCP echo through a tenant VM beside the same echo
//! over host loopback, in one run.
//!
//! Owns the load generator (bulk throughput over several connections, and
//! round trips of small messages on one), the host-loopback echo server used
//! as the anchor, and reading the VM's exit counters (`mqvisor run --stats`).
//! Prints figures and ratios; never judges them.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::percentile;

/// Bytes per write in the throughput test.
const CHUNK: usize = 64 * 1024;
/// Size of one round-trip message.
const PING: usize = 64;

/// What one echo target achieved.
#[derive(Debug, Clone, Copy)]
pub struct EchoFigures {
    /// Bytes echoed back per second (each byte crossed the path twice).
    pub mb_per_s: f64,
    pub rtt_p50_us: f64,
    pub rtt_p99_us: f64,
}

/// Exit counters parsed from `mqvisor run --stats`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VmCounters {
    pub exits: u64,
    pub notifications: u64,
    /// Bytes the guest sent plus bytes it received through virtio-net.
    pub bytes: u64,
}

/// Parses the `mqvisor: stats: ...` line.
pub fn parse_stats(line: &str) -> Option<VmCounters> {
    let rest = line.strip_prefix("mqvisor: stats: ")?;
    let after = |key: &str| rest.find(key).map(|at| &rest[at + key.len()..]);
    let leading_number = |text: &str| text.split(|c: char| !c.is_ascii_digit()).next()?.parse::<u64>().ok();
    // "guest tx <frames> frames / <bytes> bytes"
    let direction_bytes =
        |key: &str| after(key).and_then(|t| t.split_once("frames / ")).and_then(|(_, b)| leading_number(b));
    Some(VmCounters {
        exits: leading_number(after("exits ")?)?,
        notifications: leading_number(after("queue notifications ")?)?,
        bytes: direction_bytes("guest tx ").unwrap_or(0) + direction_bytes("guest rx ").unwrap_or(0),
    })
}

/// An echo server on host loopback: the anchor the VM path is compared with.
fn spawn_loopback_echo() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            thread::spawn(move || {
                let _ = stream.set_nodelay(true);
                let Ok(mut reader) = stream.try_clone() else { return };
                let mut writer = stream;
                let _ = std::io::copy(&mut reader, &mut writer);
                let _ = writer.shutdown(Shutdown::Write);
            });
        }
    });
    Ok(addr)
}

/// Bulk echo over `connections` connections for `duration`; bytes per second.
fn throughput(addr: SocketAddr, connections: usize, duration: Duration) -> Result<f64, String> {
    let started = Instant::now();
    let deadline = started + duration;
    let mut readers = Vec::new();
    for _ in 0..connections {
        let stream = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        let mut reader = stream.try_clone().map_err(|e| e.to_string())?;
        let mut writer = stream;
        thread::spawn(move || {
            let chunk = vec![0x5au8; CHUNK];
            while Instant::now() < deadline {
                if writer.write_all(&chunk).is_err() {
                    break;
                }
            }
            let _ = writer.shutdown(Shutdown::Write);
        });
        readers.push(thread::spawn(move || {
            let mut buf = vec![0u8; CHUNK];
            let mut total = 0u64;
            loop {
                match reader.read(&mut buf) {
                    Ok(0) | Err(_) => break total,
                    Ok(n) => total += n as u64,
                }
            }
        }));
    }
    let bytes: u64 = readers.into_iter().map(|r| r.join().unwrap_or(0)).sum();
    Ok(bytes as f64 / started.elapsed().as_secs_f64())
}

/// Round trips of `PING` bytes on one connection; sorted microseconds.
fn round_trips(addr: SocketAddr, rounds: usize) -> Result<Vec<f64>, String> {
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    let ping = [0x42u8; PING];
    let mut pong = [0u8; PING];
    let mut rtts = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let sent = Instant::now();
        stream.write_all(&ping).map_err(|e| e.to_string())?;
        stream.read_exact(&mut pong).map_err(|e| format!("round trip: {e}"))?;
        rtts.push(sent.elapsed().as_secs_f64() * 1e6);
    }
    rtts.sort_by(f64::total_cmp);
    Ok(rtts)
}

fn measure(addr: SocketAddr, connections: usize, duration: Duration, rounds: usize) -> Result<EchoFigures, String> {
    let rtts = round_trips(addr, rounds)?;
    let bytes_per_s = throughput(addr, connections, duration)?;
    Ok(EchoFigures {
        mb_per_s: bytes_per_s / 1e6,
        rtt_p50_us: percentile(&rtts, 0.5),
        rtt_p99_us: percentile(&rtts, 0.99),
    })
}

/// A `mqvisor run --echo --stats` child and its stderr.
struct EchoVm {
    child: Child,
    addr: SocketAddr,
    stderr: std::io::Lines<BufReader<std::process::ChildStderr>>,
}

impl EchoVm {
    fn start(exe: &Path, memory_mib: u32) -> Result<EchoVm, String> {
        let mut child = Command::new(exe)
            .args([
                "run",
                "--service",
                "echo",
                "--stats",
                "--listen",
                "127.0.0.1:0",
                "--memory",
                &memory_mib.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", exe.display()))?;
        let mut stderr = BufReader::new(child.stderr.take().ok_or("no stderr pipe")?).lines();
        let addr = loop {
            let line = stderr.next().ok_or("mqvisor ended before listening")?.map_err(|e| e.to_string())?;
            if let Some(addr) = line.strip_prefix("mqvisor: tenant VM listening on ") {
                break addr.parse().map_err(|e| format!("bad address {addr}: {e}"))?;
            }
        };
        Ok(EchoVm { child, addr, stderr })
    }

    /// Stops the VM and returns its counters.
    fn stop(mut self) -> Result<VmCounters, String> {
        let pid = libc::pid_t::try_from(self.child.id()).map_err(|_| "pid out of range")?;
        // SAFETY: kill(2) on our own child with a valid signal number.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let counters = self.stderr.by_ref().map_while(Result::ok).find_map(|line| parse_stats(&line));
        let _ = self.child.wait();
        counters.ok_or_else(|| "the VM printed no stats".into())
    }
}

/// Runs the comparison and prints it.
pub fn echo(exe: &Path, connections: usize, seconds: u64, memory_mib: u32) -> Result<(), String> {
    let duration = Duration::from_secs(seconds);
    let rounds = 2000;
    eprintln!("bench echo: host loopback ...");
    let loopback = measure(spawn_loopback_echo().map_err(|e| e.to_string())?, connections, duration, rounds)?;

    eprintln!("bench echo: through the VM ...");
    let vm = EchoVm::start(exe, memory_mib)?;
    let through_vm = measure(vm.addr, connections, duration, rounds)?;
    let busy = vm.stop()?;

    eprintln!("bench echo: idle VM ...");
    let baseline = EchoVm::start(exe, memory_mib)?.stop()?;
    let idle_vm = EchoVm::start(exe, memory_mib)?;
    thread::sleep(Duration::from_secs(2));
    let idle = idle_vm.stop()?;

    println!("mqvisor echo benchmark: {connections} connections x {seconds} s bulk, {rounds} round trips of {PING} B");
    println!("{:<22} {:>12} {:>12} {:>12}", "path", "MB/s", "RTT p50 us", "RTT p99 us");
    for (name, f) in [("host loopback", loopback), ("through the VM", through_vm)] {
        println!("{:<22} {:>12.1} {:>12.1} {:>12.1}", name, f.mb_per_s, f.rtt_p50_us, f.rtt_p99_us);
    }
    println!(
        "ratio VM/loopback: throughput {:.2}x, RTT p50 {:.2}x, RTT p99 {:.2}x",
        through_vm.mb_per_s / loopback.mb_per_s,
        through_vm.rtt_p50_us / loopback.rtt_p50_us,
        through_vm.rtt_p99_us / loopback.rtt_p99_us
    );
    let mib = busy.bytes as f64 / f64::from(1 << 20);
    let per_16k = |n: u64| n as f64 / (busy.bytes as f64 / 16384.0);
    println!(
        "VM exits while busy: {} to the VMM + {} queue notifications for {:.1} MiB through virtio-net",
        busy.exits, busy.notifications, mib
    );
    println!(
        "  per 16 KiB moved: {:.3} VMM exits, {:.3} notifications, {:.3} total",
        per_16k(busy.exits),
        per_16k(busy.notifications),
        per_16k(busy.exits + busy.notifications)
    );
    println!(
        "idle VM, 2 s: {} exits and {} notifications beyond boot and shutdown",
        idle.exits.saturating_sub(baseline.exits),
        idle.notifications.saturating_sub(baseline.notifications)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_stats_line() {
        let line = "mqvisor: stats: exits 1849 (port I/O 1803, MMIO 46, other 0), queue notifications 22976, \
                    guest tx 12157 frames / 134874231 bytes, guest rx 10753 frames / 134798417 bytes, refused chains 0";
        assert_eq!(
            parse_stats(line),
            Some(VmCounters { exits: 1849, notifications: 22976, bytes: 134_874_231 + 134_798_417 })
        );
        assert_eq!(parse_stats("mqvisor: tenant VM listening on 127.0.0.1:1"), None);
    }
}
