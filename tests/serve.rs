//! End-to-end tests of `mqvisor serve`: tenants behind one port, each a VM
//! in its own process, and what must never cross between them. Real VMs,
//! real sockets, a real daemon.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::daemon::{Daemon, free_port};
use common::wire::{connect_as, publish, read_packet, subscribe, try_read_packet};
use common::{kvm_available, mqvisor};

/// Connects with `username` (and `password`) and returns the CONNACK's
/// session-present flag and return code, with the stream.
fn connect(daemon: &Daemon, client_id: &str, username: &str, password: Option<&[u8]>) -> (TcpStream, u8, u8) {
    let mut stream = TcpStream::connect(daemon.addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    stream.write_all(&connect_as(4, client_id, false, Some(username), password)).unwrap();
    let (kind, body) = read_packet(&mut stream);
    assert_eq!(kind, 0x20, "CONNACK");
    (stream, body[0], body[1])
}

fn connected(daemon: &Daemon, client_id: &str, username: &str) -> TcpStream {
    let (stream, _, code) = connect(daemon, client_id, username, None);
    assert_eq!(code, 0, "{username} was refused");
    stream
}

/// Subscribes and returns the first message's payload, if one comes within
/// `wait` (retained ones come at once).
fn first_message(stream: &mut TcpStream, filter: &str, wait: Duration) -> Option<Vec<u8>> {
    stream.write_all(&subscribe(filter, 0, 1)).unwrap();
    assert_eq!(read_packet(stream).0, 0x90, "SUBACK");
    stream.set_read_timeout(Some(wait)).unwrap();
    let got = try_read_packet(stream).ok().map(|(_, body)| {
        let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
        body[2 + topic_len..].to_vec()
    });
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    got
}

#[test]
fn tenants_share_a_port_and_nothing_else() {
    if !kvm_available("tenants_share_a_port_and_nothing_else") {
        return;
    }
    let daemon = Daemon::start("isolation", "[tenants.alpha]\n[tenants.beta]\n", &[]);
    // Retained messages stay in their tenant.
    let mut alice = connected(&daemon, "same-id", "alpha:alice");
    alice.write_all(&publish("news", b"alpha only", 1, 1, true)).unwrap();
    assert_eq!(read_packet(&mut alice).0, 0x40, "PUBACK");
    let mut bob = connected(&daemon, "bob", "beta:bob");
    assert_eq!(first_message(&mut bob, "news", Duration::from_millis(500)), None, "beta saw alpha's retained message");
    let mut anon = connected(&daemon, "anon", "alpha:");
    assert_eq!(first_message(&mut anon, "news", Duration::from_secs(5)).as_deref(), Some(&b"alpha only"[..]));
    // $SYS counts only a tenant's own clients.
    let mut sys = connected(&daemon, "sys", "beta:");
    let clients = first_message(&mut sys, "$SYS/broker/clients/connected", Duration::from_secs(15));
    let count: u32 = String::from_utf8(clients.expect("beta publishes $SYS")).unwrap().parse().unwrap();
    // Published when beta had one or two clients; alpha's two never count.
    assert!((1..=2).contains(&count), "beta's $SYS counts {count} clients");
    // The same client id in the other tenant takes nothing over.
    let (_twin, present, code) = connect(&daemon, "same-id", "beta:twin", None);
    assert_eq!((present, code), (0, 0), "a fresh session in beta");
    alice.write_all(&[0xc0, 0]).unwrap();
    assert_eq!(read_packet(&mut alice).0, 0xd0, "alpha's client kept its connection");
}

#[test]
fn unknown_tenants_and_missing_prefixes_are_refused_without_booting() {
    if !kvm_available("unknown_tenants_and_missing_prefixes_are_refused_without_booting") {
        return;
    }
    let daemon = Daemon::start("refusals", "[tenants.alpha]\n", &[]);
    for user in ["gamma:x", "alice", ":x"] {
        let (_, _, code) = connect(&daemon, "c", user, None);
        assert_eq!(code, 4, "{user:?} should get 'bad user name or password'");
    }
    // MQTT 5 gets its own reason code.
    let mut v5 = TcpStream::connect(daemon.addr).unwrap();
    v5.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    v5.write_all(&connect_as(5, "c5", true, Some("nobody:x"), None)).unwrap();
    let (kind, body) = read_packet(&mut v5);
    assert_eq!((kind, body[1]), (0x20, 0x86));
    // Garbage is dropped without a word.
    let mut garbage = TcpStream::connect(daemon.addr).unwrap();
    garbage.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert!(try_read_packet(&mut garbage).is_err(), "garbage got an answer");
    // A first packet that is no CONNECT, and one announced too large.
    for first in [&[0xc0, 0][..], &[0x10, 0x80, 0x80, 0x04]] {
        let mut client = TcpStream::connect(daemon.addr).unwrap();
        client.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        client.write_all(first).unwrap();
        assert!(try_read_packet(&mut client).is_err(), "{first:?} got an answer");
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(!daemon.log_has("process started"), "a VM was started for a refused client");
    // Each drop is counted under its reason (the garbage, a partial packet,
    // waited out its deadline).
    let dropped = |reason: &str| daemon.metric(&format!("mqvisor_front_clients_dropped_total{{reason=\"{reason}\"}}"));
    assert_eq!((dropped("timeout"), dropped("not_mqtt"), dropped("too_large")), (1, 1, 1));
}

#[test]
fn a_tenants_password_opens_only_that_tenant() {
    if !kvm_available("a_tenants_password_opens_only_that_tenant") {
        return;
    }
    // mosquitto_passwd -b: user alice, password "secret" (PBKDF2-SHA512).
    let alice = "alice:$7$101$I2p5Zn01wKWpDT/6$Xfrt09y66vDIbzjDKZm//zHX5CnCeyUL2m7oLqWo+O7daXQsRMOUzYbQgWIsXftfoU+v2Zqp6y9DOvqO80ferg==\n";
    let daemon = Daemon::start(
        "passwords",
        "[tenants.alpha]\npassword_file = \"alpha.passwd\"\n[tenants.beta]\npassword_file = \"beta.passwd\"\n",
        &[("alpha.passwd", alice), ("beta.passwd", "")],
    );
    let (_, _, code) = connect(&daemon, "a", "alpha:alice", Some(b"secret"));
    assert_eq!(code, 0, "alpha:alice with the right password was refused");
    let (_, _, code) = connect(&daemon, "b", "beta:alice", Some(b"secret"));
    assert_eq!(code, 4, "alpha's credentials opened beta");
    let (_, _, code) = connect(&daemon, "c", "alpha:alice", Some(b"wrong"));
    assert_eq!(code, 4);
}

#[test]
fn killing_one_tenant_leaves_the_others_serving_and_it_comes_back() {
    if !kvm_available("killing_one_tenant_leaves_the_others_serving_and_it_comes_back") {
        return;
    }
    let daemon = Daemon::start("crash", "[tenants.alpha]\n[tenants.beta]\n", &[]);
    let mut victim = connected(&daemon, "v", "alpha:");
    // A retained message, acknowledged (so on disk) before the kill.
    victim.write_all(&publish("kept", b"before the crash", 1, 1, true)).unwrap();
    assert_eq!(read_packet(&mut victim).0, 0x40, "PUBACK");
    let mut bystander = connected(&daemon, "b", "beta:");
    let pid = daemon.pid_of("alpha");
    // SAFETY: kill(2) with a pid the daemon reported for its own child.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    // The victim's clients see their connection end.
    assert!(try_read_packet(&mut victim).is_err(), "alpha's client outlived its VM");
    // Beta never noticed.
    bystander.write_all(&[0xc0, 0]).unwrap();
    assert_eq!(read_packet(&mut bystander).0, 0xd0);
    daemon.wait_for(&["crashed", "tenant=alpha"]);
    daemon.wait_for(&["restarted", "tenant=alpha"]);
    // Alpha serves again, with its state from its file in state_dir.
    let mut again = connected(&daemon, "v2", "alpha:");
    let kept = first_message(&mut again, "kept", Duration::from_secs(5));
    assert_eq!(kept.as_deref(), Some(&b"before the crash"[..]), "alpha's state survived kill -9");
}

#[test]
fn tenants_are_listed_added_removed_and_kept_across_restarts() {
    if !kvm_available("tenants_are_listed_added_removed_and_kept_across_restarts") {
        return;
    }
    let mut daemon = Daemon::start("control", "[tenants.alpha]\n[tenants.beta]\n", &[]);
    let list = daemon.list();
    assert_eq!(list.len(), 2);
    for t in &list {
        assert_eq!(t["state"], "stopped", "{t}");
        assert!(t["pid"].is_null() && t["connections"] == 0, "{t}");
    }
    // A client boots alpha; the list shows its process and connection.
    let mut alice = connected(&daemon, "a", "alpha:alice");
    let deadline = Instant::now() + Duration::from_secs(5);
    let alpha = loop {
        let alpha = daemon.list().into_iter().find(|t| t["name"] == "alpha").unwrap();
        if alpha["connections"] == 1 || Instant::now() > deadline {
            break alpha;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!((alpha["state"].as_str(), alpha["connections"].as_u64()), (Some("running"), Some(1)), "{alpha}");
    assert!(alpha["pid"].as_u64().is_some_and(|p| p > 0) && alpha["pss_bytes"].as_u64() > Some(0), "{alpha}");
    // Metrics name every tenant.
    let page = daemon.metrics();
    assert!(page.contains("mqvisor_tenant_up{tenant=\"alpha\"} 1"), "{page}");
    assert!(page.contains("mqvisor_tenant_up{tenant=\"beta\"} 0"), "{page}");
    // Alpha's state file is on disk (its superblock at least).
    let state_bytes = page
        .lines()
        .find_map(|l| l.strip_prefix("mqvisor_tenant_state_bytes{tenant=\"alpha\"} "))
        .and_then(|v| v.trim().parse::<u64>().ok());
    assert!(state_bytes.is_some_and(|b| b > 0), "{page}");
    // Added while serving: reachable at once.
    let (ok, _, err) = daemon.tenant(&["add", "gamma"]);
    assert!(ok, "{err}");
    let (ok, _, err) = daemon.tenant(&["add", "gamma"]);
    assert!(!ok && err.contains("exists"), "{err}");
    let (ok, _, err) = daemon.tenant(&["add", "Bad"]);
    assert!(!ok && err.contains("tenant name \"Bad\""), "{err}");
    let (ok, _, err) = daemon.tenant(&["remove", "nope"]);
    assert!(!ok && err.contains("no tenant \"nope\""), "{err}");
    let (ok, _, err) = daemon.tenant(&["restart", "nope"]);
    assert!(!ok && err.contains("no tenant \"nope\""), "{err}");
    drop(connected(&daemon, "g", "gamma:"));
    // Removed while serving: its clients are disconnected, new ones refused.
    let (ok, _, err) = daemon.tenant(&["remove", "alpha"]);
    assert!(ok, "{err}");
    assert!(try_read_packet(&mut alice).is_err(), "alpha's client outlived its removal");
    assert_eq!(connect(&daemon, "a2", "alpha:alice", None).2, 4);
    // A restarted daemon has the same tenants.
    daemon.stop();
    let names = |list: Vec<serde_json::Value>| {
        let mut names: Vec<String> = list.iter().map(|t| t["name"].as_str().unwrap().to_string()).collect();
        names.sort();
        names
    };
    let restarted = Daemon::spawn(daemon.dir.clone());
    assert_eq!(names(restarted.list()), ["beta", "gamma"]);
}

#[test]
fn an_idle_tenant_stops_when_asked_and_boots_again_on_its_next_client() {
    if !kvm_available("an_idle_tenant_stops_when_asked_and_boots_again_on_its_next_client") {
        return;
    }
    let config = "[tenants.sleepy]\nidle_stop_after = 1\n[tenants.awake]\n[tenants.forgetful]\nidle_stop_after = 1\npersistence = \"off\"\n";
    let daemon = Daemon::start("idle", config, &[]);
    for tenant in ["sleepy", "forgetful"] {
        let mut client = connected(&daemon, "a", &format!("{tenant}:"));
        client.write_all(&publish("kept", tenant.as_bytes(), 1, 1, true)).unwrap();
        assert_eq!(read_packet(&mut client).0, 0x40, "PUBACK");
    }
    drop(connected(&daemon, "b", "awake:"));
    daemon.wait_for(&["idle: stopping", "tenant=sleepy"]);
    let list = daemon.list();
    let state = |name: &str| list.iter().find(|t| t["name"] == name).unwrap()["state"].clone();
    assert_eq!(state("sleepy"), "stopped");
    assert_eq!(state("awake"), "running", "a tenant without idle_stop_after keeps running");
    daemon.wait_for(&["idle: stopping", "tenant=forgetful"]);
    // Its state is kept across the stop, unless persistence is off.
    let mut again = connected(&daemon, "c", "sleepy:");
    assert_eq!(first_message(&mut again, "kept", Duration::from_secs(5)).as_deref(), Some(&b"sleepy"[..]));
    let mut again = connected(&daemon, "c", "forgetful:");
    assert_eq!(first_message(&mut again, "kept", Duration::from_millis(500)), None);
}

#[test]
fn wills_stay_in_their_tenant_and_a_flood_of_one_tenant_spares_the_other() {
    if !kvm_available("wills_stay_in_their_tenant_and_a_flood_of_one_tenant_spares_the_other") {
        return;
    }
    let daemon = Daemon::start("wills", "[tenants.alpha]\n[tenants.beta]\n", &[]);
    // Both tenants watch the same topic name.
    let mut alpha_watch = connected(&daemon, "aw", "alpha:");
    alpha_watch.write_all(&subscribe("status/#", 0, 1)).unwrap();
    assert_eq!(read_packet(&mut alpha_watch).0, 0x90);
    let mut beta_watch = connected(&daemon, "bw", "beta:");
    beta_watch.write_all(&subscribe("status/#", 0, 1)).unwrap();
    assert_eq!(read_packet(&mut beta_watch).0, 0x90);
    // An alpha client with a will vanishes without DISCONNECT.
    {
        let mut dying = TcpStream::connect(daemon.addr).unwrap();
        let mut connect = connect_as(4, "dying", true, Some("alpha:"), None);
        // Add a will: flag 0x04, topic status/dying, message "gone".
        connect[9] |= 0x04;
        let will = [&[0, 12][..], b"status/dying", &[0, 4], b"gone"].concat();
        let user_at = connect.len() - 2 - "alpha:".len();
        connect.splice(user_at..user_at, will);
        connect[1] = u8::try_from(connect.len() - 2).unwrap();
        dying.write_all(&connect).unwrap();
        dying.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        assert_eq!(read_packet(&mut dying), (0x20, vec![0, 0]));
        // SO_LINGER 0: a reset, not a clean close.
        let linger = libc::linger { l_onoff: 1, l_linger: 0 };
        // SAFETY: setsockopt on our own socket with a live linger struct.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&dying),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&raw const linger).cast(),
                libc::socklen_t::try_from(std::mem::size_of::<libc::linger>()).unwrap(),
            );
        }
    }
    let (_, will) = read_packet(&mut alpha_watch);
    assert!(will.ends_with(b"gone"), "alpha's watcher got the will");
    beta_watch.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    assert!(try_read_packet(&mut beta_watch).is_err(), "alpha's will reached beta");
    beta_watch.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // Alpha is flooded; beta keeps its round trips.
    let addr = daemon.addr;
    let flood = std::thread::spawn(move || {
        let mut flooder = TcpStream::connect(addr).unwrap();
        flooder.write_all(&connect_as(4, "flood", true, Some("alpha:"), None)).unwrap();
        let payload = vec![b'f'; 8_000];
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(3) {
            if flooder.write_all(&publish("status/flood", &payload, 0, 0, false)).is_err() {
                break;
            }
        }
    });
    let mut beta = connected(&daemon, "bp", "beta:");
    for i in 0..100u16 {
        beta.write_all(&publish("status/ok", b"fine", 1, i + 1, false)).unwrap();
        assert_eq!(read_packet(&mut beta).0, 0x40, "beta's PUBACK {i} during alpha's flood");
    }
    flood.join().unwrap();
}

#[test]
fn a_tenant_process_runs_as_its_user() {
    if !kvm_available("a_tenant_process_runs_as_its_user") {
        return;
    }
    let daemon = Daemon::start("user", "[tenants.alpha]\nuser = \"nobody\"\n", &[]);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        // Not root: the tenant fails at start, saying why.
        let alpha = daemon.show("alpha");
        assert_eq!(alpha["state"], "failed", "{alpha}");
        let error = alpha["error"].as_str().unwrap_or_default();
        assert!(error.contains("settings: --user needs the VMM to start as root"), "{alpha}");
        return;
    }
    let mut client = connected(&daemon, "c", "alpha:");
    client.write_all(&[0xc0, 0]).unwrap();
    assert_eq!(read_packet(&mut client).0, 0xd0);
    let pid = daemon.pid_of("alpha");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status.lines().find_map(|l| l.strip_prefix("Uid:")).unwrap();
    assert!(uid.split_whitespace().all(|u| u == "65534"), "tenant runs as {uid}");
    // It still ends with its daemon, though becoming another user clears
    // the parent-death signal.
    let mut daemon = daemon;
    daemon.child.kill().unwrap();
    daemon.child.wait().unwrap();
    assert!(ends_within(pid, Duration::from_secs(5)), "the tenant {pid} outlived its daemon's kill -9");
}

/// True once process `pid` has ended (gone, or a zombie) within `within`.
fn ends_within(pid: i32, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.is_empty() || stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_tenant_is_held_to_its_limits_and_a_kill_at_its_memory_limit_is_named() {
    let test = "a_tenant_is_held_to_its_limits_and_a_kill_at_its_memory_limit_is_named";
    if !kvm_available(test) || !common::limits_available(test) {
        return;
    }
    let daemon = Daemon::start(
        "limits",
        "[tenants.alpha]\nmemory = 128\nmemory_limit = 32\ncpus = 0.5\npids_limit = 16\npersistence = \"off\"\n\
         [tenants.beta]\n",
        &[],
    );
    let mut flooder = connected(&daemon, "f", "alpha:");
    let mut bystander = connected(&daemon, "b", "beta:");
    let alpha = format!("serve-{}-alpha", daemon.child.id());
    let read = |controller: &str, file: &str| {
        std::fs::read_to_string(common::group_dir(&alpha, controller).join(file)).map(|t| t.trim().to_string())
    };
    let quota = read("cpu", "cpu.max").or_else(|_| read("cpu", "cpu.cfs_quota_us")).unwrap();
    assert_eq!(quota.split_whitespace().next(), Some("50000"));
    assert_eq!(read("pids", "pids.max").unwrap(), "16");
    let memory = read("memory", "memory.max").or_else(|_| read("memory", "memory.limit_in_bytes")).unwrap();
    assert_eq!(memory, (32u64 << 20).to_string());
    let tasks = read("pids", "cgroup.procs").unwrap();
    assert_eq!(tasks, daemon.pid_of("alpha").to_string(), "alpha's VMM, alone, is in its group");
    let beta = common::group_dir(&format!("serve-{}-beta", daemon.child.id()), "pids");
    assert!(!beta.exists(), "a tenant without limits has no group");
    // Retained messages fill alpha's guest RAM (128 MiB) past its limit of 32.
    let payload = vec![0x5a; 60_000];
    for i in 0..2_000 {
        if flooder.write_all(&publish(&format!("fill/{i}"), &payload, 0, 0, true)).is_err() {
            break;
        }
    }
    daemon.wait_for(&["crashed", "tenant=alpha", "killed by the kernel at its memory limit (32 MiB)"]);
    let listed = daemon.list();
    let view = listed.iter().find(|t| t["name"] == "alpha").unwrap();
    assert_eq!(view["memory_limit_kills"], 1, "{view}");
    // Beta never noticed.
    bystander.write_all(&[0xc0, 0]).unwrap();
    assert_eq!(read_packet(&mut bystander).0, 0xd0);
    // Alpha comes back, and removing it removes its group.
    daemon.wait_for(&["restarted", "tenant=alpha"]);
    let (ok, _, err) = daemon.tenant(&["remove", "alpha"]);
    assert!(ok, "{err}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while common::group_dir(&alpha, "pids").exists() {
        assert!(Instant::now() < deadline, "alpha's group outlived the tenant");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_tenant_whose_limits_serve_cannot_apply_fails_saying_why_and_the_others_are_kept() {
    let dir = Daemon::configure("nolimits", "[tenants.alpha]\ncpus = 0.5\n[tenants.beta]\n", &[]);
    // Its state directory must be writable by the user it runs as.
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let (command, exe) = common::mqvisor_unprivileged_command();
    let daemon = Daemon::spawn_command(dir, command);
    let alpha = daemon.show("alpha");
    assert_eq!(alpha["state"], "failed", "{alpha}");
    assert!(alpha["error"].as_str().is_some_and(|e| e.contains("tenant alpha: resource limits: ")), "{alpha}");
    daemon.wait_for(&["failed", "tenant=alpha ", "resource limits"]);
    assert_eq!(daemon.show("beta")["state"], "stopped");
    if let Some(exe) = exe {
        let _ = std::fs::remove_file(exe);
    }
}

#[test]
fn the_control_socket_and_the_tenants_files_are_the_daemons_users_alone() {
    use std::os::unix::fs::PermissionsExt;
    let daemon = Daemon::start("control-owner", "[tenants.alpha]\n", &[]);
    let socket = daemon.dir.join("state/control.sock");
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "whoever can add a tenant chooses its files and its user");
    let tenants = std::fs::metadata(daemon.dir.join("state/tenants")).unwrap().permissions().mode() & 0o777;
    assert_eq!(tenants, 0o700, "tenants' settings and state files are the daemon's alone");
    let (ok, _, err) = daemon.tenant(&["list"]);
    assert!(ok, "{err}");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let args = ["tenant".as_ref(), "list".as_ref(), "--socket".as_ref(), socket.as_os_str()];
        let out = common::mqvisor_unprivileged(&args);
        common::assert_fails_with(&out, 1, "Permission denied");
    }
}

/// mosquitto_passwd -b: user alice, password "secret" (PBKDF2-SHA512).
const ALICE_SECRET: &str = "alice:$7$101$I2p5Zn01wKWpDT/6$Xfrt09y66vDIbzjDKZm//zHX5CnCeyUL2m7oLqWo+O7daXQsRMOUzYbQgWIsXftfoU+v2Zqp6y9DOvqO80ferg==\n";

/// A v3.1.1 CONNECT to `addr`, retried while the port is not bound yet:
/// the CONNACK's return code.
fn connect_code(addr: SocketAddr, username: &str, password: Option<&[u8]>) -> u8 {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stream = loop {
        match TcpStream::connect(addr) {
            Ok(stream) => break stream,
            Err(e) => assert!(Instant::now() < deadline, "{addr}: {e}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    stream.write_all(&connect_as(4, "c", true, Some(username), password)).unwrap();
    let (kind, body) = read_packet(&mut stream);
    assert_eq!(kind, 0x20, "CONNACK");
    body[1]
}

#[test]
fn a_tenant_whose_settings_fail_at_start_is_marked_failed_and_the_others_are_served() {
    if !kvm_available("a_tenant_whose_settings_fail_at_start_is_marked_failed_and_the_others_are_served") {
        return;
    }
    let mut first = Daemon::start(
        "failed",
        "[tenants.alpha]\n[tenants.beta]\npassword_file = \"beta.passwd\"\n",
        &[("beta.passwd", ALICE_SECRET), ("gamma.passwd", ALICE_SECRET)],
    );
    // gamma is added while serving, its password file named by full path.
    let gamma_passwd = first.dir.join("gamma.passwd");
    let settings = first.dir.join("gamma.toml");
    std::fs::write(&settings, format!("password_file = {:?}\n", gamma_passwd.to_str().unwrap())).unwrap();
    let (ok, _, err) = first.tenant(&["add", "gamma", "--settings", settings.to_str().unwrap()]);
    assert!(ok, "{err}");
    for tenant in ["beta", "gamma"] {
        let (mut client, _, code) = connect(&first, "c", &format!("{tenant}:alice"), Some(b"secret"));
        assert_eq!(code, 0, "{tenant}");
        client.write_all(&publish("kept", tenant.as_bytes(), 1, 1, true)).unwrap();
        assert_eq!(read_packet(&mut client).0, 0x40, "PUBACK");
    }
    first.stop();
    // Both password files go, and delta's port is taken; the daemon is
    // started again (as systemd would).
    std::fs::remove_file(first.dir.join("beta.passwd")).unwrap();
    std::fs::remove_file(&gamma_passwd).unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let delta_port = taken.local_addr().unwrap();
    let config = first.dir.join("serve.toml");
    let text = std::fs::read_to_string(&config).unwrap() + &format!("[tenants.delta]\nlisten = \"{delta_port}\"\n");
    std::fs::write(&config, text).unwrap();
    let mut second = Daemon::spawn(first.dir.clone());
    second.wait_for(&["failed", "tenant=delta ", "cannot listen on"]);
    assert_eq!(second.show("delta")["state"], "failed");
    for tenant in ["beta", "gamma"] {
        let view = second.show(tenant);
        assert_eq!(view["state"], "failed", "{view}");
        let error = view["error"].as_str().unwrap_or_default();
        assert!(error.contains(&format!("{tenant}.passwd")), "{view}");
        let line = second.wait_for(&["failed", &format!("tenant={tenant} ")]);
        assert!(line.contains(&format!("{tenant}.passwd")), "{line}");
        let (_, _, code) = connect(&second, "c", &format!("{tenant}:alice"), Some(b"secret"));
        assert_eq!(code, 3, "a failed tenant's client gets 'server unavailable'");
        assert_eq!(second.metric(&format!("mqvisor_tenant_failed{{tenant=\"{tenant}\"}}")), 1);
    }
    assert_eq!(second.metric("mqvisor_tenant_failed{tenant=\"alpha\"}"), 0);
    let (ok, table, err) = second.tenant(&["list"]);
    assert!(ok && table.lines().any(|l| l.starts_with("gamma") && l.contains("failed")), "{table}{err}");
    assert!(table.contains("gamma.passwd"), "the table says why: {table}");
    // The others are served.
    let mut alpha = connected(&second, "a", "alpha:");
    alpha.write_all(&[0xc0, 0]).unwrap();
    assert_eq!(read_packet(&mut alpha).0, 0xd0);
    assert!(!second.log_has("tenant=beta pid") && !second.log_has("tenant=gamma pid"), "a failed tenant booted");
    // Its port free again, a restart serves it there.
    drop(taken);
    let (ok, _, err) = second.tenant(&["restart", "delta"]);
    assert!(ok, "{err}");
    assert_eq!(connect_code(delta_port, "delta:", None), 0);
    // Its file put back, a restart serves it again, with its state.
    std::fs::write(&gamma_passwd, ALICE_SECRET).unwrap();
    let (ok, _, err) = second.tenant(&["restart", "gamma"]);
    assert!(ok, "{err}");
    let (mut client, _, code) = connect(&second, "c2", "gamma:alice", Some(b"secret"));
    assert_eq!(code, 0, "gamma serves again");
    assert_eq!(first_message(&mut client, "kept", Duration::from_secs(5)).as_deref(), Some(&b"gamma"[..]));
    // A failed tenant can be removed, with its files.
    let (ok, _, err) = second.tenant(&["remove", "beta"]);
    assert!(ok, "{err}");
    for file in ["beta.toml", "beta.state"] {
        assert!(!second.dir.join("state/tenants").join(file).exists(), "{file} outlived beta");
    }
    assert_eq!(second.names(), ["alpha", "delta", "gamma"]);
    second.stop();
    let third = Daemon::spawn(first.dir.clone());
    assert_eq!(third.names(), ["alpha", "delta", "gamma"]);
    assert!(third.list().iter().all(|t| t["state"] == "stopped"), "{:?}", third.list());
}

#[test]
fn settings_that_can_never_boot_are_refused_when_added_and_failed_when_loaded() {
    if !kvm_available("settings_that_can_never_boot_are_refused_when_added_and_failed_when_loaded") {
        return;
    }
    let mut daemon = Daemon::start("never-boot", "[tenants.alpha]\n", &[]);
    for (settings, reason) in [
        ("memory = 1\n", "--memory 1 MiB is too small"),
        ("memory = 8\n", "--max-packet-size 1048576 does not fit in --memory 8 MiB"),
        ("memory = 16\nmax_connections = 100000\n", "--max-connections 100000 does not fit in --memory 16 MiB"),
        ("memory = 100000\n", "--memory 100000 MiB is out of range"),
    ] {
        let (status, body) = daemon.http("PUT", "/tenants/tiny", settings);
        assert_eq!(status, 400, "{settings}: {body}");
        assert!(body.contains(reason), "{settings}: {body}");
    }
    // Through the command, likewise.
    std::fs::write(daemon.dir.join("tiny.toml"), "memory = 8\n").unwrap();
    let settings = daemon.dir.join("tiny.toml");
    let (ok, _, err) = daemon.tenant(&["add", "tiny", "--settings", settings.to_str().unwrap()]);
    assert!(!ok && err.contains("does not fit in --memory 8 MiB"), "{err}");
    assert_eq!(daemon.names(), ["alpha"]);
    // What fits is accepted, and boots.
    let (status, body) = daemon.http("PUT", "/tenants/tiny", "memory = 16\nmax_packet_size = 65536\n");
    assert_eq!(status, 201, "{body}");
    drop(connected(&daemon, "t", "tiny:"));
    // In the configuration file it fails at load; the rest is served.
    daemon.stop();
    let config = daemon.dir.join("serve.toml");
    let text = std::fs::read_to_string(&config).unwrap() + "[tenants.small]\nmemory = 8\n";
    std::fs::write(&config, text).unwrap();
    let restarted = Daemon::spawn(daemon.dir.clone());
    let small = restarted.show("small");
    assert_eq!(small["state"], "failed", "{small}");
    assert!(small["error"].as_str().is_some_and(|e| e.contains("--memory 8 MiB")), "{small}");
    drop(connected(&restarted, "a", "alpha:"));
    drop(connected(&restarted, "t", "tiny:"));
}

#[test]
fn metrics_say_their_format_and_a_prometheus_parser_reads_them() {
    let test = "metrics_say_their_format_and_a_prometheus_parser_reads_them";
    let parser = "python3 -c 'import prometheus_client.openmetrics.parser'";
    if !kvm_available(test)
        || !common::tool_available(test, "prometheus_client (pip install prometheus_client)", parser)
    {
        return;
    }
    let daemon = Daemon::start("openmetrics", "[tenants.alpha]\n[tenants.beta]\n", &[]);
    drop(connected(&daemon, "a", "alpha:"));
    let (head, body) = daemon.metrics_response();
    let content_type = head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("content-type").then(|| value.trim().to_string())
    });
    assert_eq!(
        content_type.as_deref(),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        "Prometheus 3 refuses a scrape without a Content-Type: {head}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");
    // The OpenMetrics parser of the Prometheus Python client reads it all.
    let script = "import sys\n\
        from prometheus_client.openmetrics.parser import text_string_to_metric_families\n\
        for f in text_string_to_metric_families(sys.stdin.read()):\n\
        \x20   for s in f.samples:\n\
        \x20       labels = ','.join(k + '=' + v for k, v in sorted(s.labels.items()))\n\
        \x20       print(f.type, s.name, labels, '%g' % s.value)\n";
    let mut python = std::process::Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    python.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = python.wait_with_output().unwrap();
    let samples = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "the parser refused the page: {}\n{body}", String::from_utf8_lossy(&out.stderr));
    for sample in [
        "gauge mqvisor_tenant_up tenant=alpha 1",
        "gauge mqvisor_tenant_up tenant=beta 0",
        "counter mqvisor_tenant_boots_total tenant=alpha 1",
        "histogram mqvisor_tenant_boot_seconds_count tenant=alpha 1",
        "counter mqvisor_front_clients_dropped_total reason=byte_budget 0",
        "counter mqvisor_tenant_usage_messages_in_total tenant=beta 0",
        "counter mqvisor_tenant_usage_connection_seconds_total tenant=beta 0",
        "gauge mqvisor_tenant_usage_peak_connections tenant=beta 0",
    ] {
        assert!(samples.lines().any(|l| l == sample), "no {sample:?} in:\n{samples}");
    }
}

#[test]
fn a_tenant_name_is_never_read_as_another_tenants() {
    if !kvm_available("a_tenant_name_is_never_read_as_another_tenants") {
        return;
    }
    let daemon = Daemon::start("names", "[tenants.victim]\n[tenants.anon]\n", &[]);
    let mut victim = connected(&daemon, "v", "victim:");
    victim.write_all(&publish("kept", b"mine", 1, 1, true)).unwrap();
    assert_eq!(read_packet(&mut victim).0, 0x40, "PUBACK");
    for args in [
        ["remove", "victim?keep"],
        ["remove", "victim/"],
        ["show", "anon#x"],
        ["show", "anon/"],
        ["restart", "victim/.."],
        ["add", "new?x"],
    ] {
        let (ok, out, err) = daemon.tenant(&args);
        assert!(!ok && err.contains("tenant name"), "{args:?}: {out}{err}");
    }
    // Whatever sends the request, the server takes no path it would
    // otherwise have read as another one.
    for (method, path) in [
        ("DELETE", "/tenants/victim?keep"),
        ("DELETE", "/tenants/victim/"),
        ("DELETE", "/tenants//victim"),
        ("DELETE", "/tenants/vic%74im"),
        ("GET", "/tenants/anon/"),
        ("GET", "/tenants?x"),
        ("POST", "/tenants/victim/restart/"),
        ("POST", "/tenants/victim/restart?now"),
        ("PUT", "/tenants/victim2/"),
    ] {
        let (status, body) = daemon.http(method, path, "");
        assert!(status == 400 || status == 404, "{method} {path}: {status} {body}");
    }
    // Nothing happened to victim: its client, its state, its VM.
    victim.write_all(&[0xc0, 0]).unwrap();
    assert_eq!(read_packet(&mut victim).0, 0xd0, "victim's client lost its connection");
    assert_eq!(daemon.names(), ["anon", "victim"]);
    assert!(daemon.dir.join("state/tenants/victim.state").exists());
    assert_eq!(daemon.show("victim")["restarts"], 0);
    let mut again = connected(&daemon, "v2", "victim:");
    assert_eq!(first_message(&mut again, "kept", Duration::from_secs(5)).as_deref(), Some(&b"mine"[..]));
}

#[test]
fn a_dedicated_port_takes_its_own_tenants_prefix_too() {
    if !kvm_available("a_dedicated_port_takes_its_own_tenants_prefix_too") {
        return;
    }
    let port = free_port();
    let daemon = Daemon::start(
        "own-port",
        &format!(
            "[tenants.globex]\nlisten = \"127.0.0.1:{port}\"\npassword_file = \"globex.passwd\"\n[tenants.acme]\n"
        ),
        &[("globex.passwd", ALICE_SECRET)],
    );
    let own = SocketAddr::from(([127, 0, 0, 1], port));
    assert_eq!(connect_code(own, "alice", Some(b"secret")), 0);
    assert_eq!(connect_code(own, "globex:alice", Some(b"secret")), 0, "its own prefix is refused");
    assert_eq!(connect_code(daemon.addr, "globex:alice", Some(b"secret")), 0);
    // Another tenant's prefix leads nowhere else: globex's broker knows no such user.
    assert_eq!(connect_code(own, "acme:alice", Some(b"secret")), 4);
    assert!(!daemon.log_has("tenant=acme pid"), "acme was booted from globex's port");
}

#[test]
fn tenant_add_reads_relative_paths_from_the_settings_files_folder() {
    if !kvm_available("tenant_add_reads_relative_paths_from_the_settings_files_folder") {
        return;
    }
    let mut daemon = Daemon::start("relative", "", &[]);
    let conf = daemon.dir.join("conf");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(conf.join("gamma.passwd"), ALICE_SECRET).unwrap();
    std::fs::write(conf.join("gamma.toml"), "password_file = \"gamma.passwd\"\n").unwrap();
    let (ok, _, err) = daemon.tenant(&["add", "gamma", "--settings", conf.join("gamma.toml").to_str().unwrap()]);
    assert!(ok, "{err}");
    // A relative FILE too, from another working directory.
    let out = mqvisor()
        .current_dir(&daemon.dir)
        .args(["tenant", "add", "delta", "--settings", "conf/gamma.toml", "--socket"])
        .arg(daemon.dir.join("state/control.sock"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for tenant in ["gamma", "delta"] {
        let (_, _, code) = connect(&daemon, "c", &format!("{tenant}:alice"), Some(b"secret"));
        assert_eq!(code, 0, "{tenant}");
    }
    // The daemon cannot know what a relative path in a bare request is relative to.
    let (status, body) = daemon.http("PUT", "/tenants/omega", "password_file = \"gamma.passwd\"\n");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("absolute"), "{body}");
    // A restarted daemon reads the same files.
    daemon.stop();
    let restarted = Daemon::spawn(daemon.dir.clone());
    let (_, _, code) = connect(&restarted, "c", "gamma:alice", Some(b"secret"));
    assert_eq!(code, 0);
}

#[test]
fn a_removed_tenant_leaves_no_file_behind() {
    let daemon = Daemon::start("remove-files", "[tenants.alpha]\n", &[]);
    let (ok, _, err) = daemon.tenant(&["add", "beta"]);
    assert!(ok, "{err}");
    let tenants = daemon.dir.join("state/tenants");
    assert!(tenants.join("alpha.toml").exists() && tenants.join("beta.toml").exists());
    for tenant in ["alpha", "beta"] {
        let (ok, _, err) = daemon.tenant(&["remove", tenant]);
        assert!(ok, "{err}");
        for file in ["toml", "state"] {
            let path = tenants.join(format!("{tenant}.{file}"));
            assert!(!path.exists(), "{} outlived its tenant", path.display());
        }
    }
}

#[test]
fn half_sent_connects_on_the_shared_port_cost_the_daemon_a_bounded_amount() {
    if !kvm_available("half_sent_connects_on_the_shared_port_cost_the_daemon_a_bounded_amount") {
        return;
    }
    let daemon = Daemon::start("half-sent", "[tenants.alpha]\n", &[]);
    let hwm_kib = || {
        let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap().to_string();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap()
    };
    let before = hwm_kib();
    // 1,200 clients each announce a 65,000-byte CONNECT and send 60,000
    // bytes of it: 72 MB, twice the daemon's budget for first packets.
    let mut half_sent = Vec::new();
    let body = vec![0x5a; 60_000];
    let mut refused = 0;
    for _ in 0..1_200 {
        let mut s = TcpStream::connect(daemon.addr).unwrap();
        // CONNECT, remaining length 65,000 (a varint: 0xe8 0xfb 0x03).
        let sent = s.write_all(&[0x10, 0xe8, 0xfb, 0x03]).and_then(|()| s.write_all(&body));
        refused += usize::from(sent.is_err());
        half_sent.push(s);
    }
    std::thread::sleep(Duration::from_secs(1));
    // The daemon dropped the clients past its budget.
    for s in &mut half_sent {
        s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
        let mut byte = [0u8; 1];
        if matches!(std::io::Read::read(s, &mut byte), Ok(0) | Err(_)) && s.write_all(&[0]).is_err() {
            refused += 1;
        }
    }
    let grown_mib = hwm_kib().saturating_sub(before) / 1024;
    eprintln!("1,200 half-sent 60 KB CONNECTs: the daemon grew {grown_mib} MiB, {refused} clients were dropped");
    assert!(grown_mib < 48, "the daemon grew {grown_mib} MiB for half-sent CONNECTs (budget 32 MiB)");
    assert!(refused > 0, "no client was dropped past the budget");
    let counted = daemon.metric("mqvisor_front_clients_dropped_total{reason=\"byte_budget\"}");
    assert!(counted > 0, "/metrics counts the clients dropped past the budget");
    // A polite client still gets its tenant.
    let mut client = connected(&daemon, "polite", "alpha:");
    client.write_all(&[0xc0, 0]).unwrap();
    assert_eq!(read_packet(&mut client).0, 0xd0);
}

#[test]
fn sockets_that_never_speak_cannot_lock_the_shared_port() {
    if !kvm_available("sockets_that_never_speak_cannot_lock_the_shared_port") {
        return;
    }
    // 1,024 descriptors: the daemon holds at most 512 silent clients.
    let dir = Daemon::configure("silent", "[tenants.alpha]\n", &[]);
    let daemon = Daemon::spawn_with_descriptors(dir, Some(1024));
    // 1,500 connections that never send a byte: more than the daemon has
    // descriptors for (the rest wait in the kernel's accept queue), made
    // well within its 10 s wait for a CONNECT.
    let started = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..15 {
        silent.extend((0..100).map(|_| TcpStream::connect(daemon.addr).unwrap()));
        // In batches, so the kernel's accept queue never overflows (a dropped
        // SYN costs a second or more) while the daemon keeps up.
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut client = connected(&daemon, "polite", "alpha:");
    client.write_all(&[0xc0, 0]).unwrap();
    assert_eq!(read_packet(&mut client).0, 0xd0);
    let waited = started.elapsed();
    eprintln!("1,500 silent sockets opened and a polite client served in {waited:?}");
    // Locked out, the silent sockets would have waited in the kernel's queue
    // (and the polite one behind them) until the front's 10 s deadline
    // closed the first ones.
    assert!(waited < Duration::from_secs(8), "the port was locked until the front's deadline ({waited:?})");
    let counted = daemon.metric("mqvisor_front_clients_dropped_total{reason=\"oldest_silent\"}");
    assert!(counted >= 1_500 - 1_024 / 2, "/metrics counts the silent clients dropped: {counted}");
    drop(silent);
}

/// Sends `packets` to `addr` and shuts the write side down (FIN), then
/// reads to the end: what came back before the close.
fn send_then_half_close(addr: SocketAddr, packets: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    stream.write_all(packets).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = Vec::new();
    let _ = std::io::Read::read_to_end(&mut stream, &mut got);
    got
}

#[test]
fn a_half_closed_client_gets_its_connack_and_puback_through_serve() {
    if !kvm_available("a_half_closed_client_gets_its_connack_and_puback_through_serve") {
        return;
    }
    let port = free_port();
    let daemon =
        Daemon::start("half-close", &format!("[tenants.alpha]\n[tenants.beta]\nlisten = \"127.0.0.1:{port}\"\n"), &[]);
    let own = SocketAddr::from(([127, 0, 0, 1], port));
    for (addr, user) in [(daemon.addr, Some("alpha:")), (own, None)] {
        for i in 0..20 {
            let connect = connect_as(4, &format!("half-{i}"), true, user, None);
            assert_eq!(send_then_half_close(addr, &connect), [0x20, 2, 0, 0], "{addr} try {i}: CONNECT then FIN");
            // A durable session and a retained QoS 1 message: both answers
            // wait for the tenant's state file.
            let mut packets = connect_as(4, &format!("half-durable-{i}"), false, user, None);
            packets.extend_from_slice(&publish(&format!("half/{i}"), b"kept", 1, 7, true));
            let got = send_then_half_close(addr, &packets);
            assert_eq!(got, [0x20, 2, 0, 0, 0x40, 2, 0, 7], "{addr} try {i}: CONNECT, PUBLISH (QoS 1) then FIN");
        }
    }
}

#[test]
fn unsupported_protocol_levels_get_return_code_1_through_serve() {
    if !kvm_available("unsupported_protocol_levels_get_return_code_1_through_serve") {
        return;
    }
    let port = free_port();
    let daemon =
        Daemon::start("levels", &format!("[tenants.alpha]\n[tenants.beta]\nlisten = \"127.0.0.1:{port}\"\n"), &[]);
    let own = SocketAddr::from(([127, 0, 0, 1], port));
    for (addr, user) in [(daemon.addr, Some("alpha:")), (own, None)] {
        for level in [3, 6] {
            // "MQTT" at level 3 (3.1 is "MQIsdp"), and a level after 5.
            let mut client = TcpStream::connect(addr).unwrap();
            client.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            client.write_all(&connect_as(level, "c", true, user, None)).unwrap();
            let mut got = Vec::new();
            let _ = std::io::Read::read_to_end(&mut client, &mut got);
            assert_eq!(got, [0x20, 2, 0, 1], "{addr}, level {level}: return code 1, then the close");
        }
    }
    // As `mqvisor run` answers: MQTT-3.1.2-2. No VM was booted for them.
    assert!(!daemon.log_has("process started"), "a VM was started for a protocol level nobody speaks");
}

/// Times the process `pid` has gone to sleep and been woken, all its
/// threads together (voluntary context switches, /proc/PID/task/*/status).
fn wake_ups(pid: u32) -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let switches = status.lines().find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"));
        total += switches.and_then(|n| n.trim().parse::<u64>().ok()).unwrap_or(0);
    }
    total
}

/// Asserts the daemon is idle: fewer than 100 wake-ups in 2 s (its
/// timers and the tenants' load reports, once a second each, wake it a few
/// times; a loop on a stale timer wakes it about 900 times a second).
fn assert_idle(daemon: &Daemon, after: &str) {
    let pid = daemon.child.id();
    let before = wake_ups(pid);
    std::thread::sleep(Duration::from_secs(2));
    let woken = wake_ups(pid) - before;
    eprintln!("{after}: the daemon woke {woken} times in 2 s");
    assert!(woken < 100, "{after}: the daemon woke {woken} times in 2 s with nothing to do");
}

/// The pid of the `n`th process booted for `tenant` (from 1), once booted.
fn nth_pid(daemon: &Daemon, tenant: &str, n: usize) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let booted: Vec<String> = daemon
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("booted") && l.contains(&format!("tenant={tenant} ")))
            .cloned()
            .collect();
        if let Some(line) = booted.get(n - 1) {
            return line.split("pid=").nth(1).and_then(|r| r.split_whitespace().next()).unwrap().parse().unwrap();
        }
        assert!(Instant::now() < deadline, "no process {n} of {tenant}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Opens a client every `every` for `during`, each sending a v3.1.1
/// CONNECT as `username`: the streams, in order.
fn connect_burst(addr: SocketAddr, username: &str, every: Duration, during: Duration) -> Vec<TcpStream> {
    let started = Instant::now();
    let mut clients = Vec::new();
    while started.elapsed() < during {
        let mut client = TcpStream::connect(addr).unwrap();
        client.write_all(&connect_as(4, &format!("burst-{}", clients.len()), true, Some(username), None)).unwrap();
        clients.push(client);
        let next = every * u32::try_from(clients.len()).unwrap();
        if let Some(wait) = next.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    clients
}

/// How many of `clients` got no CONNACK (return code 0) by `deadline`.
fn without_connack(clients: &mut [TcpStream], deadline: Instant) -> usize {
    let mut missing = 0;
    for client in clients {
        let wait = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        client.set_read_timeout(Some(wait)).unwrap();
        missing += usize::from(try_read_packet(client).ok() != Some((0x20, vec![0, 0])));
    }
    missing
}

#[test]
fn clients_arriving_while_a_crashed_tenant_restarts_are_all_served_and_the_daemon_goes_idle() {
    if !kvm_available("clients_arriving_while_a_crashed_tenant_restarts_are_all_served_and_the_daemon_goes_idle") {
        return;
    }
    let daemon = Daemon::start("crash-burst", "[tenants.alpha]\nmax_connections = 1000\n", &[]);
    drop(connected(&daemon, "boot", "alpha:"));
    // SAFETY: kill(2) with a pid the daemon reported for its own child.
    unsafe { libc::kill(daemon.pid_of("alpha"), libc::SIGKILL) };
    daemon.wait_for(&["crashed", "tenant=alpha"]);
    // A client every 0.5 ms for 250 ms: the first ones wait out the
    // restart's backoff (100 ms), the later ones come after it.
    let mut clients = connect_burst(daemon.addr, "alpha:", Duration::from_micros(500), Duration::from_millis(250));
    let missing = without_connack(&mut clients, Instant::now() + Duration::from_secs(10));
    assert_eq!(missing, 0, "{missing} of {} clients got no CONNACK within 10 s of the crash", clients.len());
    assert_idle(&daemon, "after the restart");
    drop(clients);
    // A restart asked for during a backoff hands over the clients waiting
    // for it too.
    // SAFETY: as above.
    unsafe { libc::kill(nth_pid(&daemon, "alpha", 2), libc::SIGKILL) };
    let crashed = |n: usize| daemon.log.lock().unwrap().iter().filter(|l| l.contains("crashed")).count() >= n;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !crashed(2) {
        assert!(Instant::now() < deadline, "no second crash");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The second crash waits 200 ms before its restart.
    let mut waiting = connect_burst(daemon.addr, "alpha:", Duration::from_millis(2), Duration::from_millis(40));
    let (ok, _, err) = daemon.tenant(&["restart", "alpha"]);
    assert!(ok, "{err}");
    let missing = without_connack(&mut waiting, Instant::now() + Duration::from_secs(10));
    assert_eq!(missing, 0, "{missing} of {} clients waiting during a backoff got no CONNACK", waiting.len());
    assert_idle(&daemon, "after a restart during a backoff");
}

/// The front's budget for first packets, host-wide (`MAX_PENDING_BYTES`).
const FRONT_BYTE_BUDGET: usize = 32 << 20;

/// A client that announces a CONNECT of 65,000 bytes and sends
/// `sent` bytes of it (the fixed header's 4 included), then waits.
fn half_sent_connect(addr: SocketAddr, sent: usize) -> std::io::Result<TcpStream> {
    let mut client = TcpStream::connect(addr)?;
    // CONNECT, remaining length 65,000 (a varint: 0xe8 0xfb 0x03).
    client.write_all(&[0x10, 0xe8, 0xfb, 0x03])?;
    client.write_all(&vec![0x5a; sent - 4])?;
    Ok(client)
}

#[test]
fn half_sent_connects_filling_the_byte_budget_never_lock_out_a_polite_client() {
    if !kvm_available("half_sent_connects_filling_the_byte_budget_never_lock_out_a_polite_client") {
        return;
    }
    let port = free_port();
    let daemon =
        Daemon::start("byte-budget", &format!("[tenants.alpha]\n[tenants.beta]\nlisten = \"127.0.0.1:{port}\"\n"), &[]);
    let own = SocketAddr::from(([127, 0, 0, 1], port));
    // Both tenants booted, so a CONNACK below takes no boot.
    drop(connected(&daemon, "a", "alpha:"));
    assert_eq!(connect_code(own, "b", None), 0);
    // 559 clients each hold 60,004 bytes of a half-sent CONNECT, and one
    // more fills the budget to 10 bytes short: no CONNECT fits in them.
    let each = 60_004;
    let mut attack: Vec<TcpStream> = (0..559).map(|_| half_sent_connect(daemon.addr, each).unwrap()).collect();
    let last = FRONT_BYTE_BUDGET - 559 * each - 10;
    attack.push(half_sent_connect(daemon.addr, last).unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let held = daemon.metric("mqvisor_front_pending_bytes");
        if held == (FRONT_BYTE_BUDGET - 10) as u64 {
            break;
        }
        assert!(Instant::now() < deadline, "the front holds {held} bytes, not the whole attack");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The attack goes on, new half-sent CONNECTs taking the place of old ones.
    let addr = daemon.addr;
    let going_on = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let attacker = {
        let going_on = going_on.clone();
        std::thread::spawn(move || {
            let mut more = Vec::new();
            for _ in 0..300 {
                if !going_on.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                // One the front drops while it is still sending fails here.
                more.extend(half_sent_connect(addr, each).ok());
                std::thread::sleep(Duration::from_millis(5));
            }
            more
        })
    };
    // Polite clients, on the shared port and on a tenant's own, are served
    // at once: the largest half-sent CONNECT makes room for them.
    let mut slowest = Duration::ZERO;
    for i in 0..20 {
        let started = Instant::now();
        for (addr, user) in [(daemon.addr, Some("alpha:")), (own, None)] {
            let mut client = TcpStream::connect(addr).unwrap();
            client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            client.write_all(&connect_as(4, &format!("polite-{i}"), true, user, None)).unwrap();
            let answer = try_read_packet(&mut client);
            assert_eq!(answer.ok(), Some((0x20, vec![0, 0])), "polite client {i} on {addr} during the attack");
        }
        slowest = slowest.max(started.elapsed());
        std::thread::sleep(Duration::from_millis(10));
    }
    going_on.store(false, std::sync::atomic::Ordering::Relaxed);
    let more = attacker.join().unwrap();
    eprintln!(
        "20 pairs of polite clients served during the attack ({} more half-sent), slowest pair {slowest:?}",
        more.len()
    );
    assert!(slowest < Duration::from_secs(2), "a polite client waited {slowest:?} during the attack");
    // The half-sent CONNECTs dropped for them, and for the attack's new
    // ones, are counted, and the budget holds.
    let dropped = daemon.metric("mqvisor_front_clients_dropped_total{reason=\"byte_budget\"}");
    assert!(dropped > more.len() as u64 / 2, "{dropped} half-sent CONNECTs dropped for {} more", more.len());
    assert!(daemon.metric("mqvisor_front_pending_bytes") <= FRONT_BYTE_BUDGET as u64);
    // The ones dropped are the attack's, reset: the oldest of the largest first.
    attack[0].set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut byte = [0u8; 1];
    let first = std::io::Read::read(&mut attack[0], &mut byte);
    assert!(first.is_err(), "the first half-sent CONNECT was not dropped: {first:?}");
    drop((attack, more));
}

/// A tenant's state file is locked by the VM that has it open, so a new VM
/// may boot only once the one asked to stop has gone. `tenant restart` in a
/// row, and a client arriving as an idle tenant stops, must therefore never
/// look like a crash (the new VM found the file in use and exited 125).
#[test]
fn a_restarted_tenant_boots_once_its_old_vm_has_let_go_of_its_state() {
    if !kvm_available("a_restarted_tenant_boots_once_its_old_vm_has_let_go_of_its_state") {
        return;
    }
    let daemon = Daemon::start("relock", "[tenants.alpha]\nidle_stop_after = 1\n", &[]);
    let mut client = connected(&daemon, "w", "alpha:");
    client.write_all(&publish("kept", b"across restarts", 1, 1, true)).unwrap();
    assert_eq!(read_packet(&mut client).0, 0x40, "PUBACK");
    drop(client);
    for _ in 0..3 {
        let (ok, _, err) = daemon.tenant(&["restart", "alpha"]);
        assert!(ok, "{err}");
    }
    let mut again = connected(&daemon, "r", "alpha:");
    let kept = first_message(&mut again, "kept", Duration::from_secs(5));
    assert_eq!(kept.as_deref(), Some(&b"across restarts"[..]));
    drop(again);
    // Idle: it stops; a client right then waits for the old VM to go.
    daemon.wait_for(&["idle: stopping", "tenant=alpha"]);
    let mut late = connected(&daemon, "l", "alpha:");
    let kept = first_message(&mut late, "kept", Duration::from_secs(5));
    assert_eq!(kept.as_deref(), Some(&b"across restarts"[..]));
    assert_eq!(daemon.show("alpha")["crashes"], 0, "no VM found the state file in use");
    assert!(!daemon.log_has("in use by another mqvisor"));
}

/// `dir/serve.toml` with `top` (keys of the daemon's own) put first.
fn with_top_level(dir: &std::path::Path, top: &str) {
    let config = dir.join("serve.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{top}\n{text}")).unwrap();
}

/// The address the daemon logged for `what` ("MQTT over TLS", ...).
fn shared_port(daemon: &Daemon, what: &str) -> u16 {
    let marker = format!("serve listening for {what} on ");
    let line = daemon.wait_for(&[&marker]);
    line.split(&marker).nth(1).unwrap().trim().parse::<SocketAddr>().unwrap().port()
}

/// paho-mqtt clients reaching tenants by host name on the shared TLS,
/// WebSocket and secure WebSocket ports (every `*.test` name resolves to
/// 127.0.0.1 inside the script). Each subscriber's messages, as JSON.
const PAHO_BY_HOST_NAME: &str = r#"
import json, socket, sys, threading, time
import paho.mqtt.client as mqtt
resolve = socket.getaddrinfo
socket.getaddrinfo = lambda host, *a, **k: resolve("127.0.0.1" if str(host).endswith(".test") else host, *a, **k)
ports, plan = json.loads(sys.argv[1]), json.loads(sys.argv[2])
def client(host, port, ca, name):
    transport = "websockets" if port in ("ws", "wss") else "tcp"
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, transport=transport, protocol=mqtt.MQTTv5)
    if ca:
        c.tls_set(ca_certs=ca)
    got = []
    c.on_message = lambda c, u, m: got.append(m.topic + " " + m.payload.decode())
    c.connect(host, ports[port])
    c.loop_start()
    return c, got
subscribers = {}
for name, (host, port, ca) in plan["subscribers"].items():
    c, got = client(host, port, ca, name)
    c.subscribe("news/#", qos=1)
    subscribers[name] = (c, got)
time.sleep(1)
for name, (host, port, ca, topic) in plan["publishers"].items():
    c, _ = client(host, port, ca, name)
    c.publish(topic, name, qos=1).wait_for_publish(10)
    c.disconnect(); c.loop_stop()
time.sleep(1)
print(json.dumps({name: sorted(got) for name, (c, got) in subscribers.items()}))
"#;

#[test]
fn tls_and_websocket_clients_reach_the_tenant_their_host_name_names_and_no_other() {
    let test = "tls_and_websocket_clients_reach_the_tenant_their_host_name_names_and_no_other";
    if !kvm_available(test)
        || !common::tool_available(test, common::pki::OPENSSL, common::pki::OPENSSL_PROBE)
        || !common::tool_available(test, "Python paho-mqtt (pip install paho-mqtt)", "python3 -c 'import paho.mqtt'")
    {
        return;
    }
    // The provider's wildcard certificate for every tenant, and acme's own
    // certificate for its own domain from another CA.
    let provider = common::pki::Pki::make("serve-provider");
    provider.server("wildcard", "DNS:*.mq.test");
    let acme_ca = common::pki::Pki::make("serve-acme");
    acme_ca.server("acme", "DNS:mqtt.acme.test");
    let tenants = format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"\n[tenants.acme]\ntls_names = [\"mqtt.acme.test\"]\n\
         tls_cert = \"{}\"\ntls_key = \"{}\"\n[tenants.globex]\n",
        provider.path("wildcard.pem"),
        provider.path("wildcard.key"),
        acme_ca.path("acme.pem"),
        acme_ca.path("acme.key"),
    );
    let dir = Daemon::configure("tls-sni", &tenants, &[]);
    with_top_level(
        &dir,
        "listen_tls = \"127.0.0.1:0\"\nlisten_ws = \"127.0.0.1:0\"\nlisten_wss = \"127.0.0.1:0\"\ntls_domain = \"mq.test\"",
    );
    let daemon = Daemon::spawn(dir);
    let ports = serde_json::json!({
        "tls": shared_port(&daemon, "MQTT over TLS"),
        "ws": shared_port(&daemon, "MQTT over WebSockets"),
        "wss": shared_port(&daemon, "MQTT over secure WebSockets"),
    });
    let (wildcard_ca, acme_own_ca) = (provider.path("ca.pem"), acme_ca.path("ca.pem"));
    // acme's clients by its provider name over TLS, by its own name, and by
    // Host over plain WebSockets; globex's over secure WebSockets and TLS.
    let plan = serde_json::json!({
        "subscribers": {
            "acme-sub": ["acme.mq.test", "tls", wildcard_ca],
            "acme-own-sub": ["mqtt.acme.test", "tls", acme_own_ca],
            "globex-sub": ["globex.mq.test", "wss", wildcard_ca],
        },
        "publishers": {
            "acme-ws": ["acme.mq.test", "ws", null, "news/a"],
            "acme-own-tls": ["mqtt.acme.test", "tls", acme_own_ca, "news/b"],
            "globex-tls": ["globex.mq.test", "tls", wildcard_ca, "news/c"],
            "globex-ws": ["globex.mq.test", "ws", null, "news/d"],
        },
    });
    let out = std::process::Command::new("python3")
        .args(["-c", PAHO_BY_HOST_NAME, &ports.to_string(), &plan.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let got: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    let acme = serde_json::json!(["news/a acme-ws", "news/b acme-own-tls"]);
    assert_eq!(got["acme-sub"], acme, "{got}");
    assert_eq!(got["acme-own-sub"], acme, "{got}");
    assert_eq!(got["globex-sub"], serde_json::json!(["news/c globex-tls", "news/d globex-ws"]), "{got}");
    // The daemon never read either key: each tenant's own process did.
    for tenant in ["acme", "globex"] {
        assert!(daemon.show(tenant)["state"] == "running", "{}", daemon.show(tenant));
    }
}

/// openssl s_client's handshake with `args` to the shared TLS port: its
/// output, stdout and stderr together.
fn s_client(port: u16, args: &[&str]) -> String {
    let out = std::process::Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// What the server sends back to `bytes`, until it closes (or 10 s pass).
fn answer_to(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(bytes).unwrap();
    let mut got = Vec::new();
    let _ = std::io::Read::read_to_end(&mut stream, &mut got);
    got
}

#[test]
fn unknown_or_missing_host_names_and_wrong_protocols_are_refused_on_the_shared_edge_ports_without_booting() {
    let test = "unknown_or_missing_host_names_and_wrong_protocols_are_refused_on_the_shared_edge_ports_without_booting";
    if !kvm_available(test) || !common::tool_available(test, common::pki::OPENSSL, common::pki::OPENSSL_PROBE) {
        return;
    }
    let pki = common::pki::Pki::make("serve-refusals");
    pki.server("wildcard", "DNS:*.mq.test");
    let (cert, key) = (pki.path("wildcard.pem"), pki.path("wildcard.key"));
    let pair = format!("tls_cert = \"{cert}\"\ntls_key = \"{key}\"\n");
    // dup1 and dup2 both claim one name: neither gets it.
    let tenants = format!(
        "[tenants.acme]\n{pair}[tenants.plainonly]\n[tenants.dup1]\n{pair}tls_names = [\"mqtt.dup.test\"]\n\
         [tenants.dup2]\n{pair}tls_names = [\"mqtt.dup.test\"]\n"
    );
    let dir = Daemon::configure("tls-refusals", &tenants, &[]);
    with_top_level(&dir, "listen_tls = \"127.0.0.1:0\"\nlisten_ws = \"127.0.0.1:0\"\ntls_domain = \"mq.test\"");
    let daemon = Daemon::spawn(dir);
    let tls = shared_port(&daemon, "MQTT over TLS");
    let ws = shared_port(&daemon, "MQTT over WebSockets");

    // A name no tenant has, a tenant without a certificate, no name at all:
    // the handshake ends with an unrecognized_name alert.
    for args in [&["-servername", "nobody.mq.test"][..], &["-servername", "plainonly.mq.test"], &["-noservername"]] {
        let said = s_client(tls, args);
        assert!(said.contains("unrecognized name"), "{args:?}: {said}");
    }
    // Plain MQTT on the TLS port: a decode_error alert, no CONNACK.
    let got = answer_to(tls, &connect_as(4, "lost", true, Some("acme:"), None));
    assert_eq!(got, [0x15, 3, 3, 0, 2, 2, 50], "{got:02x?}");
    // Garbage that looks like a record: an alert, nothing else.
    let got = answer_to(tls, &[0x16, 3, 1, 0, 5, 1, 2, 3, 4, 5]);
    assert_eq!(got.first(), Some(&0x15), "{got:02x?}");
    // A Host no tenant has: 421. Plain MQTT on the WebSocket port: 400.
    let request = "GET /mqtt HTTP/1.1\r\nHost: nobody.mq.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
                   Sec-WebSocket-Protocol: mqtt\r\n\r\n";
    let got = String::from_utf8_lossy(&answer_to(ws, request.as_bytes())).into_owned();
    assert!(got.starts_with("HTTP/1.1 421"), "{got}");
    let got = String::from_utf8_lossy(&answer_to(ws, &connect_as(4, "lost", true, None, None))).into_owned();
    assert!(got.starts_with("HTTP/1.1 400"), "{got}");

    for tenant in ["dup1", "dup2"] {
        let view = daemon.show(tenant);
        assert_eq!(view["state"], "failed", "{view}");
        assert!(view["error"].as_str().unwrap().contains("claimed by tenants dup1, dup2"), "{view}");
    }
    let said = s_client(tls, &["-servername", "mqtt.dup.test"]);
    assert!(said.contains("unrecognized name"), "{said}");

    // Nothing booted, and each refusal is counted.
    for tenant in ["acme", "plainonly"] {
        assert_eq!(daemon.show(tenant)["boots"], 0, "{}", daemon.show(tenant));
    }
    let metrics = daemon.metrics();
    for (reason, at_least) in
        [("unknown_server_name", 3), ("no_server_name", 1), ("not_tls", 1), ("bad_websocket_request", 2)]
    {
        let series = format!("mqvisor_front_clients_dropped_total{{reason=\"{reason}\"}} ");
        let value: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&series))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in {metrics}"));
        assert!(value >= at_least, "{series}{value}");
    }
    // And the tenant with a certificate is served through the same port.
    let said = s_client(tls, &["-servername", "acme.mq.test", "-CAfile", &pki.path("ca.pem"), "-verify_return_error"]);
    assert!(said.contains("Verify return code: 0 (ok)"), "{said}");
}

#[test]
fn a_tenant_s_own_client_ca_holds_on_every_shared_port_and_a_hello_sent_a_byte_at_a_time_gets_through() {
    let test = "a_tenant_s_own_client_ca_holds_on_every_shared_port_and_a_hello_sent_a_byte_at_a_time_gets_through";
    if !kvm_available(test) || !common::tool_available(test, common::pki::OPENSSL, common::pki::OPENSSL_PROBE) {
        return;
    }
    let pki = common::pki::Pki::make("serve-mtls");
    pki.server("wildcard", "DNS:*.mq.test");
    let tenants = format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"\n[tenants.acme]\ntls_client_ca = \"{}\"\n[tenants.globex]\n",
        pki.path("wildcard.pem"),
        pki.path("wildcard.key"),
        pki.path("ca.pem"),
    );
    let dir = Daemon::configure("tls-mtls", &tenants, &[]);
    with_top_level(&dir, "listen_tls = \"127.0.0.1:0\"\nlisten_ws = \"127.0.0.1:0\"\ntls_domain = \"mq.test\"");
    let daemon = Daemon::spawn(dir);
    let tls = shared_port(&daemon, "MQTT over TLS");
    let ws = shared_port(&daemon, "MQTT over WebSockets");
    let ca = pki.path("ca.pem");
    // No way around acme's client certificates: not by prefix on the plain
    // port, not by Host on the WebSocket port (globex is reached both ways).
    assert_eq!(connect_code(daemon.addr, "acme:alice", None), 4);
    assert_eq!(connect_code(daemon.addr, "globex:", None), 0);
    let upgrade = |host: &str| {
        let request = format!(
            "GET /mqtt HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: mqtt\r\n\r\n"
        );
        // The status line and headers: a 101 keeps the connection open.
        let mut stream = TcpStream::connect(("127.0.0.1", ws)).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && std::io::Read::read(&mut stream, &mut byte).is_ok_and(|n| n == 1) {
            head.push(byte[0]);
        }
        String::from_utf8_lossy(&head).into_owned()
    };
    assert!(upgrade("acme.mq.test").starts_with("HTTP/1.1 421"));
    assert!(upgrade("globex.mq.test").starts_with("HTTP/1.1 101"));
    let verified = ["-CAfile", &ca, "-verify_return_error"];
    // acme wants a client certificate: without one the handshake fails;
    // with one it completes. globex asks for none.
    let (cert, key) = (pki.path("client.pem"), pki.path("client.key"));
    let said = s_client(tls, &[&["-servername", "acme.mq.test", "-cert", &cert, "-key", &key][..], &verified].concat());
    assert!(said.contains("Verify return code: 0 (ok)") && !said.contains("alert"), "{said}");
    // (TLS 1.2, where the refusal comes within the handshake: in 1.3 it
    // follows the client's Finished, which s_client may not wait for.)
    let said = s_client(tls, &[&["-servername", "acme.mq.test", "-tls1_2"][..], &verified].concat());
    assert!(said.contains("alert certificate required") || said.contains("alert handshake failure"), "{said}");
    let said = s_client(tls, &[&["-servername", "globex.mq.test"][..], &verified].concat());
    assert!(said.contains("Verify return code: 0 (ok)") && !said.contains("alert"), "{said}");

    // A ClientHello written a byte at a time still reaches globex, which
    // answers its CONNECT.
    let out = common::tls_connect_a_byte_at_a_time(tls, &ca, "globex.mq.test");
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

#[test]
fn usage_for_billing_only_grows_across_a_kill_and_a_daemon_restart() {
    if !kvm_available("usage_for_billing_only_grows_across_a_kill_and_a_daemon_restart") {
        return;
    }
    let mut daemon = Daemon::start("usage", "[tenants.alpha]\n[tenants.beta]\n", &[]);
    let usage = |daemon: &Daemon, tenant: &str| -> serde_json::Value {
        let (ok, json, err) = daemon.tenant(&["usage", tenant, "--json"]);
        assert!(ok, "tenant usage {tenant}: {err}");
        serde_json::from_str(&json).unwrap()
    };
    let figure = |u: &serde_json::Value, name: &str| u[name].as_u64().unwrap_or_else(|| panic!("no {name} in {u}"));
    // Waits until alpha has counted `n` messages in, each reading no lower than the one before.
    let seen = std::cell::RefCell::new(Vec::<serde_json::Value>::new());
    let counted = |daemon: &Daemon, n: u64| -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let now = usage(daemon, "alpha");
            if let Some(before) = seen.borrow().last() {
                for name in ["messages_in", "messages_out", "bytes_in", "bytes_out", "peak_connections"] {
                    assert!(figure(&now, name) >= figure(before, name), "{name} went back: {before} then {now}");
                }
                let seconds = |u: &serde_json::Value| u["connection_seconds"].as_f64().unwrap();
                assert!(seconds(&now) >= seconds(before), "connection_seconds went back: {before} then {now}");
                assert_eq!(now["since"], before["since"], "counting began again");
            }
            seen.borrow_mut().push(now.clone());
            if figure(&now, "messages_in") >= n || Instant::now() > deadline {
                return now;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    // `n` QoS 1 messages through alpha: each in once and out once.
    let exchange = |daemon: &Daemon, id: &str, n: u16| {
        let mut subscriber = connected(daemon, &format!("{id}-sub"), "alpha:");
        subscriber.write_all(&subscribe("meter/#", 0, 1)).unwrap();
        assert_eq!(read_packet(&mut subscriber).0, 0x90, "SUBACK");
        let mut publisher = connected(daemon, &format!("{id}-pub"), "alpha:");
        for i in 1..=n {
            publisher.write_all(&publish("meter/t", b"21.5", 1, i, false)).unwrap();
            assert_eq!(read_packet(&mut publisher).0, 0x40, "PUBACK");
        }
        for _ in 0..n {
            assert_eq!(read_packet(&mut subscriber).0, 0x30, "PUBLISH");
        }
        // Connected for a while, so connection-seconds count.
        std::thread::sleep(Duration::from_millis(1500));
        (subscriber, publisher)
    };
    let first = usage(&daemon, "alpha");
    assert_eq!((figure(&first, "messages_in"), figure(&first, "peak_connections")), (0, 0), "{first}");
    assert!(figure(&first, "since") > 1_700_000_000, "{first}");
    let clients = exchange(&daemon, "a", 50);
    let u = counted(&daemon, 50);
    assert_eq!((figure(&u, "messages_in"), figure(&u, "messages_out")), (50, 50), "{u}");
    assert!(figure(&u, "bytes_in") > 50 * 10 && figure(&u, "bytes_out") > 50 * 10, "{u}");
    assert_eq!(figure(&u, "peak_connections"), 2, "{u}");
    assert!(u["connection_seconds"].as_f64().unwrap() > 0.5, "{u}");
    assert!(figure(&u, "state_bytes") > 0, "{u}");
    // Another tenant's usage shows none of it; an unknown one is no one's.
    let beta = usage(&daemon, "beta");
    assert_eq!((figure(&beta, "messages_in"), figure(&beta, "bytes_in"), figure(&beta, "peak_connections")), (0, 0, 0));
    assert_eq!(daemon.http("GET", "/tenants/nope/usage", "").0, 404);
    assert_eq!(daemon.http("GET", "/tenants/alpha/usage/beta", "").0, 404);
    let (ok, _, err) = daemon.tenant(&["usage", "nope"]);
    assert!(!ok && err.contains("no tenant \"nope\""), "{err}");
    let (ok, table, err) = daemon.tenant(&["usage", "alpha"]);
    assert!(ok && table.contains("messages in         50"), "{table}{err}");
    // kill -9: the next process counts from 0, the ledger goes on from 50.
    // SAFETY: kill(2) with a pid the daemon reported for its own child.
    unsafe { libc::kill(daemon.pid_of("alpha"), libc::SIGKILL) };
    drop(clients);
    daemon.wait_for(&["crashed", "tenant=alpha"]);
    let _clients = exchange(&daemon, "b", 30);
    let u = counted(&daemon, 80);
    assert_eq!((figure(&u, "messages_in"), figure(&u, "messages_out")), (80, 80), "{u}");
    assert!(daemon.log_has("restarted"), "alpha's second process");
    let page = daemon.metrics();
    assert!(page.contains("mqvisor_tenant_usage_messages_in_total{tenant=\"alpha\"} 80"), "{page}");
    assert!(page.contains("mqvisor_tenant_usage_messages_in_total{tenant=\"beta\"} 0"), "{page}");
    // A daemon killed with -9 loses at most what came after its last save
    // (every 10 s): once the file holds the figures, they are kept.
    let file = daemon.dir.join("state/usage/alpha.json");
    let saved = |n: u64| {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        serde_json::from_str::<serde_json::Value>(&text).is_ok_and(|r| r["usage"]["messages_in"] == n)
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while !saved(80) {
        assert!(Instant::now() < deadline, "alpha's usage file was not written within 15 s");
        std::thread::sleep(Duration::from_millis(200));
    }
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    // SAFETY: kill(2) on our own child with a valid signal.
    unsafe { libc::kill(daemon.child.id() as libc::pid_t, libc::SIGKILL) };
    let _ = daemon.child.wait();
    let restarted = Daemon::spawn(daemon.dir.clone());
    let kept = counted(&restarted, 80);
    assert_eq!((figure(&kept, "messages_in"), figure(&kept, "messages_out")), (80, 80), "{kept}");
    assert_eq!(kept["since"], first["since"], "{kept}");
    // More through the restarted daemon, then a clean stop: it writes them.
    let clients = exchange(&restarted, "c", 20);
    let u = counted(&restarted, 100);
    assert_eq!(figure(&u, "messages_in"), 100, "{u}");
    drop(clients);
    let mut restarted = restarted;
    restarted.stop();
    let restarted = Daemon::spawn(daemon.dir.clone());
    let kept = usage(&restarted, "alpha");
    assert_eq!((figure(&kept, "messages_in"), figure(&kept, "messages_out")), (100, 100), "{kept}");
    assert!(kept["connection_seconds"].as_f64() >= u["connection_seconds"].as_f64(), "{kept}");
    // Removed: its last record is kept for billing, its file goes.
    let (ok, _, err) = restarted.tenant(&["remove", "alpha"]);
    assert!(ok, "{err}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while file.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!file.exists(), "alpha's usage outlived it");
    let removed: Vec<_> = std::fs::read_dir(daemon.dir.join("state/usage/removed")).unwrap().flatten().collect();
    assert_eq!(removed.len(), 1, "{removed:?}");
    let record: serde_json::Value = serde_json::from_slice(&std::fs::read(removed[0].path()).unwrap()).unwrap();
    assert_eq!(record["usage"]["messages_in"], 100, "{record}");
}

/// Reads `count` PUBLISH packets from `stream`.
fn receive(stream: &mut TcpStream, count: usize) {
    for i in 0..count {
        let (kind, _) = try_read_packet(stream).unwrap_or_else(|e| panic!("message {i} of {count}: {e}"));
        assert_eq!(kind & 0xF0, 0x30, "PUBLISH");
    }
}

#[test]
fn a_publish_rate_set_in_serves_config_holds_that_tenant_back_and_no_other() {
    if !kvm_available("a_publish_rate_set_in_serves_config_holds_that_tenant_back_and_no_other") {
        return;
    }
    // [defaults] set the quota; globex's own key lifts it.
    let daemon = Daemon::start(
        "quotas",
        "max_publish_rate = 500\n[tenants.acme]\n[tenants.globex]\nmax_publish_rate = 0\n",
        &[],
    );
    const MESSAGES: usize = 1500;
    let burst: Vec<u8> = (0..MESSAGES).flat_map(|i| publish("t", format!("{i}").as_bytes(), 0, 0, false)).collect();
    let mut took = Vec::new();
    for tenant in ["acme", "globex"] {
        let mut reader = connected(&daemon, "reader", &format!("{tenant}:reader"));
        reader.write_all(&subscribe("t", 0, 1)).unwrap();
        assert_eq!(read_packet(&mut reader).0, 0x90, "SUBACK");
        let mut writer = connected(&daemon, "writer", &format!("{tenant}:writer"));
        let started = Instant::now();
        writer.write_all(&burst).unwrap();
        receive(&mut reader, MESSAGES);
        took.push(started.elapsed());
    }
    eprintln!("{MESSAGES} QoS 0 messages: acme (500/s) {:?}, globex (no quota) {:?}", took[0], took[1]);
    // 3 s of tokens but the first 100 ms burst: every message, none early.
    assert!(took[0] >= Duration::from_millis(2700), "acme was not held to 500/s: {:?}", took[0]);
    // Counted for acme alone (the load report comes once a second).
    let series = |tenant: &str| format!("mqvisor_tenant_throttled_publishes_total{{tenant=\"{tenant}\"}}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while daemon.metric(&series("acme")) == 0 {
        assert!(Instant::now() < deadline, "acme's throttled publishes never counted");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(daemon.metric(&series("globex")), 0, "globex has no quota");
    assert!(took[1] < took[0], "globex was held back too: {took:?}");
}

#[test]
fn connection_seconds_are_the_time_clients_were_connected_and_a_short_burst_is_the_peak() {
    if !kvm_available("connection_seconds_are_the_time_clients_were_connected_and_a_short_burst_is_the_peak") {
        return;
    }
    let daemon = Daemon::start("connected-time", "[tenants.beta]\n", &[]);
    let usage = || -> serde_json::Value {
        let (ok, json, err) = daemon.tenant(&["usage", "beta", "--json"]);
        assert!(ok, "{err}");
        serde_json::from_str(&json).unwrap()
    };
    // Booted by one client that leaves at once; then 3 s with nobody.
    drop(connected(&daemon, "boot", "beta:"));
    std::thread::sleep(Duration::from_secs(3));
    // Ten clients for one second: about 10 connection-seconds, where a
    // count sampled at each report charged the quiet gap too (about 40).
    let held = Instant::now();
    let ten: Vec<_> = (0..10).map(|i| connected(&daemon, &format!("c{i}"), "beta:")).collect();
    std::thread::sleep(Duration::from_secs(1));
    drop(ten);
    let held = held.elapsed().as_secs_f64();
    // Thirty clients for 200 ms, less than a report's interval.
    let thirty: Vec<_> = (0..30).map(|i| connected(&daemon, &format!("b{i}"), "beta:")).collect();
    std::thread::sleep(Duration::from_millis(200));
    drop(thirty);
    let deadline = Instant::now() + Duration::from_secs(15);
    let u = loop {
        let u = usage();
        if u["peak_connections"].as_u64() == Some(30) || Instant::now() > deadline {
            break u;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(u["peak_connections"], 30, "{u}");
    let seconds = u["connection_seconds"].as_f64().unwrap();
    eprintln!("10 clients for {held:.2} s and 30 for 0.2 s: {seconds:.2} connection-seconds");
    // Plus the burst (6), and slack for the time connecting and closing
    // take on a loaded machine; charging the quiet gap made it 40 or more.
    assert!(seconds >= 10.0 * 0.9 && seconds <= 10.0 * held + 6.0 + 6.0, "{u}");
}

#[test]
fn usage_counts_what_a_tenant_did_just_before_a_clean_stop() {
    if !kvm_available("usage_counts_what_a_tenant_did_just_before_a_clean_stop") {
        return;
    }
    let mut daemon = Daemon::start("usage-stop", "[tenants.gamma]\n", &[]);
    // 100 QoS 1 messages acknowledged, then SIGTERM at once.
    let mut publisher = connected(&daemon, "p", "gamma:");
    for i in 1..=100 {
        publisher.write_all(&publish("t", b"x", 1, i, false)).unwrap();
        assert_eq!(read_packet(&mut publisher).0, 0x40, "PUBACK");
    }
    daemon.stop();
    let restarted = Daemon::spawn(daemon.dir.clone());
    let (ok, json, err) = restarted.tenant(&["usage", "gamma", "--json"]);
    assert!(ok, "{err}");
    let u: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(u["messages_in"], 100, "{u}");
    assert!(u["bytes_in"].as_u64().unwrap() > 100 * 8, "{u}");
}

/// The daemon's children waiting as its spare (`--tenant-settings-from-handoff`
/// in their command line, and no tenant's pid).
fn spares(daemon: &Daemon) -> Vec<u32> {
    let daemon_pid = daemon.child.id().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // The parent pid is the second field after the command name's ')'.
        let parent = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1).map(str::to_string));
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if parent.as_deref() == Some(daemon_pid.as_str())
            && String::from_utf8_lossy(&cmdline).contains("--tenant-settings-from-handoff")
        {
            found.push(pid);
        }
    }
    found
}

/// The spares that are not (yet) any tenant's process, once there is one.
fn waiting_spare(daemon: &Daemon) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let tenants: Vec<u64> = daemon.list().iter().filter_map(|t| t["pid"].as_u64()).collect();
        let waiting: Vec<u32> = spares(daemon).into_iter().filter(|p| !tenants.contains(&u64::from(*p))).collect();
        if let [spare] = waiting[..] {
            return spare;
        }
        assert!(waiting.len() <= 1, "more than one spare: {waiting:?}");
        assert!(Instant::now() < deadline, "no spare process within 10 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_cold_tenant_takes_the_spare_process_and_one_that_died_is_replaced() {
    let test = "a_cold_tenant_takes_the_spare_process_and_one_that_died_is_replaced";
    if !kvm_available(test) {
        return;
    }
    let daemon = Daemon::start("spare", "[tenants.alpha]\n[tenants.beta]\n[tenants.gamma]\n", &[]);
    // Started with the daemon, before any client.
    let spare = waiting_spare(&daemon);
    let mut alpha = connected(&daemon, "a", "alpha:");
    assert_eq!(daemon.pid_of("alpha"), spare as i32, "alpha did not run in the spare");
    alpha.write_all(&publish("kept", b"alpha's", 1, 1, true)).unwrap();
    assert_eq!(read_packet(&mut alpha).0, 0x40, "PUBACK");
    // Another spare replaces it, and the next cold tenant gets that one,
    // with nothing of alpha's.
    let next = waiting_spare(&daemon);
    assert_ne!(next, spare);
    let mut beta = connected(&daemon, "b", "beta:");
    assert_eq!(daemon.pid_of("beta"), next as i32, "beta did not run in the new spare");
    assert_eq!(first_message(&mut beta, "kept", Duration::from_millis(500)), None, "beta saw alpha's retained message");
    // A spare killed before use is reaped and replaced with no tenant
    // booting, and the next cold tenant never gets the dead one.
    let doomed = waiting_spare(&daemon);
    // SAFETY: kill(2) on a child of the daemon this test started.
    unsafe { libc::kill(doomed as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::path::Path::new(&format!("/proc/{doomed}")).exists() || waiting_spare(&daemon) == doomed {
        assert!(Instant::now() < deadline, "the killed spare {doomed} was not reaped and replaced");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut gamma = connected(&daemon, "g", "gamma:");
    assert_ne!(daemon.pid_of("gamma"), doomed as i32);
    gamma.write_all(&publish("kept", b"gamma's", 1, 1, true)).unwrap();
    assert_eq!(read_packet(&mut gamma).0, 0x40, "PUBACK from gamma's own process");
    waiting_spare(&daemon);
    // Each tenant's process reads its own settings file: alpha's state is
    // its own, back after a restart in a spare.
    drop(alpha);
    let (ok, _, err) = daemon.tenant(&["restart", "alpha"]);
    assert!(ok, "restart alpha: {err}");
    let mut again = connected(&daemon, "a2", "alpha:");
    assert_eq!(first_message(&mut again, "kept", Duration::from_secs(5)).as_deref(), Some(&b"alpha's"[..]));
}

#[test]
fn a_spare_of_a_replaced_binary_is_not_used() {
    let test = "a_spare_of_a_replaced_binary_is_not_used";
    if !kvm_available(test) {
        return;
    }
    // The daemon runs from a copy of the binary, which is then upgraded in
    // place (a new file renamed over it), as a package manager does.
    let dir = Daemon::configure("spare-upgrade", "[tenants.alpha]\n", &[]);
    let exe = dir.join("mqvisor");
    std::fs::copy(env!("CARGO_BIN_EXE_mqvisor"), &exe).unwrap();
    let daemon = Daemon::spawn_command(dir.clone(), std::process::Command::new(&exe));
    let old_spare = waiting_spare(&daemon);
    std::fs::copy(env!("CARGO_BIN_EXE_mqvisor"), dir.join("mqvisor.new")).unwrap();
    std::fs::rename(dir.join("mqvisor.new"), &exe).unwrap();
    let _alpha = connected(&daemon, "a", "alpha:");
    let pid = daemon.pid_of("alpha");
    assert_ne!(pid, old_spare as i32, "alpha ran in the spare of the replaced binary");
    assert!(runs_current_binary(pid), "alpha runs the replaced binary");
    // The old spare is gone, and the next one runs the new binary.
    assert!(ends_within(old_spare as i32, Duration::from_secs(10)), "the old spare {old_spare} still runs");
    let new_spare = waiting_spare(&daemon);
    assert!(runs_current_binary(new_spare as i32), "the new spare runs the replaced binary");
}

/// Whether process `pid` runs the file its executable path names now, not
/// one since replaced (which `/proc` shows as deleted).
fn runs_current_binary(pid: i32) -> bool {
    let running = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    !running.to_string_lossy().ends_with("(deleted)")
}

#[test]
fn a_restart_of_a_process_that_does_not_end_kills_it_and_boots_another() {
    let test = "a_restart_of_a_process_that_does_not_end_kills_it_and_boots_another";
    if !kvm_available(test) {
        return;
    }
    let daemon = Daemon::start("hung", "[tenants.alpha]\n", &[]);
    let mut first = connected(&daemon, "a", "alpha:");
    first.write_all(&publish("kept", b"before", 1, 1, true)).unwrap();
    assert_eq!(read_packet(&mut first).0, 0x40, "PUBACK");
    let hung = daemon.pid_of("alpha");
    // SAFETY: kill(2) on a tenant process of the daemon this test started.
    unsafe { libc::kill(hung, libc::SIGSTOP) };
    let (ok, _, err) = daemon.tenant(&["restart", "alpha"]);
    assert!(ok, "restart: {err}");
    daemon.wait_for(&["did not end after being stopped: killed", "tenant=alpha"]);
    let started = Instant::now();
    let mut again = connected(&daemon, "a2", "alpha:");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_ne!(daemon.pid("alpha"), u64::try_from(hung).ok());
    assert_eq!(first_message(&mut again, "kept", Duration::from_secs(5)).as_deref(), Some(&b"before"[..]));
}
