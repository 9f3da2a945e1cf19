//! Durable state across restarts, with a simulated runner and disk (with
//! `sync` persistence every acknowledgement waits for its records, and only
//! the disk survives `kill -9`): session expiry counts across restarts from
//! when the session lost its connection.

use std::collections::HashMap;

use mqvisor_broker::broker::{Broker, Config, ConnId, Transmit};
use mqvisor_broker::packet::{self, Connect, Packet, QoS, Subscribe, SubscriptionOptions, Version, Will};
use mqvisor_broker::properties::Properties;

const V5: Version = Version::V5;
/// A wall-clock time (Unix ms), as the guest's broker runs on.
const T0: u64 = 1_700_000_000_000;

/// A broker with a runner that keeps its state as `mqvisor run --state
/// --persistence sync` does: after every input the new records are
/// committed before any output leaves. Only `disk` survives `kill -9`.
struct Tenant {
    broker: Broker,
    now: u64,
    /// Record bodies on the disk, oldest first.
    disk: Vec<Vec<u8>>,
    /// The disk refuses writes.
    failing: bool,
    /// The runner has seen the disk fail (and told the broker).
    store_failed: bool,
    versions: HashMap<ConnId, Version>,
    wire: HashMap<ConnId, Vec<u8>>,
    stash: HashMap<ConnId, Vec<Packet>>,
    closed: Vec<ConnId>,
}

impl Tenant {
    fn new() -> Tenant {
        Tenant::boot(Vec::new(), T0)
    }

    /// Starts on `disk` at `now`, as the guest does at boot.
    fn boot(disk: Vec<Vec<u8>>, now: u64) -> Tenant {
        let config = Config { sys_interval_ms: 0, ..Config::default() };
        config.validate().expect("a valid test configuration");
        let mut broker = Broker::new(config);
        for body in &disk {
            assert!(broker.restore(body, now), "every record decodes");
        }
        broker.finish_restore(now);
        broker.enable_journal();
        let mut tenant = Tenant {
            broker,
            now,
            disk,
            failing: false,
            store_failed: false,
            versions: HashMap::new(),
            wire: HashMap::new(),
            stash: HashMap::new(),
            closed: Vec::new(),
        };
        tenant.commit();
        tenant
    }

    /// `kill -9`, then a start `later_ms` after the last input.
    fn restart(&self, later_ms: u64) -> Tenant {
        Tenant::boot(self.disk.clone(), self.now + later_ms)
    }

    /// The runner's commit: records to disk before output; a commit that
    /// fails withdraws the output waiting for it, and while the disk fails
    /// records are not kept (a compaction will write the whole state).
    fn commit(&mut self) {
        let records = self.broker.take_journal();
        if records.is_empty() {
            return;
        }
        if self.store_failed {
            return;
        }
        if self.failing {
            self.store_failed = true;
            self.broker.set_store_failed(true);
            self.broker.withdraw_output(self.now);
            return;
        }
        for record in records {
            let mut body = Vec::new();
            record.encode(&mut body);
            self.disk.push(body);
        }
    }

    fn send(&mut self, conn: ConnId, packet: &Packet) {
        let version = self.versions[&conn];
        let mut bytes = Vec::new();
        packet::encode(packet, version, &mut bytes);
        self.broker.receive(conn, &bytes, self.now);
        self.commit();
    }

    fn transmit(&mut self) {
        let (wire, closed) = (&mut self.wire, &mut self.closed);
        self.broker.poll_transmit(self.now, |conn, t| match t {
            Transmit::Bytes(bytes) => {
                wire.entry(conn).or_default().extend_from_slice(bytes);
                bytes.len()
            }
            Transmit::Close => {
                closed.push(conn);
                0
            }
        });
    }

    /// Everything sent to `conn` since the last call.
    fn recv(&mut self, conn: ConnId) -> Vec<Packet> {
        self.transmit();
        let bytes = self.wire.remove(&conn).unwrap_or_default();
        let mut packets = self.stash.remove(&conn).unwrap_or_default();
        let mut at = 0;
        while at < bytes.len() {
            let frame = packet::frame(&bytes[at..], usize::MAX).unwrap().expect("whole packets only");
            packets.push(packet::decode_from_server(frame, &bytes[at..], self.versions[&conn]).unwrap());
            at += frame.len;
        }
        packets
    }

    fn connect(&mut self, conn: ConnId, connect: Connect) -> (bool, u8) {
        self.versions.insert(conn, connect.version);
        self.closed.retain(|&c| c != conn);
        self.broker.open(conn, self.now);
        self.send(conn, &Packet::Connect(Box::new(connect)));
        let mut packets = self.recv(conn);
        assert!(!packets.is_empty(), "no CONNACK for {conn}");
        let first = packets.remove(0);
        self.stash.insert(conn, packets);
        match first {
            Packet::Connack(c) => (c.session_present, c.code),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    fn subscribe(&mut self, conn: ConnId, filter: &str, qos: QoS) -> Vec<u8> {
        let options = SubscriptionOptions { qos, no_local: false, retain_as_published: false, retain_handling: 0 };
        let s = Subscribe { packet_id: 1, properties: Properties::default(), filters: vec![(filter.into(), options)] };
        self.send(conn, &Packet::Subscribe(s));
        let mut packets = self.recv(conn);
        let at = packets.iter().position(|p| matches!(p, Packet::Suback { .. })).expect("SUBACK");
        let Packet::Suback { codes, .. } = packets.remove(at) else { unreachable!() };
        self.stash.insert(conn, packets);
        codes
    }

    fn close(&mut self, conn: ConnId) {
        self.broker.closed(conn, self.now);
        self.commit();
    }
}

/// A durable session's CONNECT: 3.x clean session 0, v5 expiry `expiry`.
fn durable(version: Version, client_id: &str, expiry: u32) -> Connect {
    let mut c = clean(version, client_id);
    c.clean_start = false;
    if version == V5 {
        c.properties.session_expiry_interval = Some(expiry);
    }
    c
}

/// A session that ends with its connection.
fn clean(version: Version, client_id: &str) -> Connect {
    Connect {
        version,
        clean_start: true,
        keep_alive: 0,
        properties: Properties::default(),
        client_id: client_id.into(),
        will: None,
        username: None,
        password: None,
    }
}

fn payloads(packets: &[Packet]) -> Vec<Vec<u8>> {
    packets.iter().filter_map(|p| if let Packet::Publish(p) = p { Some(p.payload.to_vec()) } else { None }).collect()
}

/// The retained message a new clean subscriber to `topic` gets, if any.
fn retained(t: &mut Tenant, conn: ConnId, topic: &str) -> Option<Vec<u8>> {
    t.connect(conn, clean(V5, &format!("look-{conn}")));
    t.subscribe(conn, topic, QoS::AtLeastOnce);
    let got = payloads(&t.recv(conn));
    t.close(conn);
    assert!(got.len() <= 1, "one retained message per topic: {got:?}");
    got.into_iter().next()
}

// ----- 7: session expiry across restarts --------------------------------------

#[test]
fn session_expiry_counts_from_the_lost_connection_across_restarts() {
    let mut t = Tenant::new();
    t.connect(1, durable(V5, "gone", 60));
    t.connect(2, durable(V5, "stays", 60));
    t.connect(3, durable(V5, "crashed", 60));
    t.close(1);
    t.now += 20_000;
    t.close(2);
    // 50 s after "gone" lost its connection: it is still there.
    let t = t.restart(30_000);
    assert_eq!(t.now, T0 + 50_000);
    // 61 s after: it has expired, though the broker was down meanwhile;
    // "stays" lost its connection 41 s ago.
    let mut later = t.restart(11_000);
    assert_eq!(later.connect(1, durable(V5, "gone", 60)), (false, 0), "expired while the broker was down");
    assert_eq!(later.connect(2, durable(V5, "stays", 60)), (true, 0));

    // "crashed" was connected when the broker died: its connection was
    // lost at the first restart (T0 + 50 s), and a broker that keeps
    // restarting still expires it 60 s after that.
    let mut t = t.restart(5_000).restart(5_000).restart(51_000);
    assert_eq!(t.connect(3, durable(V5, "crashed", 60)), (false, 0), "expired across a crash loop");
}

#[test]
fn a_will_delay_counts_from_the_lost_connection_across_a_restart() {
    let mut t = Tenant::new();
    let mut c = durable(V5, "w", 600);
    c.will = Some(Will {
        topic: "will".into(),
        payload: b"gone".to_vec(),
        qos: QoS::AtLeastOnce,
        retain: true,
        properties: Properties { will_delay_interval: Some(30), ..Properties::default() },
    });
    t.connect(1, c);
    t.close(1);
    // Restarted 40 s later: the will is overdue and fires at once.
    let mut t = t.restart(40_000);
    t.broker.tick(t.now);
    t.commit();
    assert_eq!(retained(&mut t, 2, "will"), Some(b"gone".to_vec()));
}
