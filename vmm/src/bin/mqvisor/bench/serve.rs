//! `mqvisor bench serve`: a host of tenants behind one port.
//!
//! Owns three measurements: (a) density: N tenants, each booted by one
//! client that stays connected, then PSS per tenant and in all (from the
//! daemon's control API) and the host memory that went; (b) first CONNACK
//! through the shared port for a tenant that is not running (its VM boots)
//! and for one that is; (c) QoS 1 1->1 throughput through the shared port
//! beside `mqvisor run` directly, and Mosquitto as the anchor. Published
//! figures of others are printed beside ours as such, never measured here.
//! Prints figures; never judges them.

use std::io::BufReader;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mqvisor_broker::packet::QoS;

use super::mqtt::{Shape, connect_as, io_err, run_shape, run_shape_as, start_mosquitto, start_mqvisor};
use super::{percentile, raise_fd_limit};

/// A running `mqvisor serve`, stopped when dropped.
struct Daemon {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) on our own child with a valid signal.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_daemon(exe: &Path, tenants: usize, memory_mib: u32) -> Result<Daemon, String> {
    let dir = std::env::temp_dir().join(format!("mqvisor-bench-serve-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(io_err)?;
    let mut config = format!(
        "listen = \"127.0.0.1:0\"\nstate_dir = \"state\"\n[defaults]\nmemory = {memory_mib}\nmax_connections = 200\n"
    );
    for i in 0..tenants {
        config.push_str(&format!("[tenants.t{i}]\n"));
    }
    std::fs::write(dir.join("serve.toml"), config).map_err(io_err)?;
    let (child, addr) = spawn_serve(exe, &dir.join("serve.toml"))?;
    Ok(Daemon { child, addr, dir })
}

/// `mqvisor serve --config CONFIG`, once it says where it listens; its log
/// is drained from then on, so it never blocks on a full pipe. A daemon
/// that ends or says nothing of the kind is killed and its error given.
pub(super) fn spawn_serve(exe: &Path, config: &Path) -> Result<(Child, SocketAddr), String> {
    use std::io::BufRead;
    let mut child = Command::new(exe)
        .args(["serve", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting mqvisor serve: {e}"))?;
    let mut lines = BufReader::new(child.stderr.take().ok_or("no stderr")?).lines();
    let listening = loop {
        let Some(line) = lines.next() else { break Err("mqvisor serve ended before listening".to_string()) };
        match line.map_err(io_err) {
            Ok(line) => {
                if let Some(addr) = line.strip_prefix("mqvisor: serve listening on ") {
                    break addr.parse().map_err(io_err);
                }
            }
            Err(e) => break Err(e),
        }
    };
    match listening {
        Ok(addr) => {
            std::thread::spawn(move || lines.for_each(drop));
            Ok((child, addr))
        }
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e)
        }
    }
}

/// `MemAvailable` of this host, KiB.
fn mem_available_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Sum of every tenant's PSS (bytes) and how many run, from the daemon.
fn tenants_pss(exe: &Path, daemon: &Daemon) -> Result<(u64, usize), String> {
    let out = Command::new(exe)
        .args(["tenant", "list", "--json", "--socket"])
        .arg(daemon.dir.join("state/control.sock"))
        .output()
        .map_err(io_err)?;
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).map_err(io_err)?;
    let running = list.iter().filter(|t| t["state"] == "running").count();
    Ok((list.iter().filter_map(|t| t["pss_bytes"].as_u64()).sum(), running))
}

fn connack_ms(addr: SocketAddr, tenant: &str) -> Result<(f64, (TcpStream, BufReader<TcpStream>)), String> {
    let started = Instant::now();
    let client = connect_as(addr, "bench", Some(&format!("{tenant}:")))?;
    Ok((started.elapsed().as_secs_f64() * 1000.0, client))
}

/// Runs the three measurements and prints them.
pub fn serve(exe: &Path, tenants: usize, messages: usize) -> Result<(), String> {
    let fds = raise_fd_limit();
    if fds < tenants as u64 * 2 + 64 {
        return Err(format!("{tenants} tenants need about {} file descriptors; the limit is {fds}", tenants * 2 + 64));
    }
    let available_before = mem_available_kib();
    let daemon = start_daemon(exe, tenants, 64)?;
    println!("Tenants benchmark: {tenants} tenants behind one port, each booted by one client that stays connected");

    // (a) density and (b) cold first CONNACK.
    let mut cold = Vec::with_capacity(tenants);
    let mut held = Vec::with_capacity(tenants);
    for i in 0..tenants {
        let (ms, client) = connack_ms(daemon.addr, &format!("t{i}"))?;
        cold.push(ms);
        held.push(client.1);
        if (i + 1) % 100 == 0 {
            eprintln!("bench serve: {} tenants booted", i + 1);
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    let (pss, running) = tenants_pss(exe, &daemon)?;
    let used_kib = available_before.saturating_sub(mem_available_kib());
    println!(
        "density: {running} tenants running, PSS {:.2} MiB per tenant, {:.0} MiB in all; host memory available fell by {:.0} MiB, {:.0} MiB left",
        pss as f64 / running.max(1) as f64 / f64::from(1 << 20),
        pss as f64 / f64::from(1 << 20),
        used_kib as f64 / 1024.0,
        mem_available_kib() as f64 / 1024.0
    );
    let mut warm = Vec::new();
    for i in 0..tenants.min(200) {
        warm.push(connack_ms(daemon.addr, &format!("t{i}"))?.0);
    }
    for v in [&mut cold, &mut warm] {
        v.sort_by(f64::total_cmp);
    }
    println!(
        "first CONNACK through the shared port: stopped tenant (VM boots) p50 {:.1} ms p99 {:.1} ms; running tenant p50 {:.2} ms p99 {:.2} ms",
        percentile(&cold, 0.5),
        percentile(&cold, 0.99),
        percentile(&warm, 0.5),
        percentile(&warm, 0.99)
    );
    println!("  published for comparison: Firecracker boots a microVM (to the guest's init) in about 125 ms");
    drop(held);
    drop(daemon);

    // (c) QoS 1 1->1: Mosquitto, mqvisor run directly, through the shared port.
    let shape = Shape { publishers: 1, subscribers: 1, qos: QoS::AtLeastOnce, messages, durable: false, rate: None };
    let mosquitto = start_mosquitto("")?;
    let anchor = run_shape(mosquitto.addr, shape)?.delivered_per_s;
    drop(mosquitto);
    let direct_vm = start_mqvisor(exe, "mqvisor run", &["run", "--service", "mqtt"])?;
    let direct = run_shape(direct_vm.addr, shape)?.delivered_per_s;
    drop(direct_vm);
    let daemon = start_daemon(exe, 1, 64)?;
    let shared = run_shape_as(daemon.addr, shape, Some("t0:"))?.delivered_per_s;
    println!("QoS 1 1->1, {messages} messages of 100 bytes:");
    println!("  mosquitto                {anchor:>9.0} msg/s  1.00x");
    println!("  mqvisor run (direct)     {direct:>9.0} msg/s  {:.2}x", direct / anchor);
    println!(
        "  mqvisor serve (shared)   {shared:>9.0} msg/s  {:.2}x  ({:.1}% of direct)",
        shared / anchor,
        shared / direct * 100.0
    );
    Ok(())
}
