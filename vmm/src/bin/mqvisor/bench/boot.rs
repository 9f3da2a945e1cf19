//! `mqvisor bench boot`: cold-start latency and memory of `mqvisor run`.
//!
//! Owns spawning fresh `mqvisor run` processes and reading their figures:
//! process exec to the guest banner (measured here), KVM_CREATE_VM to the
//! guest's first instruction (reported by the guest in its banner), and the
//! child's peak RSS (from `wait4`); then exec to the broker's "serving MQTT"
//! line, with and without a new state file: what a tenant's first client
//! waits for beyond the banner (its devices brought up, its state disk
//! made). Prints figures; never judges them.

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::percentile;

/// Firecracker's published start-up figure for the same step (guest init).
pub const FIRECRACKER_BOOT_MS: f64 = 125.0;

/// Figures from one cold start.
#[derive(Debug, Clone, Copy)]
pub struct BootSample {
    /// Process exec to the banner line on stdout.
    pub exec_to_banner: Duration,
    /// KVM_CREATE_VM to the guest's `_start`, as the guest measured it.
    pub create_vm_to_start: Duration,
    /// Peak resident set of the `mqvisor run` process.
    pub peak_rss_kib: u64,
}

/// Extracts `boot-to-start N us` from the guest banner.
pub fn parse_boot_to_start(banner: &str) -> Option<Duration> {
    let rest = banner.split("boot-to-start ").nth(1)?;
    let micros = rest.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_micros(micros))
}

/// Waits for `pid` and returns its exit status and peak RSS in KiB.
fn wait_with_rusage(pid: u32) -> std::io::Result<(ExitStatus, u64)> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| std::io::Error::other("pid out of range"))?;
    let mut status = 0;
    // SAFETY: all-zero is a valid `rusage`; wait4 fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `status` and `usage` are live, writable and correctly typed;
    // `pid` is our own unwaited child, so no other process is reaped.
    let ret = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((ExitStatus::from_raw(status), u64::try_from(usage.ru_maxrss).unwrap_or(0)))
}

/// Runs one cold start of `exe run` with an idle guest.
pub fn boot_once(exe: &Path, memory_mib: u32) -> Result<BootSample, String> {
    let start = Instant::now();
    let mut child = Command::new(exe)
        .args(["run", "--service", "demo", "--memory", &memory_mib.to_string(), "--timeout", "30"])
        // One short idle period after the banner: what an idle tenant costs.
        .args(["--cmdline", "sleeps=1 sleep_ms=50"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", exe.display()))?;
    let stdout = child.stdout.take().ok_or("no stdout pipe")?;
    let mut banner = String::new();
    let mut exec_to_banner = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(|e| format!("reading guest console: {e}"))?;
        if exec_to_banner.is_none() && line.contains(" ready: ") {
            exec_to_banner = Some(start.elapsed());
            banner = line;
        }
    }
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
    }
    let (status, peak_rss_kib) = wait_with_rusage(child.id()).map_err(|e| format!("waiting for child: {e}"))?;
    if !status.success() {
        return Err(format!("`mqvisor run` failed ({status}): {}", stderr.trim()));
    }
    let exec_to_banner = exec_to_banner.ok_or("the guest printed no banner")?;
    let create_vm_to_start = parse_boot_to_start(&banner).ok_or_else(|| format!("unreadable banner: {banner}"))?;
    Ok(BootSample { exec_to_banner, create_vm_to_start, peak_rss_kib })
}

/// Exec of `exe run --service mqtt` (on an ephemeral port, a new state file
/// in `state_dir` when given) to its broker's "serving MQTT" line; the
/// process is stopped then.
fn serving_once(exe: &Path, memory_mib: u32, state_dir: Option<&Path>) -> Result<Duration, String> {
    let mut command = Command::new(exe);
    command.args(["run", "--service", "mqtt", "--listen", "127.0.0.1:0", "--memory", &memory_mib.to_string()]);
    let state = state_dir.map(|dir| dir.join(format!("boot-{}.state", std::process::id())));
    if let Some(state) = &state {
        let _ = std::fs::remove_file(state);
        command.arg("--state").arg(state);
    } else {
        command.args(["--persistence", "off"]);
    }
    let start = Instant::now();
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", exe.display()))?;
    let stdout = child.stdout.take().ok_or("no stdout pipe")?;
    let mut serving = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(|e| format!("reading guest console: {e}"))?;
        if line.starts_with("mqtt: serving MQTT") {
            serving = Some(start.elapsed());
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    if let Some(state) = &state {
        let _ = std::fs::remove_file(state);
    }
    serving.ok_or_else(|| "the broker never said it was serving".to_string())
}

/// Runs `runs` cold starts and prints the figures.
pub fn boot(exe: &Path, runs: usize, memory_mib: u32) -> Result<(), String> {
    let mut samples = Vec::with_capacity(runs);
    for i in 1..=runs {
        let sample = boot_once(exe, memory_mib)?;
        eprintln!(
            "run {i:>3}/{runs}: exec->banner {:>7.2} ms, create_vm->start {:>7.2} ms, peak RSS {:>6} KiB",
            sample.exec_to_banner.as_secs_f64() * 1e3,
            sample.create_vm_to_start.as_secs_f64() * 1e3,
            sample.peak_rss_kib
        );
        samples.push(sample);
    }
    let sorted_ms = |f: fn(&BootSample) -> Duration| {
        let mut v: Vec<f64> = samples.iter().map(|s| f(s).as_secs_f64() * 1e3).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let exec = sorted_ms(|s| s.exec_to_banner);
    let create = sorted_ms(|s| s.create_vm_to_start);
    let peak_rss = samples.iter().map(|s| s.peak_rss_kib).max().unwrap_or(0);
    let median_exec = percentile(&exec, 0.5);
    println!("mqvisor boot benchmark: {runs} cold starts, {memory_mib} MiB guest");
    println!("{:<40} {:>10} {:>10}", "figure", "median", "p90");
    println!("{:<40} {:>8.2}ms {:>8.2}ms", "process exec -> guest banner", median_exec, percentile(&exec, 0.9));
    println!(
        "{:<40} {:>8.2}ms {:>8.2}ms",
        "KVM_CREATE_VM -> first guest insn",
        percentile(&create, 0.5),
        percentile(&create, 0.9)
    );
    println!("{:<40} {:>7.2}MiB", "peak RSS of `mqvisor run` (max)", peak_rss as f64 / 1024.0);
    let state_dir = std::env::temp_dir();
    for (what, state) in [("no state", None), ("a new state file", Some(state_dir.as_path()))] {
        let mut serving = Vec::with_capacity(runs);
        for _ in 0..runs {
            serving.push(serving_once(exe, memory_mib, state)?.as_secs_f64() * 1e3);
        }
        serving.sort_by(f64::total_cmp);
        println!(
            "{:<40} {:>8.2}ms {:>8.2}ms",
            format!("exec -> serving MQTT, {what}"),
            percentile(&serving, 0.5),
            percentile(&serving, 0.9)
        );
    }
    println!(
        "Firecracker's published start to guest init: {FIRECRACKER_BOOT_MS} ms; ratio (Firecracker / mqvisor exec->banner median): {:.1}x",
        FIRECRACKER_BOOT_MS / median_exec
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_banner_figure() {
        let banner = "mqvisor-guest 0.1.0 ready: boot-to-start 1234 us, start-to-ready 5 us, ram 32 MiB";
        assert_eq!(parse_boot_to_start(banner), Some(Duration::from_micros(1234)));
        assert_eq!(parse_boot_to_start("ready: boot-to-start soon"), None);
        assert_eq!(parse_boot_to_start(""), None);
    }
}
