//! End-to-end tests of a fleet: `mqvisor serve` nodes sharing one etcd
//! (`[cluster]`). A real etcd (Debian's `etcd-server`) started here on free
//! ports with a data directory of its own, three real daemons on 127.0.0.2,
//! .3 and .4 with the same port number, real VMs.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::daemon::{Daemon, free_port};
use common::wire::{connect_as, puback_code, publish, publish_v5, read_packet, subscribe, try_read_packet};
use common::{kvm_available, tool_available};

const ETCD: &str = "/usr/bin/etcd";

/// An etcd of this test's own, killed (its own pid) and its data removed
/// when dropped.
struct Etcd {
    child: Child,
    dir: PathBuf,
    url: String,
    peer_url: String,
}

impl Etcd {
    fn start(name: &str) -> Etcd {
        let dir = std::env::temp_dir().join(format!("mqvisor-fleet-etcd-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Etcd::spawn(&dir, &url, &peer_url);
        let etcd = Etcd { child, dir, url, peer_url };
        etcd.wait_answer();
        etcd
    }

    fn spawn(dir: &std::path::Path, url: &str, peer_url: &str) -> Child {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("etcd.log")).unwrap();
        Command::new(ETCD)
            .args(["--name", "fleet", "--data-dir"])
            .arg(dir.join("data"))
            .args(["--listen-client-urls", url, "--advertise-client-urls", url])
            .args(["--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url])
            .args(["--initial-cluster", &format!("fleet={peer_url}")])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawning etcd")
    }

    fn wait_answer(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.post("/v3/kv/range", "{\"key\":\"AA==\"}").is_none() {
            assert!(Instant::now() < deadline, "etcd did not answer within 20 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// kill -9 of etcd.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on its data and ports, and waits until it answers.
    fn start_again(&mut self) {
        self.child = Etcd::spawn(&self.dir, &self.url, &self.peer_url);
        self.wait_answer();
    }

    /// One request to etcd's JSON gateway: the answer's body.
    fn post(&self, path: &str, body: &str) -> Option<String> {
        let addr = self.url.trim_start_matches("http://");
        let mut http = TcpStream::connect(addr).ok()?;
        http.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let length = body.len();
        write!(
            http,
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {length}\r\n\r\n{body}"
        )
        .ok()?;
        let mut answer = String::new();
        http.read_to_string(&mut answer).ok()?;
        answer.starts_with("HTTP/1.1 200").then(|| answer.split_once("\r\n\r\n").map(|(_, b)| b.to_string()))?
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Node `i` (1 to 3) of a fleet on `etcd`: its shared port `port` on
/// 127.0.0.(i+1), its relay port `relay` there.
fn node(test: &str, i: u8, port: u16, relay: u16, etcd: &str) -> Daemon {
    node_with(test, i, port, relay, etcd, "", "")
}

/// A short name for `test` in paths: a unix socket's path must stay short,
/// and tests of one binary run in one process (`cargo test`), so the pid
/// alone does not keep them apart.
fn short(test: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    test.hash(&mut hasher);
    format!("{:08x}", hasher.finish() & 0xffff_ffff)
}

/// As [`node`], with more top-level keys (`{host}` standing for the
/// node's address) and more `[defaults]`.
fn node_with(test: &str, i: u8, port: u16, relay: u16, etcd: &str, top: &str, defaults: &str) -> Daemon {
    // Short: the control socket's path must fit in a unix socket address.
    let dir = std::env::temp_dir().join(format!("mqvisor-fleet-{}-{i}-{}", short(test), std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let host = format!("127.0.0.{}", i + 1);
    let top = top.replace("{host}", &host);
    std::fs::write(
        dir.join("serve.toml"),
        format!(
            "listen = \"{host}:{port}\"\nstate_dir = \"state\"\nmetrics_listen = \"127.0.0.1:{}\"\n{top}\
             [defaults]\nmemory = 64\nmax_connections = 100\n{defaults}\
             [cluster]\netcd = [\"{etcd}\"]\nnode = \"n{i}\"\nadvertise = \"{host}:{relay}\"\n",
            free_port()
        ),
    )
    .unwrap();
    Daemon::spawn(dir)
}

/// Etcd and three nodes, or `None` (said loudly) where they cannot run.
fn fleet(test: &str) -> Option<(Etcd, Vec<Daemon>)> {
    fleet_with(test, "")
}

/// As [`fleet`], with more `[defaults]` on every node.
fn fleet_with(test: &str, defaults: &str) -> Option<(Etcd, Vec<Daemon>)> {
    if !kvm_available(test) || !tool_available(test, "etcd (Debian's etcd-server)", &format!("test -x {ETCD}")) {
        return None;
    }
    let etcd = Etcd::start(test);
    let (port, relay) = (free_port(), free_port());
    let nodes = (1..=3).map(|i| node_with(test, i, port, relay, &etcd.url, "", defaults)).collect();
    Some((etcd, nodes))
}

/// A session queue that holds every message the failover tests send (the
/// default holds 1,000).
const BIG_QUEUE: &str = "max_queued_messages = 4000\n";

/// A TCP forwarder to etcd that the test can cut: one node's way to etcd,
/// so that this node alone loses it (a partition) while the others keep it.
struct Link {
    url: String,
    cut: Arc<AtomicBool>,
}

impl Link {
    fn to(etcd: &Etcd) -> Link {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let target = etcd.url.trim_start_matches("http://").to_string();
        let cut = Arc::new(AtomicBool::new(false));
        let cutting = cut.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if cutting.load(Ordering::Relaxed) {
                    continue; // dropped: closed unanswered
                }
                let Ok(upstream) = TcpStream::connect(&target) else { continue };
                let cutting = cutting.clone();
                for (mut from, mut to) in
                    [(client.try_clone().unwrap(), upstream.try_clone().unwrap()), (upstream, client)]
                {
                    let cutting = cutting.clone();
                    std::thread::spawn(move || {
                        let mut buffer = [0u8; 16 * 1024];
                        while let Ok(n) = from.read(&mut buffer) {
                            if n == 0 || cutting.load(Ordering::Relaxed) || to.write_all(&buffer[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Link { url, cut }
    }
}

/// True while process `pid` exists and is no zombie.
fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
}

/// Connects to `addr` as `user` until the CONNACK accepts (a tenant being
/// placed is refused as unavailable meanwhile), within `within`.
fn connect_until(addr: SocketAddr, client_id: &str, user: &str, within: Duration) -> TcpStream {
    connect_session_until(addr, client_id, user, true, within)
}

/// As [`connect_until`], with a clean session or not.
fn connect_session_until(addr: SocketAddr, client_id: &str, user: &str, clean: bool, within: Duration) -> TcpStream {
    let deadline = Instant::now() + within;
    loop {
        let attempt = (|| {
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
            stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
            stream.write_all(&connect_as(4, client_id, clean, Some(user), None)).ok()?;
            let (kind, body) = try_read_packet(&mut stream).ok()?;
            (kind == 0x20 && body.get(1) == Some(&0)).then_some(stream)
        })();
        if let Some(stream) = attempt {
            return stream;
        }
        assert!(Instant::now() < deadline, "{user} not served through {addr} within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Subscribes to `topic` and returns the first message's payload (a
/// retained one comes at once), if one comes within 5 s.
fn first_message(stream: &mut TcpStream, topic: &str) -> Option<Vec<u8>> {
    stream.write_all(&subscribe(topic, 0, 1)).unwrap();
    assert_eq!(read_packet(stream).0, 0x90, "SUBACK");
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    try_read_packet(stream).ok().map(|(_, body)| {
        let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
        body[2 + topic_len..].to_vec()
    })
}

/// The node that owns `tenant`, as node `asked` lists it, once one does.
fn owner(asked: &Daemon, tenant: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let list = asked.list();
        if let Some(node) = list.iter().find(|t| t["name"] == tenant).and_then(|t| t["node"].as_str()) {
            return node.to_string();
        }
        assert!(Instant::now() < deadline, "no owner of {tenant} within {within:?}: {list:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Tenant `tenant`'s processes across the fleet: (node, pid) for each node
/// that runs one.
fn processes(nodes: &[Daemon], tenant: &str) -> Vec<(String, u64)> {
    nodes
        .iter()
        .flat_map(|n| n.list())
        .filter(|t| t["name"] == tenant)
        .filter_map(|t| Some((t["node"].as_str()?.to_string(), t["pid"].as_u64()?)))
        .collect()
}

#[test]
fn a_tenant_added_on_one_node_is_served_through_all_by_one_broker() {
    let test = "a_tenant_added_on_one_node_is_served_through_all_by_one_broker";
    let Some((_etcd, nodes)) = fleet(test) else { return };
    let (ok, _, err) = nodes[0].tenant(&["add", "acme"]);
    assert!(ok, "tenant add through node 1: {err}");
    let (ok, _, err) = nodes[1].tenant(&["add", "acme"]);
    assert!(!ok && err.contains("exists"), "a second add through node 2: {err}");
    let owned_by = owner(&nodes[1], "acme", Duration::from_secs(10));
    // Every node lists it, with the same owner.
    for n in &nodes {
        assert_eq!(owner(n, "acme", Duration::from_secs(5)), owned_by);
    }
    let started = Instant::now();
    let mut publisher = connect_until(nodes[2].addr, "pub", "acme:p", Duration::from_secs(15));
    publisher.write_all(&publish("fleet/news", b"through node 3", 1, 1, true)).unwrap();
    assert_eq!(read_packet(&mut publisher).0, 0x40, "PUBACK");
    let mut reader = connect_until(nodes[1].addr, "sub", "acme:s", Duration::from_secs(15));
    assert_eq!(first_message(&mut reader, "fleet/news").as_deref(), Some(&b"through node 3"[..]));
    let mut third = connect_until(nodes[0].addr, "sub1", "acme:s", Duration::from_secs(15));
    assert_eq!(first_message(&mut third, "fleet/news").as_deref(), Some(&b"through node 3"[..]));
    eprintln!("{test}: retained message through node 3, read through nodes 2 and 1, in {:?}", started.elapsed());
    // One broker: one process in the whole fleet, on its owner.
    let running = processes(&nodes, "acme");
    assert_eq!(running.len(), 1, "{running:?}");
    assert_eq!(running[0].0, owned_by);
    // Two of the three clients came through a node that does not own it:
    // relayed. Each node's page shows the tenants it runs, and only those.
    let mut relayed = 0;
    for (i, n) in nodes.iter().enumerate() {
        let node = format!("n{}", i + 1);
        relayed += n.metric(&format!("mqvisor_fleet_relayed_connections_total{{node=\"{node}\"}}"));
        let owned = n.metric(&format!("mqvisor_fleet_tenants_owned{{node=\"{node}\"}}"));
        assert_eq!(owned, u64::from(node == owned_by), "{node}");
        assert_eq!(n.metrics().contains("mqvisor_tenant_up{tenant=\"acme\"} 1"), node == owned_by, "{node}");
    }
    assert_eq!(relayed, 2);
    // The owner's relay port takes no one without the fleet's relay key:
    // neither a PROXY header without it nor one with a wrong key.
    let (status, body) = nodes[0].http("GET", "/nodes", b"");
    assert_eq!(status, 200, "{body}");
    let listed: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    let relay: SocketAddr =
        listed.iter().find(|n| n["name"] == owned_by.as_str()).unwrap()["advertise"].as_str().unwrap().parse().unwrap();
    let owner_node = &nodes[index(&owned_by)];
    let refused_before = owner_node.metric(&format!("mqvisor_fleet_relay_refused_total{{node=\"{owned_by}\"}}"));
    for key in [None, Some([0u8; 32])] {
        let mut stranger = TcpStream::connect(relay).unwrap();
        stranger.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        stranger.write_all(&proxy_v2_header(key)).unwrap();
        stranger.write_all(&connect_as(4, "stranger", true, Some("acme:x"), None)).unwrap();
        let mut byte = [0u8; 1];
        let answer = stranger.read(&mut byte);
        assert!(
            matches!(&answer, Ok(0)) || matches!(&answer, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "a relayed connection with key {key:?} was not closed: {answer:?}"
        );
    }
    let refused = owner_node.metric(&format!("mqvisor_fleet_relay_refused_total{{node=\"{owned_by}\"}}"));
    assert_eq!(refused - refused_before, 2);
    // Removed through another node: gone from every node, its clients refused.
    let (ok, _, err) = nodes[1].tenant(&["remove", "acme"]);
    assert!(ok, "tenant remove through node 2: {err}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while nodes.iter().any(|n| n.list().iter().any(|t| t["name"] == "acme")) {
        assert!(Instant::now() < deadline, "acme still listed 10 s after its removal");
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut late = TcpStream::connect(nodes[0].addr).unwrap();
    late.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    late.write_all(&connect_as(4, "late", true, Some("acme:x"), None)).unwrap();
    let (kind, body) = read_packet(&mut late);
    assert_eq!((kind, body[1]), (0x20, 4), "a removed tenant's client: bad user name or password");
}

#[test]
fn kill_9_of_the_owner_brings_the_tenant_back_through_a_survivor() {
    let test = "kill_9_of_the_owner_brings_the_tenant_back_through_a_survivor";
    let Some((_etcd, mut nodes)) = fleet(test) else { return };
    let (ok, _, err) = nodes[0].tenant(&["add", "globex"]);
    assert!(ok, "tenant add: {err}");
    let owned_by = owner(&nodes[0], "globex", Duration::from_secs(10));
    let dead = usize::from(owned_by.trim_start_matches('n').parse::<u8>().unwrap()) - 1;
    let survivor = (dead + 1) % 3;
    let mut client = connect_until(nodes[survivor].addr, "c", "globex:c", Duration::from_secs(15));
    client.write_all(&publish("t", b"x", 1, 1, false)).unwrap();
    assert_eq!(read_packet(&mut client).0, 0x40, "PUBACK before the kill");
    // kill -9 of the owner's daemon (its tenant's process dies with it).
    nodes[dead].child.kill().unwrap();
    let _ = nodes[dead].child.wait();
    let killed = Instant::now();
    // Its client, relayed, loses the connection.
    client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut byte = [0u8; 1];
    assert!(matches!(client.read(&mut byte), Ok(0) | Err(_)), "the relayed client outlived its broker");
    let mut back = connect_until(nodes[survivor].addr, "c", "globex:c", Duration::from_secs(15));
    back.write_all(&publish("t", b"y", 1, 1, false)).unwrap();
    assert_eq!(read_packet(&mut back).0, 0x40, "PUBACK after the move");
    let moved = killed.elapsed();
    eprintln!("{test}: served again through a survivor {moved:?} after kill -9 of its owner");
    assert!(moved < Duration::from_secs(15), "{moved:?}");
    let alive: Vec<Daemon> = nodes.drain(..).enumerate().filter(|(i, _)| *i != dead).map(|(_, n)| n).collect();
    let running = processes(&alive, "globex");
    assert_eq!(running.len(), 1, "one process among the survivors: {running:?}");
    assert_ne!(running[0].0, owned_by);
}

#[test]
fn a_node_cut_off_from_etcd_stops_its_tenant_before_another_node_starts_it() {
    let test = "a_node_cut_off_from_etcd_stops_its_tenant_before_another_node_starts_it";
    if !kvm_available(test) || !tool_available(test, "etcd (Debian's etcd-server)", &format!("test -x {ETCD}")) {
        return;
    }
    let etcd = Etcd::start("cut");
    let links: Vec<Link> = (0..3).map(|_| Link::to(&etcd)).collect();
    let (port, relay) = (free_port(), free_port());
    let nodes: Vec<Daemon> = (1..=3).map(|i| node(test, i, port, relay, &links[usize::from(i) - 1].url)).collect();
    let (ok, _, err) = nodes[0].tenant(&["add", "initech"]);
    assert!(ok, "tenant add: {err}");
    let owned_by = owner(&nodes[0], "initech", Duration::from_secs(10));
    let cut = usize::from(owned_by.trim_start_matches('n').parse::<u8>().unwrap()) - 1;
    let other = (cut + 1) % 3;
    let mut client = connect_until(nodes[other].addr, "c", "initech:c", Duration::from_secs(15));
    client.write_all(&publish("t", b"acknowledged before the cut", 1, 1, true)).unwrap();
    assert_eq!(read_packet(&mut client).0, 0x40, "PUBACK before the cut");
    let running = processes(&nodes, "initech");
    assert_eq!(running.len(), 1, "{running:?}");
    let first_pid = running[0].1;
    // The owner alone loses etcd.
    links[cut].cut.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let (mut first_gone, mut second_up) = (None, None);
    let others: Vec<&Daemon> = nodes.iter().enumerate().filter(|(i, _)| *i != cut).map(|(_, n)| n).collect();
    while second_up.is_none() {
        assert!(started.elapsed() < Duration::from_secs(30), "no survivor ran initech within 30 s of the cut");
        let first = alive(first_pid);
        if !first && first_gone.is_none() {
            first_gone = Some(started.elapsed());
        }
        // Booted on a client's arrival: one keeps trying through a survivor.
        let _ = std::thread::spawn({
            let addr = others[0].addr;
            move || {
                let mut stream = TcpStream::connect(addr).ok()?;
                stream.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
                stream.write_all(&connect_as(4, "probe", true, Some("initech:p"), None)).ok()?;
                try_read_packet(&mut stream).ok()
            }
        });
        let second: Vec<u64> = processes(&nodes[..], "initech")
            .into_iter()
            .filter(|(node, pid)| *node != owned_by && alive(*pid))
            .map(|(_, pid)| pid)
            .collect();
        assert!(!first || second.is_empty(), "two nodes ran initech at once: {first_pid} and {second:?}");
        if !second.is_empty() {
            second_up = Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (gone, up) = (first_gone.unwrap(), second_up.unwrap());
    eprintln!("{test}: the cut-off owner's tenant stopped {gone:?} after the cut, a survivor ran it {up:?} after");
    // Fenced before its lease (6 s) could expire, the lease renewed at most
    // 2 s before the cut.
    assert!(gone < Duration::from_secs(6), "{gone:?}");
    assert!(gone < up);
    drop(others);
    // Healed: the node that was cut off serves it again, relaying to its owner.
    links[cut].cut.store(false, Ordering::Relaxed);
    let mut back = connect_until(nodes[cut].addr, "back", "initech:b", Duration::from_secs(15));
    back.write_all(&publish("u", b"y", 1, 1, false)).unwrap();
    assert_eq!(read_packet(&mut back).0, 0x40, "PUBACK through the healed node");
    let running = processes(&nodes, "initech");
    assert_eq!(running.len(), 1, "{running:?}");
    assert_ne!(running[0].0, owned_by);
    // Its state moved with it: what the cut-off owner acknowledged is there.
    let kept = retained(&nodes[cut], "initech", "t");
    assert_eq!(kept.as_deref(), Some(&b"acknowledged before the cut"[..]), "lost across the partition");
}

#[test]
fn a_drained_node_hands_its_tenants_to_the_others_and_takes_none() {
    let test = "a_drained_node_hands_its_tenants_to_the_others_and_takes_none";
    let Some((_etcd, nodes)) = fleet(test) else { return };
    let tenants = ["t1", "t2", "t3", "t4", "t5", "t6"];
    for t in tenants {
        let (ok, _, err) = nodes[0].tenant(&["add", t]);
        assert!(ok, "tenant add {t}: {err}");
    }
    let owners: Vec<String> = tenants.iter().map(|t| owner(&nodes[0], t, Duration::from_secs(10))).collect();
    // The node that owns t1 is drained, through another node.
    let drained = owners[0].clone();
    let i = usize::from(drained.trim_start_matches('n').parse::<u8>().unwrap()) - 1;
    let asked = &nodes[(i + 1) % 3];
    let mut client = connect_until(nodes[i].addr, "c", "t1:c", Duration::from_secs(15));
    client.write_all(&publish("t", b"x", 1, 1, false)).unwrap();
    assert_eq!(read_packet(&mut client).0, 0x40, "PUBACK before the drain");
    let (ok, _, err) = asked.ask("node", &["drain", "nobody"]);
    assert!(!ok && err.contains("no node \"nobody\""), "{err}");
    let (ok, _, err) = asked.ask("node", &["drain", &drained]);
    assert!(ok, "node drain {drained}: {err}");
    let started = Instant::now();
    let deadline = started + Duration::from_secs(15);
    loop {
        let (ok, json, err) = asked.ask("node", &["list", "--json"]);
        assert!(ok, "node list: {err}");
        let list: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
        assert_eq!(list.len(), 3, "{list:?}");
        let mine = list.iter().find(|n| n["name"] == drained.as_str()).unwrap();
        assert_eq!(mine["drained"], true);
        let placed: Vec<String> = tenants.iter().map(|t| owner(asked, t, Duration::from_secs(10))).collect();
        if mine["tenants"] == 0 && placed.iter().all(|o| *o != drained) {
            break;
        }
        assert!(Instant::now() < deadline, "{drained} still owns tenants 15 s after its drain: {list:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "{test}: {} tenants moved off {drained} in {:?}",
        owners.iter().filter(|o| **o == drained).count(),
        started.elapsed()
    );
    // Its client was disconnected; through the drained node it is served
    // again, relayed to the new owner.
    client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut byte = [0u8; 1];
    assert!(matches!(client.read(&mut byte), Ok(0) | Err(_)), "the client outlived the drain");
    let mut back = connect_until(nodes[i].addr, "c", "t1:c", Duration::from_secs(15));
    back.write_all(&publish("t", b"y", 1, 1, false)).unwrap();
    assert_eq!(read_packet(&mut back).0, 0x40, "PUBACK through the drained node");
    assert!(processes(&nodes, "t1").iter().all(|(node, _)| *node != drained));
    // A tenant added now is placed elsewhere too.
    let (ok, _, err) = nodes[i].tenant(&["add", "t7"]);
    assert!(ok, "tenant add t7: {err}");
    assert_ne!(owner(asked, "t7", Duration::from_secs(10)), drained);
    let (ok, table, _) = asked.ask("node", &["list"]);
    assert!(ok && table.contains("DRAINED") && table.contains(&drained), "{table}");
    let (ok, _, err) = asked.ask("node", &["undrain", &drained]);
    assert!(ok, "node undrain: {err}");
    let (ok, _, err) = asked.ask("node", &["undrain", &drained]);
    assert!(!ok && err.contains("is drained"), "{err}");
}

const HAPROXY: &str = "/usr/sbin/haproxy";

/// HAProxy running deploy/haproxy.cfg with this test's addresses, killed
/// (its own pid) when dropped.
struct Haproxy {
    child: Child,
    addr: SocketAddr,
    config: PathBuf,
}

impl Haproxy {
    fn start(test: &str, nodes: &[Daemon]) -> Haproxy {
        let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/haproxy.cfg")).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut servers = 0;
        let config: String = shipped
            .lines()
            .map(|line| {
                let words: Vec<&str> = line.split_whitespace().collect();
                match words.as_slice() {
                    ["bind", _] => format!("    bind {addr}"),
                    ["server", name, _, rest @ ..] => {
                        servers += 1;
                        format!("    server {name} {} {}", nodes[servers - 1].addr, rest.join(" "))
                    }
                    _ => line.to_string(),
                }
            })
            .map(|line| line + "\n")
            .collect();
        assert_eq!(servers, nodes.len(), "deploy/haproxy.cfg names one server per node");
        let path =
            std::env::temp_dir().join(format!("mqvisor-fleet-{}-{}.haproxy.cfg", short(test), std::process::id()));
        std::fs::write(&path, config).unwrap();
        let child = Command::new(HAPROXY)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning haproxy");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "haproxy did not listen on {addr} within 10 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        Haproxy { child, addr, config: path }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.config);
    }
}

#[test]
fn behind_haproxy_any_node_serves_and_a_lost_node_is_routed_around() {
    let test = "behind_haproxy_any_node_serves_and_a_lost_node_is_routed_around";
    let Some((_etcd, mut nodes)) = fleet(test) else { return };
    if !tool_available(test, "HAProxy (Debian's haproxy)", &format!("test -x {HAPROXY}")) {
        return;
    }
    let haproxy = Haproxy::start(test, &nodes);
    let (ok, _, err) = nodes[0].tenant(&["add", "hooli"]);
    assert!(ok, "tenant add: {err}");
    let owned_by = owner(&nodes[0], "hooli", Duration::from_secs(10));
    let mut publisher = connect_until(haproxy.addr, "pub", "hooli:p", Duration::from_secs(15));
    publisher.write_all(&publish("lb/news", b"through haproxy", 1, 1, true)).unwrap();
    assert_eq!(read_packet(&mut publisher).0, 0x40, "PUBACK");
    // Six clients, spread by HAProxy over the three nodes, all see it.
    let mut readers: Vec<TcpStream> =
        (0..6).map(|i| connect_until(haproxy.addr, &format!("r{i}"), "hooli:r", Duration::from_secs(15))).collect();
    for reader in &mut readers {
        assert_eq!(first_message(reader, "lb/news").as_deref(), Some(&b"through haproxy"[..]));
    }
    let relayed: u64 = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| n.metric(&format!("mqvisor_fleet_relayed_connections_total{{node=\"n{}\"}}", i + 1)))
        .sum();
    assert!(relayed >= 2, "HAProxy spread 7 clients and only {relayed} were relayed");
    // kill -9 of the owner: through HAProxy the tenant is served again.
    let dead = usize::from(owned_by.trim_start_matches('n').parse::<u8>().unwrap()) - 1;
    nodes[dead].child.kill().unwrap();
    let _ = nodes[dead].child.wait();
    let killed = Instant::now();
    let mut back = connect_until(haproxy.addr, "back", "hooli:b", Duration::from_secs(15));
    back.write_all(&publish("lb/news", b"after", 1, 1, false)).unwrap();
    assert_eq!(read_packet(&mut back).0, 0x40, "PUBACK after the kill");
    eprintln!("{test}: served through HAProxy again {:?} after kill -9 of the owner", killed.elapsed());
    let survivors: Vec<Daemon> = nodes.drain(..).enumerate().filter(|(i, _)| *i != dead).map(|(_, n)| n).collect();
    let running = processes(&survivors, "hooli");
    assert_eq!(running.len(), 1, "{running:?}");
}

/// Publishes QoS 1 messages on `stream` until `stop`, each acknowledged
/// within 5 s; returns how many were, or the error that ended it.
fn publish_until(mut stream: TcpStream, stop: Arc<AtomicBool>) -> Result<u32, String> {
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut acknowledged = 0u32;
    let mut id = 0u16;
    while !stop.load(Ordering::Relaxed) {
        id = id.wrapping_add(1).max(1);
        stream.write_all(&publish("load", b"m", 1, id, false)).map_err(|e| format!("after {acknowledged}: {e}"))?;
        let (kind, _) = try_read_packet(&mut stream).map_err(|e| format!("after {acknowledged}: {e}"))?;
        if kind != 0x40 {
            return Err(format!("after {acknowledged}: packet {kind:#x}, not a PUBACK"));
        }
        acknowledged += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(acknowledged)
}

#[test]
fn etcd_restarted_under_load_disturbs_nothing_and_a_long_outage_fences_then_recovers() {
    let test = "etcd_restarted_under_load_disturbs_nothing_and_a_long_outage_fences_then_recovers";
    let Some((mut etcd, nodes)) = fleet(test) else { return };
    let (ok, _, err) = nodes[0].tenant(&["add", "umbrella"]);
    assert!(ok, "tenant add: {err}");
    let owned_by = owner(&nodes[0], "umbrella", Duration::from_secs(10));
    // One client straight on the owner, one relayed by each other node.
    let streams: Vec<TcpStream> =
        (0..3).map(|i| connect_until(nodes[i].addr, &format!("p{i}"), "umbrella:p", Duration::from_secs(15))).collect();
    let pid = processes(&nodes, "umbrella")[0].1;
    let stop = Arc::new(AtomicBool::new(false));
    let publishers: Vec<_> = streams
        .into_iter()
        .map(|s| {
            let stop = stop.clone();
            std::thread::spawn(move || publish_until(s, stop))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    // A restart that is over well within the fencing time (4 s): nothing
    // is fenced, no client notices.
    let restart = Instant::now();
    etcd.kill();
    etcd.start_again();
    let took = restart.elapsed();
    std::thread::sleep(Duration::from_secs(5));
    stop.store(true, Ordering::Relaxed);
    let counts: Vec<u32> = publishers.into_iter().map(|p| p.join().unwrap().unwrap()).collect();
    eprintln!("{test}: etcd down {took:?}; QoS 1 messages acknowledged meanwhile per client: {counts:?}");
    assert!(took < Duration::from_secs(3), "etcd took {took:?} to restart: the test needs it under 3 s");
    assert!(counts.iter().all(|&n| n > 50), "{counts:?}");
    let running = processes(&nodes, "umbrella");
    assert_eq!(running, vec![(owned_by.clone(), pid)], "the tenant was not restarted or moved");
    // An outage past the fencing time: every node stops its tenants, and
    // once etcd is back the tenant is served again.
    let mut client = connect_until(nodes[1].addr, "c", "umbrella:c", Duration::from_secs(15));
    let down = Instant::now();
    etcd.kill();
    client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut byte = [0u8; 1];
    assert!(matches!(client.read(&mut byte), Ok(0) | Err(_)), "a client outlived its fenced tenant");
    let fenced = down.elapsed();
    // Its sockets close as it exits, a moment before it is gone.
    let deadline = Instant::now() + Duration::from_secs(1);
    while alive(pid) {
        assert!(Instant::now() < deadline, "the tenant's process outlived the fence");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(fenced < Duration::from_secs(6), "fenced {fenced:?} after etcd went");
    std::thread::sleep(Duration::from_secs(8).saturating_sub(down.elapsed()));
    let back = Instant::now();
    etcd.start_again();
    let mut again = connect_until(nodes[2].addr, "again", "umbrella:a", Duration::from_secs(20));
    again.write_all(&publish("t", b"x", 1, 1, false)).unwrap();
    assert_eq!(read_packet(&mut again).0, 0x40, "PUBACK after etcd came back");
    eprintln!(
        "{test}: etcd gone: tenant fenced after {fenced:?}; etcd back after 8 s: served again {:?} later",
        back.elapsed()
    );
    assert_eq!(processes(&nodes, "umbrella").len(), 1);
}

/// MQTT over TLS to `addr` with SNI `name`, trusting the CA in `ca`.
fn tls_client(addr: SocketAddr, name: &str, ca: &str) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(mqvisor::net::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let server_name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
    let connection = rustls::ClientConnection::new(Arc::new(config), server_name).unwrap();
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    rustls::StreamOwned::new(connection, tcp)
}

/// MQTT over WebSockets to `addr` with `Host: host`: each packet one
/// binary message.
struct Ws(tungstenite::WebSocket<TcpStream>, Vec<u8>);

impl Ws {
    fn connect(addr: SocketAddr, host: &str) -> Ws {
        use tungstenite::client::IntoClientRequest;
        let tcp = TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut request = format!("ws://{host}/mqtt").into_client_request().unwrap();
        request.headers_mut().insert("Sec-WebSocket-Protocol", tungstenite::http::HeaderValue::from_static("mqtt"));
        let (ws, _) = tungstenite::client::client(request, tcp).expect("WebSocket handshake");
        Ws(ws, Vec::new())
    }

    fn send(&mut self, packet: Vec<u8>) {
        self.0.send(tungstenite::Message::Binary(packet.into())).unwrap();
    }
}

impl Read for Ws {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.1.is_empty() {
            match self.0.read().map_err(std::io::Error::other)? {
                tungstenite::Message::Binary(data) => self.1.extend_from_slice(&data),
                tungstenite::Message::Close(_) => return Ok(0),
                _ => {}
            }
        }
        let n = out.len().min(self.1.len());
        out[..n].copy_from_slice(&self.1[..n]);
        self.1.drain(..n);
        Ok(n)
    }
}

#[test]
fn tls_and_websocket_clients_are_relayed_to_their_tenants_owner() {
    let test = "tls_and_websocket_clients_are_relayed_to_their_tenants_owner";
    if !kvm_available(test)
        || !tool_available(test, "etcd (Debian's etcd-server)", &format!("test -x {ETCD}"))
        || !tool_available(test, common::pki::OPENSSL, common::pki::OPENSSL_PROBE)
    {
        return;
    }
    let pki = common::pki::Pki::make("fleet-tls");
    pki.server("wildcard", "DNS:*.mq.test");
    let etcd = Etcd::start("tls");
    let (port, relay, tls, ws) = (free_port(), free_port(), free_port(), free_port());
    let top = format!("listen_tls = \"{{host}}:{tls}\"\nlisten_ws = \"{{host}}:{ws}\"\ntls_domain = \"mq.test\"\n");
    let defaults = format!("tls_cert = \"{}\"\ntls_key = \"{}\"\n", pki.path("wildcard.pem"), pki.path("wildcard.key"));
    let nodes: Vec<Daemon> = (1..=3).map(|i| node_with(test, i, port, relay, &etcd.url, &top, &defaults)).collect();
    let (ok, _, err) = nodes[0].tenant(&["add", "acme"]);
    assert!(ok, "tenant add: {err}");
    let owned_by = owner(&nodes[0], "acme", Duration::from_secs(10));
    let owner_index = usize::from(owned_by.trim_start_matches('n').parse::<u8>().unwrap()) - 1;
    let (a, b) = ((owner_index + 1) % 3, (owner_index + 2) % 3);
    let at = |i: usize, port: u16| SocketAddr::new(nodes[i].addr.ip(), port);
    // A TLS client through one node that does not own acme, by SNI (no
    // prefix): the handshake is completed by acme's process on its owner.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut publisher = loop {
        let mut client = tls_client(at(a, tls), "acme.mq.test", &pki.path("ca.pem"));
        let accepted = client
            .write_all(&connect_as(4, "tls-pub", true, Some("u"), None))
            .and_then(|()| try_read_packet(&mut client))
            .is_ok_and(|(kind, body)| kind == 0x20 && body[1] == 0);
        if accepted {
            break client;
        }
        assert!(Instant::now() < deadline, "acme not served over TLS through node {}", a + 1);
        std::thread::sleep(Duration::from_millis(200));
    };
    publisher.write_all(&publish("edge/news", b"over tls, relayed", 1, 1, true)).unwrap();
    assert_eq!(try_read_packet(&mut publisher).unwrap().0, 0x40, "PUBACK over TLS");
    // A WebSocket client through the other one, by Host.
    let mut reader = Ws::connect(at(b, ws), "acme.mq.test");
    reader.send(connect_as(4, "ws-sub", true, Some("u"), None));
    let (kind, body) = try_read_packet(&mut reader).unwrap();
    assert_eq!((kind, body[1]), (0x20, 0), "CONNACK over WebSockets");
    reader.send(subscribe("edge/news", 0, 1));
    assert_eq!(try_read_packet(&mut reader).unwrap().0, 0x90, "SUBACK");
    let (kind, body) = try_read_packet(&mut reader).unwrap();
    assert_eq!(kind & 0xf0, 0x30, "the retained PUBLISH");
    let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
    assert_eq!(&body[2 + topic_len..], b"over tls, relayed");
    let relayed =
        |i: usize| nodes[i].metric(&format!("mqvisor_fleet_relayed_connections_total{{node=\"n{}\"}}", i + 1));
    assert!(relayed(a) >= 1 && relayed(b) >= 1, "{} {}", relayed(a), relayed(b));
    assert_eq!(processes(&nodes, "acme").len(), 1);
    // An unknown name is still refused by the node the client reached.
    let mut stranger = tls_client(at(a, tls), "nobody.mq.test", &pki.path("ca.pem"));
    assert!(stranger.write_all(b"x").and_then(|()| try_read_packet(&mut stranger)).is_err());
}

/// The retained message on `topic` of `tenant` as a client through
/// `daemon` reads it (`None`: none within 5 s).
fn retained(daemon: &Daemon, tenant: &str, topic: &str) -> Option<Vec<u8>> {
    let mut reader = connect_until(daemon.addr, "reader", &format!("{tenant}:r"), Duration::from_secs(15));
    first_message(&mut reader, topic)
}

fn publish_retained(daemon: &Daemon, tenant: &str, topic: &str, payload: &[u8]) {
    let mut publisher = connect_until(daemon.addr, "writer", &format!("{tenant}:w"), Duration::from_secs(15));
    publisher.write_all(&publish(topic, payload, 1, 1, true)).unwrap();
    assert_eq!(read_packet(&mut publisher).0, 0x40, "PUBACK");
}

/// A PROXY v2 header for a plain MQTT client at 192.0.2.1 that reached
/// 198.51.100.2, with `key` as mqvisor's relay key TLV if given.
fn proxy_v2_header(key: Option<[u8; 32]>) -> Vec<u8> {
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    let tlvs = if key.is_some() { 35 } else { 0 };
    header.extend_from_slice(&[0x21, 0x11, 0, 12 + tlvs]);
    header.extend_from_slice(&[192, 0, 2, 1, 198, 51, 100, 2, 0x13, 0x88, 0x07, 0x5b]);
    if let Some(key) = key {
        header.extend_from_slice(&[0xe1, 0, 32]);
        header.extend_from_slice(&key);
    }
    header
}

fn index(node: &str) -> usize {
    usize::from(node.trim_start_matches('n').parse::<u8>().unwrap()) - 1
}

#[test]
fn a_node_keeps_the_state_of_a_tenant_only_if_no_other_node_ran_it_since() {
    let test = "a_node_keeps_the_state_of_a_tenant_only_if_no_other_node_ran_it_since";
    let Some((_etcd, mut nodes)) = fleet(test) else { return };
    let mut retired = Vec::new();
    let (ok, _, err) = nodes[0].tenant(&["add", "wonka"]);
    assert!(ok, "tenant add: {err}");
    let o = index(&owner(&nodes[0], "wonka", Duration::from_secs(10)));
    publish_retained(&nodes[o], "wonka", "s", b"v1 on its first owner");
    // Its owner stopped cleanly: its lease is revoked, and its standby
    // takes the tenant at once, with the state it mirrored.
    nodes[o].stop();
    let stopped = Instant::now();
    let s = (0..3).find(|&i| i != o).unwrap();
    let mut client = connect_until(nodes[s].addr, "c", "wonka:c", Duration::from_secs(15));
    eprintln!("{test}: served through a survivor {:?} after a clean stop of its owner", stopped.elapsed());
    drop(client.write_all(&[0xe0, 0]));
    let s = index(&owner(&nodes[s], "wonka", Duration::from_secs(5)));
    assert_ne!(s, o);
    let t = 3 - o - s;
    assert_eq!(retained(&nodes[s], "wonka", "s").as_deref(), Some(&b"v1 on its first owner"[..]), "not carried over");
    publish_retained(&nodes[s], "wonka", "s", b"v2 on the second");
    // The first owner back; the third (the second's standby) drained; the
    // second killed: the first owner takes the tenant again, without a
    // copy, and must not serve v1, which the second node's run has made
    // stale.
    let dir = nodes[o].dir.clone();
    retired.push(std::mem::replace(&mut nodes[o], Daemon::spawn(dir)));
    let (ok, _, err) = nodes[t].ask("node", &["drain", &format!("n{}", t + 1)]);
    assert!(ok, "drain: {err}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !nodes[t].ask("node", &["list", "--json"]).1.contains(&format!("\"n{}\"", o + 1)) {
        assert!(Instant::now() < deadline, "node {} did not register again", o + 1);
        std::thread::sleep(Duration::from_millis(100));
    }
    nodes[s].child.kill().unwrap();
    let _ = nodes[s].child.wait();
    let deadline = Instant::now() + Duration::from_secs(15);
    while owner(&nodes[o], "wonka", Duration::from_secs(15)) != format!("n{}", o + 1) {
        assert!(Instant::now() < deadline, "node {} did not take wonka back", o + 1);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(retained(&nodes[o], "wonka", "s"), None, "a node served its stale state");
    assert!(nodes[o].dir.join("state/tenants/wonka.state.previous").exists(), "the stale state kept aside");
    // Restarted while nobody else could take it, it keeps its own state.
    publish_retained(&nodes[o], "wonka", "s", b"v3 on the first again");
    nodes[o].stop();
    let dir = nodes[o].dir.clone();
    retired.push(std::mem::replace(&mut nodes[o], Daemon::spawn(dir)));
    assert_eq!(retained(&nodes[o], "wonka", "s").as_deref(), Some(&b"v3 on the first again"[..]));
}

#[test]
fn a_tenant_removed_and_added_again_at_once_starts_afresh() {
    let test = "a_tenant_removed_and_added_again_at_once_starts_afresh";
    let Some((_etcd, nodes)) = fleet(test) else { return };
    let (ok, _, err) = nodes[0].tenant(&["add", "reuse"]);
    assert!(ok, "{err}");
    let owned_by = owner(&nodes[0], "reuse", Duration::from_secs(10));
    let mut first = connect_until(nodes[1].addr, "a", "reuse:a", Duration::from_secs(15));
    first.write_all(&publish("secret", b"the old tenant's", 1, 1, true)).unwrap();
    assert_eq!(read_packet(&mut first).0, 0x40, "PUBACK");
    let old = processes(&nodes, "reuse");
    // Removed and added again faster than a node reads etcd (once a second).
    let (ok, _, err) = nodes[2].tenant(&["remove", "reuse"]);
    assert!(ok, "{err}");
    std::thread::sleep(Duration::from_millis(300));
    let (ok, _, err) = nodes[2].tenant(&["add", "reuse"]);
    assert!(ok, "{err}");
    // Two reads of etcd later, the old process is gone and nothing of the
    // old tenant is served.
    std::thread::sleep(Duration::from_millis(2500));
    let mut reader = connect_until(nodes[0].addr, "b", "reuse:b", Duration::from_secs(15));
    assert_eq!(first_message(&mut reader, "secret"), None, "the new tenant got the old one's retained message");
    let now = processes(&nodes, "reuse");
    assert_eq!(now.len(), 1, "{now:?}");
    assert!(!old.contains(&now[0]), "the old process ({old:?}) still runs: {now:?} (owner was {owned_by})");
    // The new tenant's own state is mirrored under a claim of its own: it
    // survives its owner's loss.
    let o = index(&owner(&nodes[0], "reuse", Duration::from_secs(10)));
    publish_retained(&nodes[o], "reuse", "fresh", b"the new tenant's");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(nodes[o].metrics().contains("mqvisor_tenant_standby_mirrored{tenant=\"reuse\"} 1")
        && nodes[o].metric("mqvisor_tenant_standby_writes_total{tenant=\"reuse\"}") > 0)
    {
        assert!(Instant::now() < deadline, "the new tenant has no whole standby copy");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut nodes = nodes;
    nodes[o].child.kill().unwrap();
    let _ = nodes[o].child.wait();
    let survivor = (o + 1) % 3;
    let kept = retained(&nodes[survivor], "reuse", "fresh");
    assert_eq!(kept.as_deref(), Some(&b"the new tenant's"[..]), "the re-added tenant's state was lost");
}

#[test]
fn a_stopped_owner_daemon_cannot_keep_its_tenant_answering_past_its_lease() {
    let test = "a_stopped_owner_daemon_cannot_keep_its_tenant_answering_past_its_lease";
    let Some((_etcd, nodes)) = fleet(test) else { return };
    let (ok, _, err) = nodes[0].tenant(&["add", "umbrella"]);
    assert!(ok, "tenant add: {err}");
    let owned_by = index(&owner(&nodes[0], "umbrella", Duration::from_secs(10)));
    // Connected through its owner: the client's socket is the tenant
    // process's now, which a stopped daemon does not stop.
    let mut client = connect_until(nodes[owned_by].addr, "c", "umbrella:c", Duration::from_secs(15));
    client.write_all(&publish("t", b"0", 1, 1, false)).unwrap();
    assert_eq!(read_packet(&mut client).0, 0x40, "PUBACK before the pause");
    let pid = nodes[owned_by].pid("umbrella").expect("the owner runs umbrella");
    let daemon = nodes[owned_by].child.id();
    assert!(Command::new("kill").args(["-STOP", &daemon.to_string()]).status().unwrap().success());
    let stopped = Instant::now();
    // The client goes on publishing. The paused daemon renews nothing, so
    // its lease can expire 6 s (the TTL) after the pause at the earliest:
    // no acknowledgement may come after that, and the connection must end.
    client.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let (mut last_ack, mut ended, mut id) = (Duration::ZERO, None, 1u16);
    while ended.is_none() && stopped.elapsed() < Duration::from_secs(20) {
        id = id % 1000 + 1;
        if client.write_all(&publish("t", b"m", 1, id, false)).is_err() {
            ended = Some(stopped.elapsed());
            break;
        }
        match try_read_packet(&mut client) {
            Ok((0x40, _)) => last_ack = stopped.elapsed(),
            Ok(other) => panic!("unexpected packet {other:?}"),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => ended = Some(stopped.elapsed()),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let gone = loop {
        if !alive(pid) {
            break stopped.elapsed();
        }
        assert!(stopped.elapsed() < Duration::from_secs(20), "the tenant's process outlived its lease by 14 s");
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("{test}: last PUBACK {last_ack:?} after the pause, connection ended {ended:?}, process gone {gone:?}");
    let ended = ended.expect("the connection to the fenced tenant never ended");
    assert!(last_ack < Duration::from_secs(6), "acknowledged {last_ack:?} after the pause: past the lease");
    assert!(ended < Duration::from_secs(6), "served {ended:?} after the pause: past the lease");
    assert!(gone < Duration::from_secs(6), "the process ran {gone:?} after the pause: past the lease");
    // A survivor takes it over, and the resumed daemon, fenced, runs it no more.
    let survivor = (owned_by + 1) % 3;
    let mut back = connect_until(nodes[survivor].addr, "b", "umbrella:b", Duration::from_secs(20));
    back.write_all(&publish("t", b"y", 1, 1, false)).unwrap();
    assert_eq!(read_packet(&mut back).0, 0x40, "PUBACK through a survivor");
    assert!(Command::new("kill").args(["-CONT", &daemon.to_string()]).status().unwrap().success());
    std::thread::sleep(Duration::from_secs(3));
    let running = processes(&nodes, "umbrella");
    assert_eq!(running.len(), 1, "{running:?}");
    assert_ne!(index(&running[0].0), owned_by, "{running:?}");
    back.write_all(&publish("t", b"z", 1, 2, false)).unwrap();
    assert_eq!(read_packet(&mut back).0, 0x40, "PUBACK after the resumed daemon fenced");
}

#[test]
fn kill_9_of_the_owner_loses_nothing_acknowledged_its_standby_takes_over() {
    let test = "kill_9_of_the_owner_loses_nothing_acknowledged_its_standby_takes_over";
    let Some((_etcd, mut nodes)) = fleet_with(test, BIG_QUEUE) else { return };
    let (ok, _, err) = nodes[0].tenant(&["add", "hooli"]);
    assert!(ok, "tenant add: {err}");
    let owned_by = index(&owner(&nodes[0], "hooli", Duration::from_secs(10)));
    let survivor = (owned_by + 1) % 3;
    // A durable subscriber, gone for now: its session keeps its messages.
    let mut subscriber = connect_session_until(nodes[survivor].addr, "sub", "hooli:s", false, Duration::from_secs(15));
    subscriber.write_all(&subscribe("jobs/#", 2, 1)).unwrap();
    assert_eq!(read_packet(&mut subscriber).0, 0x90, "SUBACK");
    drop(subscriber);
    let standby = standby_of(&nodes, "hooli", Duration::from_secs(10));
    let mut publisher = connect_until(nodes[survivor].addr, "pub", "hooli:p", Duration::from_secs(15));
    publisher.write_all(&publish("jobs/latest", b"retained", 1, 1, true)).unwrap();
    assert_eq!(read_packet(&mut publisher).0, 0x40, "PUBACK of the retained message");
    const MESSAGES: u16 = 2000;
    const EXACTLY_ONCE: u16 = 200;
    publish_acknowledged(&mut publisher, 1..=MESSAGES);
    for id in 1..=EXACTLY_ONCE {
        publisher.write_all(&publish("jobs/q2", &id.to_be_bytes(), 2, id, false)).unwrap();
        assert_eq!(read_packet(&mut publisher).0, 0x50, "PUBREC");
        let [high, low] = id.to_be_bytes();
        publisher.write_all(&[0x62, 2, high, low]).unwrap();
        assert_eq!(read_packet(&mut publisher).0, 0x70, "PUBCOMP");
    }
    // kill -9 of the owner's daemon: its tenant's process dies with it.
    nodes[owned_by].child.kill().unwrap();
    let _ = nodes[owned_by].child.wait();
    let killed = Instant::now();
    let mut back = connect_session_until(nodes[survivor].addr, "sub", "hooli:s", false, Duration::from_secs(20));
    let moved = killed.elapsed();
    back.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (mut at_least_once, mut exactly_once) = (std::collections::BTreeSet::new(), Vec::new());
    let mut quiet = false;
    loop {
        if at_least_once.len() == usize::from(MESSAGES) && exactly_once.len() >= usize::from(EXACTLY_ONCE) && !quiet {
            // All there: a little longer, for any duplicate.
            back.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
            quiet = true;
        }
        let (kind, body) = match try_read_packet(&mut back) {
            Ok(packet) => packet,
            Err(_) if quiet => break,
            Err(e) => panic!(
                "{} of {MESSAGES} QoS 1 and {} of {EXACTLY_ONCE} QoS 2 delivered after the failover, then: {e}",
                at_least_once.len(),
                exactly_once.len()
            ),
        };
        if kind == 0x62 {
            back.write_all(&[0x70, 2, body[0], body[1]]).unwrap(); // PUBCOMP
            continue;
        }
        assert_eq!(kind & 0xf0, 0x30, "a PUBLISH");
        let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
        let topic = &body[2..2 + topic_len];
        let id = [body[2 + topic_len], body[3 + topic_len]];
        let payload = u16::from_be_bytes([body[4 + topic_len], body[5 + topic_len]]);
        match (kind >> 1) & 3 {
            2 => {
                back.write_all(&[0x50, 2, id[0], id[1]]).unwrap(); // PUBREC
                exactly_once.push(payload);
            }
            _ => {
                back.write_all(&[0x40, 2, id[0], id[1]]).unwrap();
                if topic == b"jobs/n" {
                    at_least_once.insert(payload);
                }
            }
        }
    }
    let mut reader = connect_until(nodes[survivor].addr, "reader", "hooli:r", Duration::from_secs(5));
    let latest = first_message(&mut reader, "jobs/latest");
    eprintln!(
        "{test}: served again {moved:?} after kill -9 of its owner; {} of {MESSAGES} QoS 1 and {} of {EXACTLY_ONCE} QoS 2 \
         delivered",
        at_least_once.len(),
        exactly_once.len()
    );
    assert_eq!(at_least_once, (1..=MESSAGES).collect(), "acknowledged QoS 1 messages lost");
    exactly_once.sort_unstable();
    assert_eq!(exactly_once, (1..=EXACTLY_ONCE).collect::<Vec<_>>(), "QoS 2 messages lost or delivered twice");
    assert_eq!(latest.as_deref(), Some(&b"retained"[..]), "the retained message was lost");
    assert!(nodes[standby].log_has("taken over from its standby copy"), "the standby did not take it over");
    let alive: Vec<Daemon> = nodes.drain(..).enumerate().filter(|(i, _)| *i != owned_by).map(|(_, n)| n).collect();
    let running = processes(&alive, "hooli");
    assert_eq!(running.len(), 1, "{running:?}");
}

/// The node whose log says it holds a whole copy of `tenant`, once one does.
fn standby_of(nodes: &[Daemon], tenant: &str, within: Duration) -> usize {
    let deadline = Instant::now() + within;
    let line = format!("standby copy whole tenant={tenant} ");
    loop {
        if let Some(i) = nodes.iter().position(|n| n.log_has(&line)) {
            return i;
        }
        assert!(Instant::now() < deadline, "no node became {tenant}'s standby within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_lost_standby_leaves_a_preferred_tenant_acknowledging_and_a_required_one_refusing() {
    let test = "a_lost_standby_leaves_a_preferred_tenant_acknowledging_and_a_required_one_refusing";
    for required in [false, true] {
        let Some((_etcd, mut nodes)) = fleet(&format!("{test}-{required}")) else { return };
        let settings = nodes[0].dir.join("tenant.toml");
        std::fs::write(&settings, if required { "standby = \"required\"\n" } else { "" }).unwrap();
        let (ok, _, err) = nodes[0].tenant(&["add", "vandelay", "--settings", settings.to_str().unwrap()]);
        assert!(ok, "tenant add: {err}");
        let o = index(&owner(&nodes[0], "vandelay", Duration::from_secs(10)));
        // Through its owner: the standby's loss cuts no relayed connection.
        let mut client = TcpStream::connect(nodes[o].addr).unwrap();
        client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        client.write_all(&connect_as(5, "c", true, Some("vandelay:c"), None)).unwrap();
        let (kind, body) = read_packet(&mut client);
        assert_eq!((kind, body[1]), (0x20, 0), "CONNACK");
        let s = standby_of(&nodes, "vandelay", Duration::from_secs(10));
        assert_ne!(s, o, "its own standby");
        client.write_all(&publish_v5("t", b"before", 1, 1, false)).unwrap();
        let (kind, body) = read_packet(&mut client);
        // 0x10, no matching subscribers, is a success.
        assert_eq!((kind, puback_code(&body) < 0x80), (0x40, true), "PUBACK with its standby: {body:?}");
        nodes[s].child.kill().unwrap();
        let _ = nodes[s].child.wait();
        let connect = |id: &str| {
            let mut client = TcpStream::connect(nodes[o].addr).unwrap();
            client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            client.write_all(&connect_as(5, id, true, Some("vandelay:c"), None)).unwrap();
            let (kind, body) = read_packet(&mut client);
            assert_eq!((kind, body[1]), (0x20, 0), "CONNACK");
            client
        };
        if required {
            // The write that found the standby gone failed: its publish is
            // never acknowledged (the connection ends as lost, and the
            // client sends it again); from then on durable publishes are
            // refused, as when the disk fails.
            client.write_all(&publish_v5("t", b"after", 1, 2, true)).unwrap();
            let answer = try_read_packet(&mut client);
            assert!(!matches!(answer, Ok((0x40, _))), "acknowledged without its required standby: {answer:?}");
            let mut again = connect("again");
            again.write_all(&publish_v5("t", b"after", 1, 3, true)).unwrap();
            let (kind, body) = read_packet(&mut again);
            eprintln!("{test}: required: the publish after the loss {answer:?}, the next one {kind:#x} {body:?}");
            assert_eq!((kind, puback_code(&body)), (0x40, 0x97), "PUBACK 0x97 (quota exceeded)");
        } else {
            let mut codes = Vec::new();
            for id in 2..=4 {
                client.write_all(&publish_v5("t", b"after", 1, id, true)).unwrap();
                let (kind, body) = read_packet(&mut client);
                assert_eq!(kind, 0x40, "PUBACK");
                codes.push(puback_code(&body));
            }
            eprintln!("{test}: preferred: PUBACK reasons after the standby's loss {codes:?}");
            assert!(codes.iter().all(|&code| code < 0x80), "acknowledged without a standby: {codes:?}");
        }
        // The tenant still serves: QoS 0 flows either way.
        let mut light = connect("light");
        light.write_all(&subscribe_v5_qos0("q")).unwrap();
        assert_eq!(read_packet(&mut light).0, 0x90, "SUBACK");
        light.write_all(&publish_v5("q", b"light", 0, 0, false)).unwrap();
        assert_eq!(read_packet(&mut light).0, 0x30, "the QoS 0 message back");
    }
}

/// A v5 SUBSCRIBE to `filter` at QoS 0, packet id 9, no properties.
fn subscribe_v5_qos0(filter: &str) -> Vec<u8> {
    let mut body = vec![0, 9, 0];
    body.extend_from_slice(&u16::try_from(filter.len()).unwrap().to_be_bytes());
    body.extend_from_slice(filter.as_bytes());
    body.push(0);
    let mut packet = vec![0x82, u8::try_from(body.len()).unwrap()];
    packet.extend_from_slice(&body);
    packet
}

/// Publishes QoS 1 messages `ids` (their id as payload) on `jobs/n`, each
/// acknowledged, in batches of 100.
fn publish_acknowledged(publisher: &mut TcpStream, ids: std::ops::RangeInclusive<u16>) {
    for batch in ids.collect::<Vec<_>>().chunks(100) {
        let mut packets = Vec::new();
        for &id in batch {
            packets.extend_from_slice(&publish("jobs/n", &id.to_be_bytes(), 1, id, false));
        }
        publisher.write_all(&packets).unwrap();
        for _ in batch {
            assert_eq!(read_packet(publisher).0, 0x40, "PUBACK");
        }
    }
}

/// The ids of the `count` messages on `jobs/n` a resumed session gets
/// (each acknowledged), or how many came before the stream ended.
fn delivered(session: &mut TcpStream, count: usize) -> Result<std::collections::BTreeSet<u16>, usize> {
    session.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < count {
        let Ok((kind, body)) = try_read_packet(session) else { return Err(seen.len()) };
        assert_eq!(kind & 0xf0, 0x30, "a PUBLISH");
        let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
        let id = [body[2 + topic_len], body[3 + topic_len]];
        session.write_all(&[0x40, 2, id[0], id[1]]).unwrap();
        let payload = &body[4 + topic_len..];
        seen.insert(u16::from_be_bytes([payload[0], payload[1]]));
    }
    Ok(seen)
}

#[test]
fn a_lost_standby_is_replaced_and_caught_up_then_the_owner_is_lost_and_nothing_is() {
    let test = "a_lost_standby_is_replaced_and_caught_up_then_the_owner_is_lost_and_nothing_is";
    let Some((_etcd, mut nodes)) = fleet_with(test, BIG_QUEUE) else { return };
    let (ok, _, err) = nodes[0].tenant(&["add", "pied"]);
    assert!(ok, "tenant add: {err}");
    let o = index(&owner(&nodes[0], "pied", Duration::from_secs(10)));
    let mut subscriber = connect_session_until(nodes[o].addr, "sub", "pied:s", false, Duration::from_secs(15));
    subscriber.write_all(&subscribe("jobs/#", 1, 1)).unwrap();
    assert_eq!(read_packet(&mut subscriber).0, 0x90, "SUBACK");
    drop(subscriber);
    let first = standby_of(&nodes, "pied", Duration::from_secs(10));
    let third = 3 - o - first;
    let mut publisher = connect_until(nodes[o].addr, "pub", "pied:p", Duration::from_secs(15));
    publish_acknowledged(&mut publisher, 1..=500);
    // The standby lost, while the owner goes on acknowledging (its copy
    // is stale from the first write on): the third node becomes the
    // standby and catches up.
    nodes[first].child.kill().unwrap();
    let _ = nodes[first].child.wait();
    let lost = Instant::now();
    publish_acknowledged(&mut publisher, 501..=1000);
    let again = standby_of(&nodes[third..=third], "pied", Duration::from_secs(20));
    eprintln!("{test}: a new standby's copy whole {:?} after the first standby's loss", lost.elapsed());
    assert_eq!(again, 0);
    assert!(nodes[o].log_has("its standby is lost"), "the owner did not retire the stale copy");
    publish_acknowledged(&mut publisher, 1001..=1500);
    drop(publisher);
    // The owner says so: mirrored, its writes reaching the standby.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let metrics = nodes[o].metrics();
        let mirrored = metrics.contains("mqvisor_tenant_standby_mirrored{tenant=\"pied\"} 1");
        if mirrored && nodes[o].metric("mqvisor_tenant_standby_writes_total{tenant=\"pied\"}") > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "no mirrored standby in the owner's metrics: {metrics}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let shown = nodes[o].show("pied");
    assert_eq!(shown["standby_mirrored"], 1, "{shown}");
    // Then the owner lost: the new standby takes over with everything.
    nodes[o].child.kill().unwrap();
    let _ = nodes[o].child.wait();
    let mut back = connect_session_until(nodes[third].addr, "sub", "pied:s", false, Duration::from_secs(20));
    match delivered(&mut back, 1500) {
        Ok(seen) => assert_eq!(seen, (1..=1500).collect(), "acknowledged messages lost"),
        Err(n) => panic!("{n} of 1500 acknowledged messages delivered after both losses"),
    }
    assert!(nodes[third].log_has("taken over from its standby copy"), "the new standby did not take it over");
}

#[test]
fn a_removed_tenants_standby_copy_is_deleted() {
    let test = "a_removed_tenants_standby_copy_is_deleted";
    let Some((_etcd, nodes)) = fleet(test) else { return };
    let (ok, _, err) = nodes[0].tenant(&["add", "hooli-xyz"]);
    assert!(ok, "{err}");
    let o = index(&owner(&nodes[0], "hooli-xyz", Duration::from_secs(10)));
    publish_retained(&nodes[o], "hooli-xyz", "secret", b"a customer's data");
    let s = standby_of(&nodes, "hooli-xyz", Duration::from_secs(10));
    let copy = nodes[s].dir.join("state/replicas/hooli-xyz.state");
    assert!(copy.exists(), "no copy at {}", copy.display());
    let (ok, _, err) = nodes[0].tenant(&["remove", "hooli-xyz"]);
    assert!(ok, "{err}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while copy.exists() {
        assert!(Instant::now() < deadline, "the standby still keeps a removed tenant's copy 10 s later");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_tenant_taken_over_reaches_its_next_standby_before_any_client_comes() {
    let test = "a_tenant_taken_over_reaches_its_next_standby_before_any_client_comes";
    let Some((_etcd, mut nodes)) = fleet(test) else { return };
    let (ok, _, err) = nodes[0].tenant(&["add", "dormant"]);
    assert!(ok, "{err}");
    let o = index(&owner(&nodes[0], "dormant", Duration::from_secs(10)));
    publish_retained(&nodes[o], "dormant", "kept", b"acknowledged once");
    let s = standby_of(&nodes, "dormant", Duration::from_secs(10));
    let t = 3 - o - s;
    nodes[o].child.kill().unwrap();
    let _ = nodes[o].child.wait();
    // No client comes: the standby takes it over and its state reaches the
    // third node all the same.
    let next = standby_of(&nodes[t..=t], "dormant", Duration::from_secs(30));
    assert_eq!(next, 0);
    nodes[s].child.kill().unwrap();
    let _ = nodes[s].child.wait();
    let kept = retained(&nodes[t], "dormant", "kept");
    assert_eq!(kept.as_deref(), Some(&b"acknowledged once"[..]), "lost with two owners in turn");
}
