//! Acknowledgements and durable state, with a simulated runner and disk:
//! with `sync` persistence every acknowledgement waits for its records, so
//! what a client was told survives `kill -9`; while the disk fails the
//! broker refuses what it cannot keep; a publish whose acknowledgement was
//! withdrawn leaves nothing behind; and session expiry counts across
//! restarts from when the session lost its connection.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use mqvisor_broker::broker::{Broker, Config, ConnId, Transmit, reason};
use mqvisor_broker::packet::{
    self, Ack, Connect, Packet, Payload, Publish, QoS, Subscribe, SubscriptionOptions, Unsubscribe, Version, Will,
};
use mqvisor_broker::properties::Properties;

const V3: Version = Version::V3_1_1;
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
        Tenant::boot_with(Config { sys_interval_ms: 0, ..Config::default() }, disk, now)
    }

    /// Starts on `disk` at `now` with `config`.
    fn boot_with(config: Config, disk: Vec<Vec<u8>>, now: u64) -> Tenant {
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

    /// The disk has been failing for a while: the broker knows.
    fn disk_fails(&mut self) {
        self.failing = true;
        self.store_failed = true;
        self.broker.set_store_failed(true);
    }

    /// The disk works again: the runner's retry compacts the live state.
    fn disk_returns(&mut self) {
        self.failing = false;
        if self.store_failed {
            drop(self.broker.take_journal());
            let mut disk = Vec::new();
            self.broker
                .snapshot(&mut |record| {
                    let mut body = Vec::new();
                    record.encode(&mut body);
                    disk.push(body);
                    Ok::<(), ()>(())
                })
                .unwrap();
            self.disk = disk;
            self.store_failed = false;
            self.broker.set_store_failed(false);
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

    /// Whether the broker closed `conn` (since it was opened).
    fn was_closed(&mut self, conn: ConnId) -> bool {
        self.transmit();
        self.closed.contains(&conn)
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

fn publish(topic: &str, payload: &[u8], qos: QoS, packet_id: u16, retain: bool) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain,
        topic: Arc::from(topic),
        packet_id: (qos != QoS::AtMostOnce).then_some(packet_id),
        properties: Default::default(),
        payload: Payload::from(payload),
    })
}

fn ack(packet_id: u16) -> Ack {
    Ack { packet_id, code: 0, properties: Properties::default() }
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

// ----- 4: while the disk fails, nothing is acknowledged that is not on disk --

#[test]
fn while_the_disk_fails_sessions_that_would_need_it_are_refused_at_connect() {
    let mut t = Tenant::new();
    t.connect(1, durable(V5, "old", 600));
    t.subscribe(1, "old/#", QoS::AtLeastOnce);
    t.close(1);
    t.disk_fails();
    // A new durable session (v5 expiry > 0, 3.x clean session 0) would be
    // lost with a kill -9; resuming or discarding one that is on disk
    // changes its will and expiry, or ends it: neither can be kept.
    let new5 = t.connect(2, durable(V5, "new5", 600));
    if new5.1 == reason::SUCCESS {
        t.subscribe(2, "new/#", QoS::AtLeastOnce);
    }
    let new3 = t.connect(3, durable(V3, "new3", 0));
    let resumed = t.connect(4, durable(V5, "old", 600));
    let discarded = t.connect(5, clean(V5, "old"));
    let closed = (2..=5).all(|conn| t.was_closed(conn));
    // Sessions that end with their connection need no disk: served.
    assert_eq!(t.connect(6, clean(V5, "reader5")), (false, reason::SUCCESS));
    assert_eq!(t.connect(7, clean(V3, "reader3")), (false, reason::v3::ACCEPTED));

    // After a kill -9 every session a CONNACK accepted is there.
    let mut t = t.restart(1_000);
    let present = |t: &mut Tenant, conn, connect| t.connect(conn, connect).0;
    assert_eq!(present(&mut t, 2, durable(V5, "new5", 600)), new5.1 == 0, "CONNACK {new5:?}");
    assert_eq!(present(&mut t, 3, durable(V3, "new3", 0)), new3.1 == 0, "CONNACK {new3:?}");
    assert_eq!(present(&mut t, 1, durable(V5, "old", 600)), discarded.1 != 0, "CONNACK {discarded:?}");

    // They were refused, "server unavailable".
    assert_eq!(new5, (false, reason::SERVER_UNAVAILABLE));
    assert_eq!(new3, (false, reason::v3::SERVER_UNAVAILABLE));
    assert_eq!(resumed, (false, reason::SERVER_UNAVAILABLE));
    assert_eq!(discarded, (false, reason::SERVER_UNAVAILABLE));
    assert!(closed);
}

#[test]
fn while_the_disk_fails_a_durable_session_cannot_change_its_subscriptions() {
    let mut t = Tenant::new();
    t.connect(1, durable(V5, "d5", 600));
    assert_eq!(t.subscribe(1, "kept", QoS::AtLeastOnce), [1]);
    t.connect(2, durable(V3, "d3", 0));
    assert_eq!(t.subscribe(2, "kept", QoS::AtLeastOnce), [1]);
    t.disk_fails();

    let suback5 = t.subscribe(1, "new", QoS::AtLeastOnce);
    let suback3 = t.subscribe(2, "new", QoS::AtLeastOnce);
    let unsubscribe = |filters: &[&str]| {
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 2,
            properties: Properties::default(),
            filters: filters.iter().map(|f| String::from(*f)).collect(),
        })
    };
    let unsuback = |packets: Vec<Packet>| {
        packets.into_iter().find_map(|p| match p {
            Packet::Unsuback { codes, .. } => Some(codes),
            _ => None,
        })
    };
    t.send(1, &unsubscribe(&["kept", "never"]));
    let unsuback5 = unsuback(t.recv(1));
    t.send(2, &unsubscribe(&["kept"]));
    let unsuback3 = unsuback(t.recv(2));
    let closed3 = t.was_closed(2);
    // A session that ends with its connection subscribes as ever.
    t.connect(3, clean(V5, "reader"));
    assert_eq!(t.subscribe(3, "new", QoS::AtLeastOnce), [1]);
    t.close(1);

    // After a kill -9 both sessions hold what they were told they hold.
    let mut t = t.restart(1_000);
    assert_eq!(t.connect(1, durable(V5, "d5", 600)), (true, reason::SUCCESS));
    assert_eq!(t.connect(2, durable(V3, "d3", 0)), (true, reason::v3::ACCEPTED));
    t.connect(9, clean(V5, "pub"));
    t.send(9, &publish("kept", b"k", QoS::AtLeastOnce, 1, false));
    t.send(9, &publish("new", b"n", QoS::AtLeastOnce, 2, false));
    let got5 = payloads(&t.recv(1));
    let got3 = payloads(&t.recv(2));
    let subscribed = |got: &[Vec<u8>], payload: &[u8]| got.iter().any(|p| p == payload);
    assert_eq!(subscribed(&got5, b"n"), suback5[0] < 0x80, "SUBACK {suback5:?}, then {got5:?}");
    assert_eq!(subscribed(&got3, b"n"), suback3[0] < 0x80, "SUBACK {suback3:?}, then {got3:?}");
    assert_eq!(subscribed(&got5, b"k"), unsuback5.as_ref().is_none_or(|c| c[0] >= 0x80), "{unsuback5:?}, {got5:?}");
    assert_eq!(subscribed(&got3, b"k"), unsuback3.is_none(), "UNSUBACK {unsuback3:?}, then {got3:?}");

    // What they were told: v5 0x97 and 0x80 per filter, 3.x 0x80 in
    // SUBACK; a 3.x UNSUBACK cannot say no, so the connection ends.
    assert_eq!(suback5, [reason::QUOTA_EXCEEDED]);
    assert_eq!(suback3, [0x80]);
    assert_eq!(unsuback5, Some(vec![reason::UNSPECIFIED_ERROR, reason::NO_SUBSCRIPTION_EXISTED]));
    assert_eq!((unsuback3, closed3), (None, true));
}

/// A QoS 2 publisher that keeps its session: PUBLISH, PUBREL; the disk
/// fails before the PUBREL; after a kill -9 it goes on as MQTT says
/// (a PUBREL it saw no PUBCOMP for is sent again) and publishes again
/// under the same packet id, which must be a new message.
fn qos2_publisher_across_a_failing_disk(version: Version) {
    let mut t = Tenant::new();
    t.connect(1, durable(version, "pub", 600));
    t.send(1, &publish("t", b"first", QoS::ExactlyOnce, 7, false));
    assert!(t.recv(1).iter().any(|p| matches!(p, Packet::Pubrec(a) if a.packet_id == 7 && a.code < 0x80)));
    t.disk_fails();
    t.send(1, &Packet::Pubrel(ack(7)));
    let packets = t.recv(1);
    let completed = packets.iter().any(|p| matches!(p, Packet::Pubcomp(_)));
    let closed = t.was_closed(1);

    let mut t = t.restart(1_000);
    t.connect(2, clean(V5, "sub"));
    t.subscribe(2, "t", QoS::AtMostOnce);
    assert_eq!(t.connect(1, durable(version, "pub", 600)), (true, 0));
    if !completed {
        t.send(1, &Packet::Pubrel(ack(7)));
        assert!(t.recv(1).contains(&Packet::Pubcomp(ack(7))));
    }
    t.send(1, &publish("t", b"second", QoS::ExactlyOnce, 7, false));
    t.send(1, &Packet::Pubrel(ack(7)));
    assert_eq!(payloads(&t.recv(2)), [b"second"], "a new message under a reused id is delivered");

    assert!(!completed, "no PUBCOMP while its record cannot be written: {packets:?}");
    assert!(closed, "the connection ends, so the client sends the PUBREL again when it comes back");
    if version == V5 {
        assert!(packets.contains(&Packet::Disconnect { code: reason::QUOTA_EXCEEDED, properties: reason_string() }));
    }
}

fn reason_string() -> Properties {
    Properties { reason_string: Some("the state store is failing".into()), ..Properties::default() }
}

#[test]
fn while_the_disk_fails_a_pubrel_is_not_completed_and_its_id_is_kept_v5() {
    qos2_publisher_across_a_failing_disk(V5);
}

#[test]
fn while_the_disk_fails_a_pubrel_is_not_completed_and_its_id_is_kept_v3() {
    qos2_publisher_across_a_failing_disk(V3);
}

#[test]
fn while_the_disk_fails_a_durable_subscriber_gets_no_pubrel_it_could_not_keep() {
    // A QoS 2 subscriber with a persistent session, keeping its receiver
    // state (ids PUBRECed and not yet released) as MQTT asks.
    let mut t = Tenant::new();
    t.connect(1, durable(V3, "sub", 0));
    t.subscribe(1, "t", QoS::ExactlyOnce);
    t.connect(2, clean(V5, "pub"));
    t.send(2, &publish("t", b"once", QoS::ExactlyOnce, 1, false));
    let mut held = HashSet::new();
    let mut delivered = Vec::new();
    let mut receive = |t: &mut Tenant, packets: Vec<Packet>| {
        for p in packets {
            match p {
                Packet::Publish(p) => {
                    let id = p.packet_id.unwrap();
                    if held.insert(id) {
                        delivered.push(p.payload.to_vec());
                    }
                    t.send(1, &Packet::Pubrec(ack(id)));
                }
                Packet::Pubrel(a) => {
                    held.remove(&a.packet_id);
                    t.send(1, &Packet::Pubcomp(ack(a.packet_id)));
                }
                _ => {}
            }
        }
    };
    t.disk_fails();
    let packets = t.recv(1);
    receive(&mut t, packets);
    let packets = t.recv(1);
    let released = packets.iter().any(|p| matches!(p, Packet::Pubrel(_)));
    receive(&mut t, packets);

    let mut t = t.restart(1_000);
    assert_eq!(t.connect(1, durable(V3, "sub", 0)), (true, 0));
    for _ in 0..3 {
        let packets = t.recv(1);
        receive(&mut t, packets);
    }
    assert_eq!(delivered, [b"once"], "exactly once");
    assert!(held.is_empty(), "the flow completed");
    assert!(!released, "no PUBREL while its record cannot be written");
}

// ----- 8: refused means not stored --------------------------------------------

#[test]
fn a_publish_whose_acknowledgement_was_withdrawn_leaves_nothing_behind() {
    let mut t = Tenant::new();
    // A durable subscriber, offline; a retained message.
    t.connect(1, durable(V5, "sub", 600));
    t.subscribe(1, "r/#", QoS::AtLeastOnce);
    t.close(1);
    t.connect(2, clean(V5, "pub"));
    t.send(2, &publish("r/a", b"old", QoS::AtLeastOnce, 1, true));
    assert!(t.recv(2).contains(&Packet::Puback(ack(1))));
    // A second subscriber is online, its window full (receive maximum 1):
    // the retained message waits for its PUBACK.
    let mut c = clean(V5, "online");
    c.properties.receive_maximum = Some(1);
    t.connect(3, c);
    t.subscribe(3, "r/#", QoS::AtLeastOnce);
    assert_eq!(payloads(&t.recv(3)), [b"old"]);

    // The disk fills: the commit of the next publish fails, its PUBACK is
    // withdrawn with the connection; the client comes back and sends it
    // again, and is refused.
    t.failing = true;
    t.send(2, &publish("r/a", b"new", QoS::AtLeastOnce, 3, true));
    assert!(t.recv(2).is_empty(), "no acknowledgement of what is not on disk");
    assert!(t.was_closed(2));
    t.connect(2, clean(V5, "pub"));
    let mut again = publish("r/a", b"new", QoS::AtLeastOnce, 3, true);
    if let Packet::Publish(p) = &mut again {
        p.dup = true;
    }
    t.send(2, &again);
    let code = t.recv(2).iter().find_map(|p| if let Packet::Puback(a) = p { Some(a.code) } else { None });
    assert_eq!(code, Some(reason::QUOTA_EXCEEDED));

    // Refused means not stored: not retained, not queued, now or later.
    assert_eq!(retained(&mut t, 10, "r/a"), Some(b"old".to_vec()));
    let id = 1; // the first message to "online"
    t.send(3, &Packet::Puback(ack(id)));
    assert!(payloads(&t.recv(3)).is_empty(), "nothing refused reaches the online subscriber");
    t.disk_returns();
    assert_eq!(retained(&mut t, 11, "r/a"), Some(b"old".to_vec()));
    let mut t = t.restart(1_000);
    assert_eq!(retained(&mut t, 12, "r/a"), Some(b"old".to_vec()));
    assert_eq!(t.connect(1, durable(V5, "sub", 600)), (true, 0));
    assert_eq!(payloads(&t.recv(1)), [b"old"], "only the message that was acknowledged");
}

#[test]
fn a_qos2_publish_whose_acknowledgement_was_withdrawn_is_taken_anew_when_sent_again() {
    let mut t = Tenant::new();
    t.connect(1, durable(V5, "sub", 600));
    t.subscribe(1, "t", QoS::ExactlyOnce);
    t.close(1);
    t.connect(2, durable(V5, "pub", 600));
    t.failing = true;
    let mut message = publish("t", b"m", QoS::ExactlyOnce, 5, false);
    t.send(2, &message);
    assert!(t.recv(2).is_empty(), "no PUBREC for what is not on disk");
    assert!(t.was_closed(2));
    // The publisher's session is on disk: it comes back once the disk
    // does, and sends the message again, as MQTT asks.
    assert_eq!(t.connect(2, durable(V5, "pub", 600)), (false, reason::SERVER_UNAVAILABLE));
    t.disk_returns();
    assert_eq!(t.connect(2, durable(V5, "pub", 600)), (true, 0));
    if let Packet::Publish(p) = &mut message {
        p.dup = true;
    }
    t.send(2, &message);
    t.send(2, &Packet::Pubrel(ack(5)));
    let acks = t.recv(2);
    assert!(acks.contains(&Packet::Pubrec(ack(5))) && acks.contains(&Packet::Pubcomp(ack(5))), "{acks:?}");

    let mut t = t.restart(1_000);
    assert_eq!(t.connect(1, durable(V5, "sub", 600)), (true, 0));
    assert_eq!(payloads(&t.recv(1)), [b"m"], "acknowledged, so delivered, once");
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

/// A will is a publish like any other when it fires: a will kept across a
/// restart is held to the ACL in force then (Mosquitto checks it at send
/// time too), not to the one its CONNECT was checked against.
#[test]
fn a_will_kept_across_a_restart_is_held_to_the_acl_in_force_when_it_fires() {
    let acl = |rules: &str| Config {
        sys_interval_ms: 0,
        acl: Some(
            mqvisor_broker::auth::Acl::parse(&format!("topic read #\nuser eve\ntopic readwrite {rules}\n")).unwrap(),
        ),
        ..Config::default()
    };
    let mut t = Tenant::boot_with(acl("eve/#"), Vec::new(), T0);
    let mut c = durable(V5, "eve-device", 600);
    c.username = Some("eve".into());
    c.will = Some(Will {
        topic: "eve/will".into(),
        payload: b"gone".to_vec(),
        qos: QoS::AtLeastOnce,
        retain: true,
        properties: Properties { will_delay_interval: Some(30), ..Properties::default() },
    });
    t.connect(1, c);
    t.close(1);
    // Restarted with eve's rights narrowed: the overdue will may not publish.
    let mut narrowed = Tenant::boot_with(acl("eve2/#"), t.disk.clone(), t.now + 40_000);
    narrowed.broker.tick(narrowed.now);
    narrowed.commit();
    assert_eq!(retained(&mut narrowed, 2, "eve/will"), None);
    // With the rights unchanged it fires.
    let mut same = Tenant::boot_with(acl("eve/#"), t.disk.clone(), t.now + 40_000);
    same.broker.tick(same.now);
    same.commit();
    assert_eq!(retained(&mut same, 2, "eve/will"), Some(b"gone".to_vec()));
}
