//! libmosquitto's own command-line clients as a load generator, plain or
//! over TLS: one `mosquitto_pub -l` publisher fed one line per message and
//! N `mosquitto_sub -C` subscribers, timed from the first delivery to the
//! last. `bench mqtt` drives plain listeners with it, `bench edge` TLS ones.
//!
//! Each subscriber's first line is a retained marker published before it
//! starts, so every one is subscribed before the publisher runs. Every
//! payload line carries its sequence number: the figures say what arrived,
//! what never did, what arrived twice and what arrived out of order.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use mqvisor_broker::packet::QoS;

use super::mqtt::io_err;

/// Bytes per message: each input line is this many digits and a newline,
/// which `mosquitto_pub -l` strips.
pub const PAYLOAD: usize = 100;
/// A subscriber that receives nothing for this long has lost messages.
pub const QUIET: Duration = Duration::from_secs(5);

/// Where the clients connect.
#[derive(Clone, Copy)]
pub struct Endpoint<'a> {
    pub addr: SocketAddr,
    /// The CA to verify the server with: TLS. None: plain TCP.
    pub ca: Option<&'a Path>,
}

/// What one run delivered.
#[derive(Debug, Clone, Copy, Default)]
pub struct Delivery {
    /// Messages delivered per second, from the first delivery to the last.
    pub per_s: f64,
    /// Messages times subscribers.
    pub expected: u64,
    /// Payload lines the subscribers printed, duplicates included.
    pub delivered: u64,
    /// (subscriber, message) pairs never printed.
    pub missing: u64,
    /// Lines printed again by the same subscriber.
    pub duplicates: u64,
    /// Lines whose number is below the one before on the same subscriber.
    pub reordered: u64,
    /// CPU seconds (user + system) of `mosquitto_pub` and every `mosquitto_sub`.
    pub client_cpu_s: Option<f64>,
}

impl Delivery {
    pub fn fraction(&self) -> f64 {
        (self.delivered - self.duplicates) as f64 / self.expected.max(1) as f64
    }
}

/// A client process, killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether `name` is on PATH, as the clients and openssl are run (and
/// mosquitto also in /usr/sbin, where Debian puts it and where
/// `start_mosquitto` looks first).
pub fn have_program(name: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let sbin = (name == "mosquitto").then(|| PathBuf::from("/usr/sbin"));
    std::env::split_paths(&path).chain(sbin).any(|dir| dir.join(name).is_file())
}

/// User plus system CPU seconds of process `pid` (all its threads), from
/// /proc/PID/stat; also for a child that exited and is not yet reaped.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name in parentheses may hold spaces: count after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11); // utime is field 14
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (ticks > 0).then(|| (utime + stime) as f64 / ticks as f64)
}

/// User plus system CPU seconds of this process's threads (`RUSAGE_SELF`)
/// or of its reaped children (`RUSAGE_CHILDREN`), to the microsecond.
pub fn rusage_seconds(who: libc::c_int) -> Option<f64> {
    // SAFETY: an all-zero rusage is valid; getrusage writes into it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage.
    if unsafe { libc::getrusage(who, &mut usage) } != 0 {
        return None;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Some(secs(usage.ru_utime) + secs(usage.ru_stime))
}

/// `mosquitto_pub`/`mosquitto_sub` arguments reaching `endpoint`.
fn client(program: &str, endpoint: Endpoint) -> Command {
    let mut c = Command::new(program);
    c.args(["-h", "127.0.0.1", "-p", &endpoint.addr.port().to_string()]);
    if let Some(ca) = endpoint.ca {
        c.arg("--cafile").arg(ca);
    }
    c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

/// The error a failed client process reports: its status and stderr.
fn failure(proc: &mut Proc, what: &str, status: std::process::ExitStatus) -> String {
    let mut stderr = String::new();
    if let Some(mut e) = proc.0.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    format!("{what}: {status}: {}", stderr.trim())
}

/// Waits for a client process, at most `limit`; its stderr in the error.
fn finish(mut proc: Proc, what: &str, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = proc.0.try_wait().map_err(io_err)? {
            if status.success() {
                return Ok(());
            }
            return Err(failure(&mut proc, what, status));
        }
        if Instant::now() > deadline {
            return Err(format!("{what}: still running after {} s", limit.as_secs()));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// `messages` lines of PAYLOAD digits (the message's number, zero-padded):
/// `mosquitto_pub -l`'s input.
fn publisher_input(dir: &Path, messages: usize) -> Result<PathBuf, String> {
    let path = dir.join(format!("mosquitto-pub-input-{}-{messages}", std::process::id()));
    let mut out = std::io::BufWriter::new(File::create(&path).map_err(io_err)?);
    for seq in 0..messages {
        writeln!(out, "{seq:0>width$}", width = PAYLOAD).map_err(io_err)?;
    }
    out.flush().map_err(io_err)?;
    Ok(path)
}

/// What one subscriber's reader saw.
#[derive(Default)]
struct Seen {
    delivered: u64,
    missing: u64,
    duplicates: u64,
    reordered: u64,
    first: Option<Instant>,
    last: Option<Instant>,
}

/// Reads one `mosquitto_sub`'s lines after the marker until its stdout ends.
fn read_deliveries(
    lines: impl Iterator<Item = std::io::Result<String>>,
    messages: usize,
    received: &AtomicU64,
) -> Seen {
    let mut seen = Seen::default();
    let mut got = vec![false; messages];
    let mut previous = None;
    for line in lines {
        let Ok(line) = line else { break };
        if line.len() != PAYLOAD {
            continue;
        }
        let now = Instant::now();
        seen.first.get_or_insert(now);
        seen.last = Some(now);
        seen.delivered += 1;
        received.fetch_add(1, Ordering::Relaxed);
        if let Some(seq) = line.parse::<usize>().ok().filter(|&s| s < messages) {
            if std::mem::replace(&mut got[seq], true) {
                seen.duplicates += 1;
            }
            if previous.is_some_and(|p| seq < p) {
                seen.reordered += 1;
            }
            previous = Some(seq);
        }
    }
    seen.missing = got.iter().filter(|g| !**g).count() as u64;
    seen
}

/// One publisher (`mosquitto_pub -l -q QOS`, stdin `messages` lines) to
/// `subscribers` (`mosquitto_sub -q QOS -C`); `dir` holds the input file
/// while it runs.
pub fn run(endpoint: Endpoint, qos: QoS, subscribers: usize, messages: usize, dir: &Path) -> Result<Delivery, String> {
    static RUN: AtomicU64 = AtomicU64::new(0);
    let run = RUN.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    let topic = format!("bench/clients/{pid}/{run}");
    let q = (qos as u8).to_string();
    // A retained message is each subscriber's first line: it is subscribed.
    let mut marker = client("mosquitto_pub", endpoint);
    marker.args(["-q", "1", "-r", "-m", "ready", "-t", &topic]);
    finish(Proc(marker.spawn().map_err(|e| format!("mosquitto_pub: {e}"))?), "mosquitto_pub -r", QUIET)?;
    // The clients' CPU: what this process's reaped children used meanwhile.
    let cpu_before = rusage_seconds(libc::RUSAGE_CHILDREN);
    let received = Arc::new(AtomicU64::new(0));
    let (ready_tx, ready_rx) = mpsc::channel();
    let mut subs = Vec::new();
    let mut readers = Vec::new();
    for i in 0..subscribers {
        let mut sub = client("mosquitto_sub", endpoint);
        let count = (messages + 1).to_string();
        sub.args(["-q", &q, "-C", &count, "-t", &topic, "-i", &format!("bench-sub-{pid}-{run}-{i}")]);
        sub.stdout(Stdio::piped()).stderr(Stdio::null());
        let mut proc = Proc(sub.spawn().map_err(|e| format!("mosquitto_sub: {e}"))?);
        let stdout = proc.0.stdout.take().ok_or("mosquitto_sub: no stdout")?;
        subs.push(proc);
        let (received, ready_tx) = (received.clone(), ready_tx.clone());
        readers.push(thread::spawn(move || {
            let mut lines = BufReader::with_capacity(64 * 1024, stdout).lines();
            let ready = matches!(lines.next(), Some(Ok(l)) if l == "ready");
            let _ = ready_tx.send(ready);
            read_deliveries(lines, messages, &received)
        }));
    }
    for _ in 0..subscribers {
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(true) => {}
            _ => return Err("a mosquitto_sub did not subscribe within 10 s".into()),
        }
    }
    let input = publisher_input(dir, messages)?;
    let mut publish = client("mosquitto_pub", endpoint);
    publish.args(["-q", &q, "-l", "-t", &topic, "-i", &format!("bench-pub-{pid}-{run}")]);
    publish.stdin(File::open(&input).map_err(io_err)?);
    let mut publisher = Proc(publish.spawn().map_err(|e| format!("mosquitto_pub: {e}"))?);
    // Until every subscriber has all its messages, or none arrive for QUIET.
    let (mut seen, mut progress) = (0, Instant::now());
    let mut outcome = Ok(());
    while readers.iter().any(|r| !r.is_finished()) {
        if let Ok(Some(status)) = publisher.0.try_wait()
            && !status.success()
        {
            outcome = Err(failure(&mut publisher, "mosquitto_pub -l", status));
            break;
        }
        let now = received.load(Ordering::Relaxed);
        if now != seen {
            (seen, progress) = (now, Instant::now());
        } else if progress.elapsed() > QUIET {
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    drop(subs); // their stdout ends: every reader returns
    drop(publisher); // killed if still running, and reaped
    let cpu = cpu_before.zip(rusage_seconds(libc::RUSAGE_CHILDREN)).map(|(a, b)| b - a);
    let _ = std::fs::remove_file(input);
    let mut d = Delivery { expected: (messages * subscribers) as u64, client_cpu_s: cpu, ..Delivery::default() };
    let (mut first, mut last) = (None::<Instant>, None::<Instant>);
    for r in readers {
        let s = r.join().map_err(|_| "subscriber reader panicked")?;
        d.delivered += s.delivered;
        d.missing += s.missing;
        d.duplicates += s.duplicates;
        d.reordered += s.reordered;
        first = first.into_iter().chain(s.first).min();
        last = last.into_iter().chain(s.last).max();
    }
    outcome?;
    // From the first delivery to the last: the clients' start (and TLS
    // handshakes) are not in the figure.
    let elapsed = match (first, last) {
        (Some(a), Some(b)) => b.saturating_duration_since(a).as_secs_f64().max(1e-6),
        _ => f64::INFINITY,
    };
    d.per_s = d.delivered.saturating_sub(1) as f64 / elapsed;
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(seq: usize) -> std::io::Result<String> {
        Ok(format!("{seq:0>width$}", width = PAYLOAD))
    }

    #[test]
    fn counts_missing_duplicate_and_reordered_lines() {
        let received = AtomicU64::new(0);
        let lines = [line(0), line(2), line(1), line(2), Ok("short".into()), line(4)];
        let s = read_deliveries(lines.into_iter(), 5, &received);
        assert_eq!((s.delivered, s.missing, s.duplicates, s.reordered), (5, 1, 1, 1));
        assert_eq!(received.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn reads_cpu_time_of_this_process() {
        assert!(cpu_seconds(std::process::id()).is_some_and(|s| s >= 0.0));
        assert!(rusage_seconds(libc::RUSAGE_SELF).is_some_and(|s| s >= 0.0));
    }
}
