//! `mqvisor bench fleet`: a fleet of three `mqvisor serve` nodes on one
//! etcd (Debian's `etcd-server`), all started here: etcd on free ports
//! with a data directory of its own, the nodes on 127.0.0.2, .3 and .4
//! sharing one port number.
//!
//! Owns two measurements: (a) QoS 1 1->1 throughput and one-at-a-time
//! QoS 1 round trips to one tenant, through its owning node (direct) and
//! through a node that relays to it, with ratios relayed/direct; (b) the
//! time to re-place a lost node's tenants: N tenants, each booted by one
//! client through its owner, then `kill -9` of one node's daemon and, for
//! each of its tenants, the time from the kill to a CONNACK through a
//! surviving node (every tenant's client retrying in parallel, as clients
//! reconnecting after a loss do); (c) what mirroring a tenant's state to
//! its standby costs: durable QoS 1 1->1 (`persistence = "sync"`, a
//! subscriber keeping its session) to a tenant with a standby beside one
//! with `standby = "off"`, through each one's owner; (d) failovers: a
//! retained message published, then `kill -9` of the owner's daemon, the
//! time to a CONNACK through a survivor that also reads back that message
//! (the standby's copy), the killed node restarted and the new owner's
//! standby whole again before the next kill, `--kills` times. Kills only
//! the processes it started; removes its directories. Prints figures;
//! never judges them.

use std::collections::BTreeMap;
use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mqvisor_broker::packet::{Ack, Connect, Packet, Payload, Publish, QoS, Subscribe, SubscriptionOptions, Version};
use mqvisor_broker::properties::Properties;

use super::mqtt::{Shape, connect_as, encode, free_port, io_err, read_packet, run_shape_as};
use super::{percentile, raise_fd_limit};

/// Where Debian's `etcd-server` puts etcd.
const ETCD: &str = "/usr/bin/etcd";
/// The fleet's nodes: n1, n2, n3 on 127.0.0.2, .3, .4.
const NODES: u8 = 3;

/// What `mqvisor bench fleet` measures.
pub struct Options {
    /// Tenants in the node-loss measurement.
    pub tenants: usize,
    /// QoS 1 messages per throughput run.
    pub messages: usize,
    /// Round trips per path.
    pub samples: usize,
    /// Failovers in a row.
    pub kills: usize,
}

/// An etcd of the benchmark's own: killed (its own pid) and its data
/// removed when dropped.
struct Etcd {
    child: Child,
    dir: PathBuf,
    url: String,
}

impl Etcd {
    fn start(dir: &Path) -> Result<Etcd, String> {
        let dir = dir.join("etcd");
        std::fs::create_dir_all(&dir).map_err(io_err)?;
        let (client, peer) = (free_port()?, free_port()?);
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.join("etcd.log")).map_err(io_err)?;
        let child = Command::new(ETCD)
            .args(["--name", "bench", "--data-dir"])
            .arg(dir.join("data"))
            .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("bench={peer_url}")])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting {ETCD}: {e}"))?;
        let etcd = Etcd { child, dir, url };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !etcd.answers() {
            if Instant::now() > deadline {
                return Err("etcd did not answer within 20 s".to_string());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(etcd)
    }

    /// Whether etcd's JSON gateway answers a range request.
    fn answers(&self) -> bool {
        let addr = self.url.trim_start_matches("http://");
        let body = "{\"key\":\"AA==\"}";
        let Ok(mut http) = TcpStream::connect(addr) else { return false };
        let _ = http.set_read_timeout(Some(Duration::from_secs(5)));
        let request = format!(
            "POST /v3/kv/range HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut answer = String::new();
        http.write_all(request.as_bytes()).is_ok()
            && http.read_to_string(&mut answer).is_ok()
            && answer.starts_with("HTTP/1.1 200")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One `mqvisor serve` node: stopped (SIGTERM, its tenants with it) when
/// dropped unless already killed.
struct Node {
    name: String,
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
    killed: bool,
}

impl Node {
    fn start(exe: &Path, dir: &Path, i: u8, port: u16, relay: u16, etcd: &str) -> Result<Node, String> {
        let name = format!("n{i}");
        let dir = dir.join(&name);
        std::fs::create_dir_all(&dir).map_err(io_err)?;
        let host = format!("127.0.0.{}", i + 1);
        std::fs::write(
            dir.join("serve.toml"),
            format!(
                "listen = \"{host}:{port}\"\nstate_dir = \"state\"\n\
                 [defaults]\nmemory = 64\nmax_connections = 100\n\
                 [cluster]\netcd = [\"{etcd}\"]\nnode = \"{name}\"\nadvertise = \"{host}:{relay}\"\n"
            ),
        )
        .map_err(io_err)?;
        let (child, addr) =
            super::serve::spawn_serve(exe, &dir.join("serve.toml")).map_err(|e| format!("{name}: {e}"))?;
        let node = Node { name, child, addr, dir, killed: false };
        Ok(node)
    }

    /// `mqvisor ARGS --socket` this node's control socket: its stdout.
    fn ask(&self, exe: &Path, args: &[&str]) -> Result<String, String> {
        let out = Command::new(exe)
            .args(args)
            .arg("--socket")
            .arg(self.dir.join("state/control.sock"))
            .output()
            .map_err(io_err)?;
        if !out.status.success() {
            return Err(format!(
                "mqvisor {} on {}: {}",
                args.join(" "),
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Owner of every tenant this node lists (`None`: unowned).
    fn owners(&self, exe: &Path) -> Result<BTreeMap<String, Option<String>>, String> {
        let json = self.ask(exe, &["tenant", "list", "--json"])?;
        let list: Vec<serde_json::Value> = serde_json::from_str(&json).map_err(io_err)?;
        Ok(list
            .iter()
            .filter_map(|t| Some((t["name"].as_str()?.to_string(), t["node"].as_str().map(str::to_string))))
            .collect())
    }

    /// Tenants this node runs (state "running").
    fn running(&self, exe: &Path) -> Result<usize, String> {
        let json = self.ask(exe, &["tenant", "list", "--json"])?;
        let list: Vec<serde_json::Value> = serde_json::from_str(&json).map_err(io_err)?;
        Ok(list.iter().filter(|t| t["state"] == "running").count())
    }

    /// Processes working in this node's directory: its daemon and the
    /// tenants' processes it started.
    fn processes(&self) -> Vec<libc::pid_t> {
        let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<libc::pid_t>().ok())
            .filter(|pid| std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(&self.dir)))
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|st| st.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
            })
            .collect()
    }

    /// kill -9 of this node's daemon (its tenants' processes die with it).
    fn kill(&mut self) -> Result<(), String> {
        self.child.kill().map_err(io_err)?;
        let _ = self.child.wait();
        self.killed = true;
        Ok(())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if !self.killed {
            if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
                // SAFETY: kill(2) on our own child with a valid signal.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if !self.dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The benchmark's directory, removed when dropped (after the processes
/// in it, which are dropped first).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Etcd and three nodes, and the benchmark's directory; the nodes come
/// first so they stop before etcd does.
struct Fleet {
    nodes: Vec<Node>,
    _etcd: Etcd,
    _scratch: Scratch,
    /// The shared port, the relay port and etcd's URL, to start a node again.
    ports: (u16, u16, String),
}

impl Fleet {
    fn start(exe: &Path) -> Result<Fleet, String> {
        let dir = std::env::temp_dir().join(format!("mqvisor-bench-fleet-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(io_err)?;
        let scratch = Scratch(dir.clone());
        let etcd = Etcd::start(&dir)?;
        let (port, relay) = (free_port()?, free_port()?);
        let mut nodes = Vec::new();
        for i in 1..=NODES {
            nodes.push(Node::start(exe, &dir, i, port, relay, &etcd.url)?);
        }
        let url = etcd.url.clone();
        let fleet = Fleet { nodes, _etcd: etcd, _scratch: scratch, ports: (port, relay, url) };
        // Every node registered before any tenant is placed.
        fleet.all_registered(exe, 0)?;
        Ok(fleet)
    }

    /// Waits until node `asked` lists every node as registered.
    fn all_registered(&self, exe: &Path, asked: usize) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let json = self.nodes[asked].ask(exe, &["node", "--json", "list"])?;
            let value: serde_json::Value = serde_json::from_str(&json).map_err(io_err)?;
            let live = value.as_array().or_else(|| value["nodes"].as_array()).map_or(0, Vec::len);
            if live == usize::from(NODES) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("only {live} of {NODES} nodes registered within 20 s: {json}"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Starts node `i` (0-based) again, in its own directory, after a kill.
    fn restart(&mut self, exe: &Path, i: usize) -> Result<(), String> {
        let (port, relay, url) = self.ports.clone();
        let scratch = self.nodes[i].dir.parent().ok_or("no scratch directory")?.to_path_buf();
        let number = u8::try_from(i + 1).map_err(io_err)?;
        let node = Node::start(exe, &scratch, number, port, relay, &url)?;
        // The old one's directory is the new one's: not removed on drop.
        let mut old = std::mem::replace(&mut self.nodes[i], node);
        old.dir = PathBuf::new();
        Ok(())
    }

    fn index(&self, node: &str) -> Result<usize, String> {
        self.nodes.iter().position(|n| n.name == node).ok_or(format!("no node {node}"))
    }

    /// Waits until each of `tenants` has an owner, as node `asked` lists them.
    fn owners_of(
        &self,
        exe: &Path,
        asked: usize,
        tenants: &[String],
        within: Duration,
    ) -> Result<BTreeMap<String, String>, String> {
        let deadline = Instant::now() + within;
        loop {
            let owners = self.nodes[asked].owners(exe)?;
            let owned: BTreeMap<String, String> =
                tenants.iter().filter_map(|t| Some((t.clone(), owners.get(t)?.clone()?))).collect();
            if owned.len() == tenants.len() {
                return Ok(owned);
            }
            if Instant::now() > deadline {
                return Err(format!("{} of {} tenants owned after {within:?}", owned.len(), tenants.len()));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// One CONNECT as `user` through `addr`: true if the CONNACK accepts.
fn connack(addr: SocketAddr, client_id: &str, user: &str) -> Option<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let connect = Connect {
        version: Version::V3_1_1,
        clean_start: true,
        keep_alive: 600,
        properties: Properties::default(),
        client_id: client_id.into(),
        will: None,
        username: Some(user.into()),
        password: None,
    };
    (&stream).write_all(&encode(&Packet::Connect(Box::new(connect)))).ok()?;
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    match read_packet(&mut reader, &mut Vec::new()).ok()? {
        Packet::Connack(c) if c.code == 0 => Some(stream),
        _ => None,
    }
}

/// Connects until the CONNACK accepts (a tenant being placed or booted is
/// refused meanwhile), within `within`.
fn connect_until(addr: SocketAddr, client_id: &str, user: &str, within: Duration) -> Result<TcpStream, String> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(stream) = connack(addr, client_id, user) {
            return Ok(stream);
        }
        if Instant::now() > deadline {
            return Err(format!("{user} not served through {addr} within {within:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `samples` QoS 1 round trips (publish to its own subscription, one at a
/// time), microseconds, after a tenth as many not counted.
fn round_trips(addr: SocketAddr, user: &str, samples: usize) -> Result<Vec<f64>, String> {
    let (mut stream, mut reader) = connect_as(addr, "bench-rtt", Some(user))?;
    let mut buf = Vec::new();
    let options =
        SubscriptionOptions { qos: QoS::AtLeastOnce, no_local: false, retain_as_published: false, retain_handling: 0 };
    let subscribe =
        Subscribe { packet_id: 1, properties: Properties::default(), filters: vec![("rtt".into(), options)] };
    stream.write_all(&encode(&Packet::Subscribe(subscribe))).map_err(io_err)?;
    read_packet(&mut reader, &mut buf).map_err(io_err)?;
    let mut times = Vec::with_capacity(samples);
    let mut id = 1u16;
    // The first tenth warms up and is not counted.
    for i in 0..samples + samples / 10 {
        id = id % 60_000 + 1;
        let publish = Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: Arc::from("rtt"),
            packet_id: Some(id),
            properties: Default::default(),
            payload: Payload::from(b"ping".to_vec()),
        };
        let started = Instant::now();
        stream.write_all(&encode(&Packet::Publish(publish))).map_err(io_err)?;
        // Its PUBACK and the echo, in either order.
        let (mut acked, mut echoed) = (false, false);
        while !(acked && echoed) {
            match read_packet(&mut reader, &mut buf).map_err(io_err)? {
                Packet::Puback(_) => acked = true,
                Packet::Publish(echo) => {
                    let ack =
                        Ack { packet_id: echo.packet_id.unwrap_or(0), code: 0, properties: Properties::default() };
                    stream.write_all(&encode(&Packet::Puback(ack))).map_err(io_err)?;
                    echoed = true;
                }
                _ => {}
            }
        }
        if i >= samples / 10 {
            times.push(started.elapsed().as_secs_f64() * 1e6);
        }
    }
    Ok(times)
}

/// (a): direct against relayed, one tenant.
fn relay(exe: &Path, fleet: &Fleet, o: &Options) -> Result<(), String> {
    fleet.nodes[0].ask(exe, &["tenant", "add", "relayed"])?;
    let owners = fleet.owners_of(exe, 0, &["relayed".to_string()], Duration::from_secs(20))?;
    let owner = fleet.index(&owners["relayed"])?;
    let other = (owner + 1) % fleet.nodes.len();
    let (direct, relayed) = (fleet.nodes[owner].addr, fleet.nodes[other].addr);
    // Boot it before measuring, and wait until the relaying node knows its
    // owner (each node reads the owners from etcd once a second; until then
    // it answers "server unavailable").
    drop(connect_until(direct, "bench-boot", "relayed:", Duration::from_secs(20))?);
    drop(connect_until(relayed, "bench-boot", "relayed:", Duration::from_secs(20))?);
    let shape = Shape {
        publishers: 1,
        subscribers: 1,
        qos: QoS::AtLeastOnce,
        messages: o.messages,
        durable: false,
        rate: None,
    };
    // Best of two each, alternating.
    let (mut best_direct, mut best_relayed) = (0f64, 0f64);
    for _ in 0..2 {
        best_direct = best_direct.max(run_shape_as(direct, shape, Some("relayed:"))?.delivered_per_s);
        best_relayed = best_relayed.max(run_shape_as(relayed, shape, Some("relayed:"))?.delivered_per_s);
    }
    // Two rounds each, alternating, pooled: half the samples per round.
    let (mut rtt_direct, mut rtt_relayed) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        rtt_direct.extend(round_trips(direct, "relayed:", o.samples.div_ceil(2))?);
        rtt_relayed.extend(round_trips(relayed, "relayed:", o.samples.div_ceil(2))?);
    }
    rtt_direct.sort_by(f64::total_cmp);
    rtt_relayed.sort_by(f64::total_cmp);
    let rtt_direct_n = rtt_direct.len();
    let rtt_direct = (percentile(&rtt_direct, 0.5), percentile(&rtt_direct, 0.99));
    let rtt_relayed = (percentile(&rtt_relayed, 0.5), percentile(&rtt_relayed, 0.99));
    println!(
        "Relayed against direct: one tenant owned by {}, reached through it (direct) and through {} (relayed to it)",
        fleet.nodes[owner].name, fleet.nodes[other].name
    );
    println!("QoS 1 1->1, {} messages of 100 bytes, best of two:", o.messages);
    println!("  direct    {best_direct:>9.0} msg/s  1.00x");
    println!("  relayed   {best_relayed:>9.0} msg/s  {:.2}x", best_relayed / best_direct);
    println!(
        "QoS 1 round trip (publish to its own subscription, one at a time), {} samples each, two rounds alternating:",
        rtt_direct_n
    );
    println!("  direct    p50 {:>8.1} us  p99 {:>8.1} us  1.00x  1.00x", rtt_direct.0, rtt_direct.1);
    println!(
        "  relayed   p50 {:>8.1} us  p99 {:>8.1} us  {:.2}x  {:.2}x",
        rtt_relayed.0,
        rtt_relayed.1,
        rtt_relayed.0 / rtt_direct.0,
        rtt_relayed.1 / rtt_direct.1
    );
    fleet.nodes[0].ask(exe, &["tenant", "remove", "relayed"])?;
    Ok(())
}

/// (b): the time to re-place a lost node's tenants.
fn loss(exe: &Path, fleet: &mut Fleet, o: &Options) -> Result<(), String> {
    let names: Vec<String> = (0..o.tenants).map(|i| format!("t{i}")).collect();
    for name in &names {
        fleet.nodes[0].ask(exe, &["tenant", "add", name])?;
    }
    let owners = fleet.owners_of(exe, 0, &names, Duration::from_secs(60))?;
    let started = Instant::now();
    let mut held = Vec::with_capacity(names.len());
    for name in &names {
        let addr = fleet.nodes[fleet.index(&owners[name])?].addr;
        held.push(connect_until(addr, "bench-hold", &format!("{name}:"), Duration::from_secs(30))?);
    }
    let booted = started.elapsed();
    let mut running = 0;
    for node in &fleet.nodes {
        running += node.running(exe)?;
    }
    let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
    for owner in owners.values() {
        *per_node.entry(owner.as_str()).or_default() += 1;
    }
    // The node with the most tenants is the one lost.
    let (victim_name, _) = per_node.iter().max_by_key(|(_, n)| **n).ok_or("no tenants")?;
    let victim = fleet.index(victim_name)?;
    let lost: Vec<String> = names.iter().filter(|n| owners[*n] == *victim_name).cloned().collect();
    let survivors: Vec<SocketAddr> =
        fleet.nodes.iter().enumerate().filter(|(i, _)| *i != victim).map(|(_, n)| n.addr).collect();
    println!(
        "Node loss: {} tenants on {NODES} nodes ({}), each booted by one client through its owner ({:.1} s for all; \
         {running} running)",
        names.len(),
        per_node.iter().map(|(n, c)| format!("{n} {c}")).collect::<Vec<_>>().join(", "),
        booted.as_secs_f64()
    );
    fleet.nodes[victim].kill()?;
    let killed = Instant::now();
    // Its tenants' processes die with it; any left would be killed here
    // (they are this benchmark's own) and counted.
    let mut left = fleet.nodes[victim].processes();
    let deadline = Instant::now() + Duration::from_secs(2);
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        left = fleet.nodes[victim].processes();
    }
    for pid in &left {
        // SAFETY: kill(2) with a valid signal on a process started in this
        // benchmark's own directory.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    // Every lost tenant's client reconnects at once, through the survivors
    // in turn, retrying every 50 ms.
    let clients: Vec<_> = lost
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let addr = survivors[i % survivors.len()];
            let user = format!("{name}:");
            std::thread::spawn(move || {
                let stream = connect_until(addr, "bench-back", &user, Duration::from_secs(120))?;
                Ok::<_, String>((killed.elapsed(), stream))
            })
        })
        .collect();
    let mut times = Vec::with_capacity(lost.len());
    let mut back = Vec::with_capacity(lost.len());
    for client in clients {
        let (time, stream) = client.join().map_err(|_| "a reconnecting client panicked")??;
        times.push(time.as_secs_f64());
        back.push(stream);
    }
    let total = killed.elapsed();
    times.sort_by(f64::total_cmp);
    let asked = (victim + 1) % fleet.nodes.len();
    let moved = fleet.owners_of(exe, asked, &lost, Duration::from_secs(10))?;
    let mut now_on: BTreeMap<&str, usize> = BTreeMap::new();
    for owner in moved.values() {
        *now_on.entry(owner.as_str()).or_default() += 1;
    }
    println!(
        "kill -9 of {}'s daemon: {} tenants moved ({}); from the kill to each one's CONNACK through a survivor \
         (one client per tenant retrying every 50 ms, all at once):",
        fleet.nodes[victim].name,
        lost.len(),
        now_on.iter().map(|(n, c)| format!("{c} to {n}")).collect::<Vec<_>>().join(", ")
    );
    println!(
        "  p50 {:.2} s  p99 {:.2} s  max {:.2} s; all back {:.2} s after the kill (lease TTL {} s, {:.2}x of it)",
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        times.last().copied().unwrap_or(f64::NAN),
        total.as_secs_f64(),
        crate::serve::cluster::LEASE_TTL,
        total.as_secs_f64() / crate::serve::cluster::LEASE_TTL as f64
    );
    let mut running = 0;
    for (i, node) in fleet.nodes.iter().enumerate() {
        if i != victim {
            running += node.running(exe)?;
        }
    }
    println!(
        "  then {running} tenants running on the survivors; processes of the lost node still there 2 s after the kill: {}",
        left.len()
    );
    drop(back);
    drop(held);
    Ok(())
}

/// Runs both measurements and prints them.
pub fn fleet(exe: &Path, o: &Options) -> Result<(), String> {
    if !Path::new(ETCD).exists() {
        return Err(format!("etcd is not at {ETCD} (apt-get install etcd-server)"));
    }
    let fds = raise_fd_limit();
    if fds < o.tenants as u64 * 4 + 64 {
        return Err(format!(
            "{} tenants need about {} file descriptors; the limit is {fds}",
            o.tenants,
            o.tenants * 4 + 64
        ));
    }
    let mut fleet = Fleet::start(exe)?;
    println!("Fleet benchmark: etcd and {NODES} mqvisor serve nodes (127.0.0.2, .3, .4, one port), all on this host");
    relay(exe, &fleet, o)?;
    standby_cost(exe, &fleet, o)?;
    failovers(exe, &mut fleet, o)?;
    loss(exe, &mut fleet, o)?;
    Ok(())
}

/// Adds tenant `name` with the TOML `settings`, through node 0.
fn add_with(exe: &Path, fleet: &Fleet, name: &str, settings: &str) -> Result<(), String> {
    let file = fleet.nodes[0].dir.join(format!("{name}.toml"));
    std::fs::write(&file, settings).map_err(io_err)?;
    let file = file.to_str().ok_or("a path that is not UTF-8")?.to_string();
    fleet.nodes[0].ask(exe, &["tenant", "add", name, "--settings", &file]).map(drop)
}

/// (c): durable QoS 1 1->1 to a tenant whose state is mirrored to a
/// standby, beside one whose state is not.
fn standby_cost(exe: &Path, fleet: &Fleet, o: &Options) -> Result<(), String> {
    add_with(exe, fleet, "mirrored", "")?;
    add_with(exe, fleet, "single", "standby = \"off\"\n")?;
    let names = ["mirrored".to_string(), "single".to_string()];
    let owners = fleet.owners_of(exe, 0, &names, Duration::from_secs(20))?;
    let mut addrs = Vec::new();
    for name in &names {
        let addr = fleet.nodes[fleet.index(&owners[name])?].addr;
        drop(connect_until(addr, "bench-boot", &format!("{name}:"), Duration::from_secs(20))?);
        addrs.push(addr);
    }
    let shape =
        Shape { publishers: 1, subscribers: 1, qos: QoS::AtLeastOnce, messages: o.messages, durable: true, rate: None };
    let (mut mirrored, mut single) = (0f64, 0f64);
    for _ in 0..2 {
        mirrored = mirrored.max(run_shape_as(addrs[0], shape, Some("mirrored:"))?.delivered_per_s);
        single = single.max(run_shape_as(addrs[1], shape, Some("single:"))?.delivered_per_s);
    }
    println!(
        "State mirrored to a standby: durable QoS 1 1->1 (persistence sync, the subscriber keeps its session), {} \
         messages of 100 bytes, best of two, each through its owner:",
        o.messages
    );
    println!("  standby off ({})       {single:>9.0} msg/s  1.00x", owners["single"]);
    println!("  with a standby ({})    {mirrored:>9.0} msg/s  {:.2}x", owners["mirrored"], mirrored / single);
    for name in &names {
        fleet.nodes[0].ask(exe, &["tenant", "remove", name])?;
    }
    Ok(())
}

/// Publishes `payload` retained on `topic` as `user` through `addr`, and
/// waits for its PUBACK.
fn publish_retained(addr: SocketAddr, user: &str, topic: &str, payload: &[u8]) -> Result<(), String> {
    let stream = connect_until(addr, "bench-writer", user, Duration::from_secs(20))?;
    let publish = Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: true,
        topic: topic.into(),
        packet_id: Some(1),
        properties: Default::default(),
        payload: Payload::from(payload.to_vec()),
    };
    (&stream).write_all(&encode(&Packet::Publish(publish))).map_err(io_err)?;
    let mut reader = BufReader::new(stream.try_clone().map_err(io_err)?);
    match read_packet(&mut reader, &mut Vec::new()).map_err(io_err)? {
        Packet::Puback(_) => Ok(()),
        other => Err(format!("no PUBACK for the retained message: {other:?}")),
    }
}

/// The retained message on `topic` as `user` reads it through `addr`.
fn read_retained(addr: SocketAddr, user: &str, topic: &str) -> Result<Option<Vec<u8>>, String> {
    let stream = connect_until(addr, "bench-reader", user, Duration::from_secs(2))?;
    let subscribe = Subscribe {
        packet_id: 1,
        properties: Properties::default(),
        filters: vec![(
            topic.into(),
            SubscriptionOptions {
                qos: QoS::AtMostOnce,
                no_local: false,
                retain_as_published: false,
                retain_handling: 0,
            },
        )],
    };
    (&stream).write_all(&encode(&Packet::Subscribe(subscribe))).map_err(io_err)?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).map_err(io_err)?;
    let mut reader = BufReader::new(stream.try_clone().map_err(io_err)?);
    loop {
        match read_packet(&mut reader, &mut Vec::new()) {
            Ok(Packet::Publish(p)) => return Ok(Some(p.payload.to_vec())),
            Ok(_) => continue,
            Err(_) => return Ok(None),
        }
    }
}

/// (d): failovers in a row, each from the standby's copy.
fn failovers(exe: &Path, fleet: &mut Fleet, o: &Options) -> Result<(), String> {
    if o.kills == 0 {
        return Ok(());
    }
    let user = "failover:";
    fleet.nodes[0].ask(exe, &["tenant", "add", "failover"])?;
    let mut times = Vec::with_capacity(o.kills);
    let mut lost = 0;
    for round in 0..o.kills {
        let owners = fleet.owners_of(exe, 0, &["failover".to_string()], Duration::from_secs(30))?;
        let owner = fleet.index(&owners["failover"])?;
        let others: Vec<usize> = (0..fleet.nodes.len()).filter(|&i| i != owner).collect();
        let payload = format!("round {round}");
        publish_retained(fleet.nodes[owner].addr, user, "latest", payload.as_bytes())?;
        // The owner's standby holds a whole copy before the kill: its
        // copy's epoch file is newer than the owner's claim.
        let claimed = std::time::SystemTime::now();
        let whole = |i: usize| {
            let epoch = fleet.nodes[i].dir.join("state/replicas/failover.epoch");
            std::fs::metadata(epoch).and_then(|m| m.modified()).is_ok_and(|t| t + Duration::from_secs(60) > claimed)
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !others.iter().any(|&i| whole(i)) {
            if Instant::now() > deadline {
                return Err(format!("round {round}: no standby copy of the tenant within 20 s"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        fleet.nodes[owner].kill()?;
        let killed = Instant::now();
        let survivor = fleet.nodes[others[round % others.len()]].addr;
        let read = loop {
            if let Ok(Some(read)) = read_retained(survivor, user, "latest") {
                break read;
            }
            if killed.elapsed() > Duration::from_secs(60) {
                return Err(format!("round {round}: not served again within 60 s of the kill"));
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        times.push(killed.elapsed().as_secs_f64());
        if read != payload.as_bytes() {
            lost += 1;
        }
        fleet.restart(exe, owner)?;
        fleet.all_registered(exe, owner)?;
    }
    times.sort_by(f64::total_cmp);
    println!(
        "Failovers: {} kills in a row of the owner's daemon (kill -9), each after its standby's copy was whole; \
         from the kill to a CONNACK through a survivor that reads the last retained message back:",
        o.kills
    );
    println!(
        "  p50 {:.2} s  p99 {:.2} s  max {:.2} s (lease TTL {} s); last retained message lost in {lost} of {}",
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        times.last().copied().unwrap_or(f64::NAN),
        crate::serve::cluster::LEASE_TTL,
        o.kills
    );
    fleet.nodes[0].ask(exe, &["tenant", "remove", "failover"])?;
    Ok(())
}
