//! Conformance tests of the broker core, driven on simulated time with
//! hand-encoded packets (the codec is tested on its own, with golden bytes).

use std::sync::Arc;

use mqvisor_broker::broker::{Broker, Config, ConnId, Transmit, reason};
use mqvisor_broker::packet::{
    self, Ack, Connect, Packet, Payload, Publish, QoS, Subscribe, SubscriptionOptions, Unsubscribe, Version, Will,
};
use mqvisor_broker::properties::Properties;

struct Net {
    broker: Broker,
    now: u64,
    /// Packets received after the one a helper was waiting for.
    stash: std::collections::HashMap<ConnId, Vec<Packet>>,
    /// Bytes the broker transmitted, per connection, not yet decoded.
    wire: std::collections::HashMap<ConnId, Vec<u8>>,
    /// Connections the broker closed, not yet reported by `closes`.
    closed: Vec<ConnId>,
}

impl Net {
    fn new() -> Net {
        Net::with(Config { sys_interval_ms: 0, ..Config::default() })
    }

    fn with(config: Config) -> Net {
        config.validate().expect("a valid test configuration");
        Net {
            broker: Broker::new(config),
            now: 1_000,
            stash: Default::default(),
            wire: Default::default(),
            closed: Vec::new(),
        }
    }

    fn send(&mut self, conn: ConnId, version: Version, packet: &Packet) {
        let mut bytes = Vec::new();
        packet::encode(packet, version, &mut bytes);
        self.broker.receive(conn, &bytes, self.now);
    }

    fn raw(&mut self, conn: ConnId, bytes: &[u8]) {
        self.broker.receive(conn, bytes, self.now);
    }

    /// Takes everything the broker has to transmit, as a runner with room
    /// for all of it would.
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

    /// Everything the broker sent to `conn` since the last call.
    fn recv(&mut self, conn: ConnId, version: Version) -> Vec<Packet> {
        self.transmit();
        let bytes = self.wire.remove(&conn).unwrap_or_default();
        let mut packets = self.stash.remove(&conn).unwrap_or_default();
        let mut at = 0;
        while at < bytes.len() {
            let frame = packet::frame(&bytes[at..], usize::MAX).unwrap().expect("whole packets only");
            packets.push(packet::decode_from_server(frame, &bytes[at..], version).unwrap());
            at += frame.len;
        }
        packets
    }

    fn closes(&mut self) -> Vec<ConnId> {
        self.transmit();
        std::mem::take(&mut self.closed)
    }

    fn advance(&mut self, ms: u64) {
        self.now += ms;
        self.broker.tick(self.now);
    }

    fn connect_with(&mut self, conn: ConnId, connect: Connect) -> Packet {
        let version = connect.version;
        self.broker.open(conn, self.now);
        self.send(conn, version, &Packet::Connect(Box::new(connect)));
        self.first(conn, version)
    }

    /// The first packet now, the rest kept for the next `recv`.
    fn first(&mut self, conn: ConnId, version: Version) -> Packet {
        let mut packets = self.recv(conn, version);
        assert!(!packets.is_empty(), "no packet for {conn}");
        let first = packets.remove(0);
        self.stash.insert(conn, packets);
        first
    }

    fn connect(&mut self, conn: ConnId, version: Version, client_id: &str, clean: bool) -> Packet {
        self.connect_with(conn, connect(version, client_id, clean))
    }

    fn subscribe(&mut self, conn: ConnId, version: Version, filter: &str, qos: QoS) -> Vec<u8> {
        let options = SubscriptionOptions { qos, no_local: false, retain_as_published: false, retain_handling: 0 };
        self.subscribe_with(conn, version, filter, options, Properties::default())
    }

    fn subscribe_with(
        &mut self,
        conn: ConnId,
        version: Version,
        filter: &str,
        options: SubscriptionOptions,
        properties: Properties,
    ) -> Vec<u8> {
        let s = Subscribe { packet_id: 1, properties, filters: vec![(filter.into(), options)] };
        self.send(conn, version, &Packet::Subscribe(s));
        match Some(self.first(conn, version)) {
            Some(Packet::Suback { codes, .. }) => codes,
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    fn publish(&mut self, conn: ConnId, version: Version, p: Publish) {
        self.send(conn, version, &Packet::Publish(p));
    }
}

fn connect(version: Version, client_id: &str, clean: bool) -> Connect {
    Connect {
        version,
        clean_start: clean,
        keep_alive: 0,
        properties: Properties::default(),
        client_id: client_id.into(),
        will: None,
        username: None,
        password: None,
    }
}

fn publish(topic: &str, payload: &[u8], qos: QoS, packet_id: Option<u16>) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: Arc::from(topic),
        packet_id,
        properties: Default::default(),
        payload: Payload::from(payload),
    }
}

fn ack(packet_id: u16) -> Ack {
    Ack { packet_id, code: 0, properties: Properties::default() }
}

/// DISCONNECT reason codes among `packets`.
fn codes(packets: &[Packet]) -> Vec<u8> {
    packets.iter().filter_map(|p| if let Packet::Disconnect { code, .. } = p { Some(*code) } else { None }).collect()
}

/// PUBACK reason codes among `packets`.
fn puback_codes(packets: &[Packet]) -> Vec<u8> {
    packets.iter().filter_map(|p| if let Packet::Puback(a) = p { Some(a.code) } else { None }).collect()
}

fn disconnect(code: u8) -> Vec<u8> {
    vec![code]
}

fn connack_code(p: &Packet) -> (bool, u8) {
    match p {
        Packet::Connack(c) => (c.session_present, c.code),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

fn publishes(packets: &[Packet]) -> Vec<Publish> {
    packets.iter().filter_map(|p| if let Packet::Publish(p) = p { Some(p.clone()) } else { None }).collect()
}

const V3: Version = Version::V3_1_1;
const V5: Version = Version::V5;

#[test]
fn connack_for_every_protocol_version() {
    let mut net = Net::new();
    for (conn, version) in [(1, Version::V3_1), (2, Version::V3_1_1), (3, Version::V5)] {
        assert_eq!(connack_code(&net.connect(conn, version, &format!("c{conn}"), true)), (false, 0));
    }
    // v5 CONNACK announces the broker's limits.
    let mut net = Net::new();
    let Packet::Connack(c) = net.connect(1, V5, "a", true) else { panic!() };
    assert_eq!(c.properties.receive_maximum, Some(100));
    assert_eq!(c.properties.maximum_packet_size, Some(1 << 20));
}

#[test]
fn anything_before_connect_closes_the_connection() {
    let mut net = Net::new();
    net.broker.open(1, net.now);
    net.send(1, V3, &Packet::Pingreq);
    assert_eq!(net.closes(), vec![1]);
    assert!(net.recv(1, V3).is_empty());
}

#[test]
fn a_second_connect_is_a_protocol_error() {
    let mut net = Net::new();
    net.connect(1, V5, "a", true);
    net.send(1, V5, &Packet::Connect(Box::new(connect(V5, "a", true))));
    assert_eq!(codes(&net.recv(1, V5)), disconnect(reason::PROTOCOL_ERROR));
    assert_eq!(net.closes(), vec![1]);
}

#[test]
fn unsupported_protocol_level_gets_return_code_1() {
    let mut net = Net::new();
    net.broker.open(1, net.now);
    net.raw(1, &[0x10, 10, 0, 4, b'M', b'Q', b'T', b'T', 9, 0x02, 0, 10]);
    assert_eq!(connack_code(&net.recv(1, V3)[0]), (false, 1));
    assert_eq!(net.closes(), vec![1]);
}

#[test]
fn auth_methods_are_refused_cleanly() {
    let mut net = Net::new();
    let mut c = connect(V5, "a", true);
    c.properties.authentication_method = Some("SCRAM-SHA-1".into());
    assert_eq!(connack_code(&net.connect_with(1, c)), (false, reason::BAD_AUTHENTICATION_METHOD));
    assert_eq!(net.closes(), vec![1]);
}

#[test]
fn empty_client_id_rules() {
    let mut net = Net::new();
    // 3.1.1: allowed only with a clean session.
    assert_eq!(connack_code(&net.connect(1, V3, "", false)), (false, 2));
    assert_eq!(connack_code(&net.connect(2, V3, "", true)), (false, 0));
    // v5: the server assigns one and says which.
    let Packet::Connack(c) = net.connect(3, V5, "", true) else { panic!() };
    assert_eq!(c.code, 0);
    assert!(c.properties.assigned_client_identifier.is_some_and(|id| !id.is_empty()));
}

#[test]
fn qos0_fan_out_with_wildcards_and_the_dollar_rule() {
    let mut net = Net::new();
    net.connect(1, V3, "pub", true);
    for (conn, filter) in [(2, "a/+/c"), (3, "a/#"), (4, "#"), (5, "x/y")] {
        net.connect(conn, V3, &format!("s{conn}"), true);
        assert_eq!(net.subscribe(conn, V3, filter, QoS::AtMostOnce), vec![0]);
    }
    net.publish(1, V3, publish("a/b/c", b"hi", QoS::AtMostOnce, None));
    for conn in [2, 3, 4] {
        let got = publishes(&net.recv(conn, V3));
        assert_eq!(got.len(), 1, "conn {conn}");
        assert_eq!((&*got[0].topic, &*got[0].payload), ("a/b/c", &b"hi"[..]));
    }
    assert!(net.recv(5, V3).is_empty());
    // "#" does not see "$" topics.
    net.publish(1, V3, publish("$internal/x", b"no", QoS::AtMostOnce, None));
    assert!(net.recv(4, V3).is_empty());
}

#[test]
fn qos1_both_ways() {
    let mut net = Net::new();
    net.connect(1, V3, "pub", true);
    net.connect(2, V3, "sub", true);
    assert_eq!(net.subscribe(2, V3, "t", QoS::AtLeastOnce), vec![1]);
    net.publish(1, V3, publish("t", b"m", QoS::AtLeastOnce, Some(10)));
    assert_eq!(net.recv(1, V3), vec![Packet::Puback(ack(10))]);
    let got = publishes(&net.recv(2, V3));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].qos, QoS::AtLeastOnce);
    let id = got[0].packet_id.unwrap();
    net.send(2, V3, &Packet::Puback(ack(id)));
    assert!(net.recv(2, V3).is_empty());
}

#[test]
fn qos2_both_ways_and_a_duplicate_is_delivered_once() {
    let mut net = Net::new();
    net.connect(1, V5, "pub", true);
    net.connect(2, V5, "sub", true);
    net.subscribe(2, V5, "t", QoS::ExactlyOnce);
    let p = publish("t", b"once", QoS::ExactlyOnce, Some(5));
    net.publish(1, V5, p.clone());
    assert!(matches!(net.recv(1, V5)[..], [Packet::Pubrec(Ack { packet_id: 5, code: 0, .. })]));
    // The publisher retransmits before PUBREL: acknowledged, not delivered twice.
    net.publish(1, V5, Publish { dup: true, ..p });
    assert!(matches!(net.recv(1, V5)[..], [Packet::Pubrec(Ack { packet_id: 5, .. })]));
    net.send(1, V5, &Packet::Pubrel(ack(5)));
    assert!(matches!(net.recv(1, V5)[..], [Packet::Pubcomp(Ack { packet_id: 5, code: 0, .. })]));

    let got = publishes(&net.recv(2, V5));
    assert_eq!(got.len(), 1);
    let id = got[0].packet_id.unwrap();
    net.send(2, V5, &Packet::Pubrec(ack(id)));
    assert!(matches!(net.recv(2, V5)[..], [Packet::Pubrel(Ack { code: 0, .. })]));
    net.send(2, V5, &Packet::Pubcomp(ack(id)));
    assert!(net.recv(2, V5).is_empty());
}

#[test]
fn retained_messages_set_replace_delete() {
    let mut net = Net::new();
    net.connect(1, V3, "pub", true);
    let retained = |payload: &[u8]| Publish { retain: true, ..publish("r/t", payload, QoS::AtMostOnce, None) };
    net.publish(1, V3, retained(b"one"));
    net.publish(1, V3, retained(b"two"));
    net.connect(2, V3, "late", true);
    net.subscribe(2, V3, "r/#", QoS::AtMostOnce);
    let got = publishes(&net.recv(2, V3));
    assert_eq!(got.len(), 1);
    assert_eq!((&*got[0].payload, got[0].retain), (&b"two"[..], true));
    // Live delivery carries retain = 0 for a normal subscription.
    net.publish(1, V3, retained(b"three"));
    assert!(!publishes(&net.recv(2, V3))[0].retain);
    // An empty retained payload deletes it.
    net.publish(1, V3, retained(b""));
    net.recv(2, V3);
    net.connect(3, V3, "later", true);
    net.subscribe(3, V3, "r/#", QoS::AtMostOnce);
    assert!(publishes(&net.recv(3, V3)).is_empty());
}

#[test]
fn v5_subscription_options_retain_handling_no_local_and_ids() {
    let mut net = Net::new();
    net.connect(1, V5, "me", true);
    net.publish(1, V5, Publish { retain: true, ..publish("t", b"kept", QoS::AtMostOnce, None) });
    let options =
        SubscriptionOptions { qos: QoS::AtMostOnce, no_local: true, retain_as_published: true, retain_handling: 2 };
    let props = Properties { subscription_identifiers: vec![42], ..Properties::default() };
    net.subscribe_with(1, V5, "t", options, props);
    // Retain handling 2: no retained message on subscribe.
    assert!(publishes(&net.recv(1, V5)).is_empty());
    // No local: our own message does not come back.
    net.publish(1, V5, publish("t", b"mine", QoS::AtMostOnce, None));
    assert!(publishes(&net.recv(1, V5)).is_empty());
    // Another client's retained publish arrives with retain as published and the id.
    net.connect(2, V5, "other", true);
    net.publish(2, V5, Publish { retain: true, ..publish("t", b"theirs", QoS::AtMostOnce, None) });
    let got = publishes(&net.recv(1, V5));
    assert_eq!(got.len(), 1);
    assert!(got[0].retain);
    assert_eq!(got[0].properties.subscription_identifiers, vec![42]);
}

#[test]
fn message_properties_pass_through() {
    let mut net = Net::new();
    net.connect(1, V5, "pub", true);
    net.connect(2, V5, "sub", true);
    net.subscribe(2, V5, "req", QoS::AtMostOnce);
    let mut p = publish("req", b"{}", QoS::AtMostOnce, None);
    p.properties.make_mut().payload_format_indicator = Some(1);
    p.properties.make_mut().content_type = Some("application/json".into());
    p.properties.make_mut().response_topic = Some("resp/1".into());
    p.properties.make_mut().correlation_data = Some(vec![9, 9]);
    p.properties.make_mut().user_properties = vec![("k".into(), "v".into())];
    net.publish(1, V5, p.clone());
    let got = publishes(&net.recv(2, V5));
    let q = &got[0].properties;
    assert_eq!(q.payload_format_indicator, Some(1));
    assert_eq!(q.content_type.as_deref(), Some("application/json"));
    assert_eq!(q.response_topic.as_deref(), Some("resp/1"));
    assert_eq!(q.correlation_data, Some(vec![9, 9]));
    assert_eq!(q.user_properties, p.properties.user_properties);
}

#[test]
fn persistent_session_keeps_subscriptions_and_queues_qos1() {
    let mut net = Net::new();
    net.connect(1, V3, "durable", false);
    net.subscribe(1, V3, "t", QoS::AtLeastOnce);
    net.broker.closed(1, net.now);
    net.connect(2, V3, "pub", true);
    net.publish(2, V3, publish("t", b"while away", QoS::AtLeastOnce, Some(1)));
    net.publish(2, V3, publish("t", b"qos0 dropped", QoS::AtMostOnce, None));
    // Reconnect without clean session: session present, message delivered.
    assert_eq!(connack_code(&net.connect(3, V3, "durable", false)), (true, 0));
    let got = publishes(&net.recv(3, V3));
    assert_eq!(got.iter().map(|p| &*p.payload).collect::<Vec<_>>(), vec![&b"while away"[..]]);
    // A clean session starts empty.
    net.broker.closed(3, net.now);
    assert_eq!(connack_code(&net.connect(4, V3, "durable", true)), (false, 0));
    net.publish(2, V3, publish("t", b"gone", QoS::AtLeastOnce, Some(2)));
    assert!(publishes(&net.recv(4, V3)).is_empty());
}

#[test]
fn unacknowledged_messages_are_redelivered_with_dup_on_reconnect() {
    let mut net = Net::new();
    net.connect(1, V3, "durable", false);
    net.subscribe(1, V3, "t", QoS::AtLeastOnce);
    net.connect(2, V3, "pub", true);
    net.publish(2, V3, publish("t", b"m", QoS::AtLeastOnce, Some(1)));
    let first = publishes(&net.recv(1, V3));
    assert!(!first[0].dup);
    net.broker.closed(1, net.now); // lost before PUBACK
    net.connect(3, V3, "durable", false);
    let again = publishes(&net.recv(3, V3));
    assert_eq!(again.len(), 1);
    assert!(again[0].dup);
    assert_eq!(again[0].packet_id, first[0].packet_id);
}

#[test]
fn v5_session_expiry() {
    let mut net = Net::new();
    let mut c = connect(V5, "expiring", true);
    c.properties.session_expiry_interval = Some(10);
    net.connect_with(1, c.clone());
    net.subscribe(1, V5, "t", QoS::AtLeastOnce);
    net.broker.closed(1, net.now);
    net.advance(5_000);
    let resumed = Connect { clean_start: false, ..c.clone() };
    assert_eq!(connack_code(&net.connect_with(2, resumed.clone())), (true, 0));
    net.broker.closed(2, net.now);
    net.advance(11_000);
    assert_eq!(connack_code(&net.connect_with(3, resumed)), (false, 0));
}

#[test]
fn will_on_abrupt_close_but_not_after_disconnect() {
    for graceful in [false, true] {
        let mut net = Net::new();
        net.connect(1, V3, "watcher", true);
        net.subscribe(1, V3, "wills/#", QoS::AtMostOnce);
        let mut c = connect(V3, "mortal", true);
        c.will = Some(Will {
            topic: "wills/mortal".into(),
            payload: b"gone".to_vec(),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: Properties::default(),
        });
        net.connect_with(2, c);
        if graceful {
            net.send(2, V3, &Packet::Disconnect { code: 0, properties: Properties::default() });
        }
        net.broker.closed(2, net.now);
        let got = publishes(&net.recv(1, V3));
        assert_eq!(got.len(), usize::from(!graceful), "graceful={graceful}");
    }
}

#[test]
fn a_client_that_ends_its_input_is_answered_then_closed_and_its_will_fires() {
    let mut net = Net::new();
    net.connect(1, V3, "watcher", true);
    net.subscribe(1, V3, "wills/#", QoS::AtMostOnce);
    // CONNECT with a will and a QoS 1 PUBLISH arrive together, then FIN,
    // before the runner has taken any output.
    let mut c = connect(V3, "half", true);
    c.will = Some(Will {
        topic: "wills/half".into(),
        payload: b"gone".to_vec(),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: Properties::default(),
    });
    net.broker.open(2, net.now);
    net.send(2, V3, &Packet::Connect(Box::new(c)));
    net.publish(2, V3, publish("t", b"m", QoS::AtLeastOnce, Some(7)));
    net.raw(2, &[0x30, 9, 0]); // the start of a packet the FIN cuts short
    assert!(net.broker.input_ended(2, net.now));
    let answers = net.recv(2, V3);
    assert!(matches!(answers.first(), Some(Packet::Connack(_))), "{answers:?}");
    assert!(matches!(answers.get(1), Some(Packet::Puback(Ack { packet_id: 7, .. }))), "{answers:?}");
    assert_eq!(answers.len(), 2, "{answers:?}");
    assert_eq!(net.closes(), [2], "closed once its answers are out");
    let got = publishes(&net.recv(1, V3));
    assert_eq!(got.iter().map(|p| &*p.payload).collect::<Vec<_>>(), [&b"gone"[..]], "its will fired");
    // Bytes after the end, and a second end, change nothing.
    net.raw(2, &[0xc0, 0]);
    assert!(!net.broker.input_ended(2, net.now));
    assert!(net.recv(2, V3).is_empty() && net.closes().is_empty());
    // After DISCONNECT the end is no loss: no will.
    let mut c = connect(V3, "polite", true);
    c.will = Some(Will {
        topic: "wills/polite".into(),
        payload: b"never".to_vec(),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: Properties::default(),
    });
    net.connect_with(3, c);
    net.send(3, V3, &Packet::Disconnect { code: 0, properties: Properties::default() });
    assert!(net.broker.input_ended(3, net.now));
    assert_eq!(net.closes(), [3]);
    assert!(publishes(&net.recv(1, V3)).is_empty(), "a will after DISCONNECT");
}

#[test]
fn v5_will_delay_and_cancel_by_reconnect() {
    let mut net = Net::new();
    net.connect(1, V5, "watcher", true);
    net.subscribe(1, V5, "w", QoS::AtMostOnce);
    let mut c = connect(V5, "mortal", true);
    c.properties.session_expiry_interval = Some(60);
    c.will = Some(Will {
        topic: "w".into(),
        payload: b"late".to_vec(),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: Properties { will_delay_interval: Some(5), ..Properties::default() },
    });
    net.connect_with(2, c.clone());
    net.broker.closed(2, net.now);
    net.advance(2_000);
    assert!(publishes(&net.recv(1, V5)).is_empty(), "will sent before its delay");
    net.advance(4_000);
    assert_eq!(publishes(&net.recv(1, V5)).len(), 1, "will not sent after its delay");

    // Reconnecting within the delay cancels the will.
    net.connect_with(3, Connect { clean_start: false, ..c.clone() });
    net.broker.closed(3, net.now);
    net.advance(1_000);
    net.connect_with(4, Connect { clean_start: false, ..c });
    net.advance(10_000);
    assert!(publishes(&net.recv(1, V5)).is_empty());
}

#[test]
fn keep_alive_is_enforced_at_one_and_a_half_times() {
    let mut net = Net::new();
    let mut c = connect(V5, "sleepy", true);
    c.keep_alive = 10;
    net.connect_with(1, c);
    net.advance(14_000);
    assert!(net.closes().is_empty());
    net.send(1, V5, &Packet::Pingreq);
    assert_eq!(net.recv(1, V5), vec![Packet::Pingresp]);
    net.advance(14_999);
    assert!(net.closes().is_empty());
    net.advance(2);
    assert_eq!(codes(&net.recv(1, V5)), disconnect(reason::KEEP_ALIVE_TIMEOUT));
    assert_eq!(net.closes(), vec![1]);
    assert_eq!(net.broker.next_deadline(), None);
}

#[test]
fn session_take_over_closes_the_old_connection() {
    let mut net = Net::new();
    net.connect(1, V5, "same", true);
    net.connect(2, V5, "same", true);
    assert_eq!(codes(&net.recv(1, V5)), disconnect(reason::SESSION_TAKEN_OVER));
    assert_eq!(net.closes(), vec![1]);
    // The old connection going away later does not disturb the new one.
    net.broker.closed(1, net.now);
    net.subscribe(2, V5, "t", QoS::AtMostOnce);
}

#[test]
fn oversize_packets_are_refused_before_buffering() {
    let mut net = Net::with(Config { max_packet_size: 1024, sys_interval_ms: 0, ..Config::default() });
    net.connect(1, V5, "big", true);
    // Only the fixed header of a 1 MiB PUBLISH arrives.
    net.raw(1, &[0x30, 0x80, 0x80, 0x40]);
    assert_eq!(codes(&net.recv(1, V5)), disconnect(reason::PACKET_TOO_LARGE));
    assert_eq!(net.closes(), vec![1]);
}

#[test]
fn wildcards_in_a_publish_topic_end_the_connection() {
    let mut net = Net::new();
    net.connect(1, V5, "bad", true);
    net.publish(1, V5, publish("a/+", b"x", QoS::AtMostOnce, None));
    assert_eq!(codes(&net.recv(1, V5)), disconnect(reason::TOPIC_NAME_INVALID));
    assert_eq!(net.closes(), vec![1]);
}

#[test]
fn invalid_filters_get_failure_codes_per_version() {
    let mut net = Net::new();
    net.connect(1, V3, "a", true);
    assert_eq!(net.subscribe(1, V3, "a/#/b", QoS::AtMostOnce), vec![0x80]);
    net.connect(2, V5, "b", true);
    assert_eq!(net.subscribe(2, V5, "a+", QoS::AtMostOnce), vec![reason::TOPIC_FILTER_INVALID]);
}

#[test]
fn unsubscribe_reports_what_existed() {
    let mut net = Net::new();
    net.connect(1, V5, "u", true);
    net.subscribe(1, V5, "t", QoS::AtMostOnce);
    let u = Unsubscribe { packet_id: 3, properties: Properties::default(), filters: vec!["t".into(), "nope".into()] };
    net.send(1, V5, &Packet::Unsubscribe(u));
    let got = net.recv(1, V5);
    assert!(
        matches!(&got[..], [Packet::Unsuback { packet_id: 3, codes, .. }] if codes == &vec![0, reason::NO_SUBSCRIPTION_EXISTED])
    );
}

#[test]
fn shared_subscriptions_share_the_load() {
    let mut net = Net::new();
    net.connect(1, V5, "pub", true);
    for conn in [2, 3] {
        net.connect(conn, V5, &format!("worker{conn}"), true);
        net.subscribe(conn, V5, "$share/g/jobs", QoS::AtMostOnce);
    }
    for i in 0..10u8 {
        net.publish(1, V5, publish("jobs", &[i], QoS::AtMostOnce, None));
    }
    let a = publishes(&net.recv(2, V5)).len();
    let b = publishes(&net.recv(3, V5)).len();
    assert_eq!(a + b, 10);
    assert_eq!((a, b), (5, 5));
}

#[test]
fn unsubscribing_a_shared_subscription_stops_its_messages() {
    let mut net = Net::new();
    net.connect(1, V5, "pub", true);
    net.connect(2, V5, "worker", true);
    net.subscribe(2, V5, "$share/g/jobs", QoS::AtMostOnce);
    let u = Unsubscribe { packet_id: 4, properties: Properties::default(), filters: vec!["$share/g/jobs".into()] };
    net.send(2, V5, &Packet::Unsubscribe(u));
    let got = net.recv(2, V5);
    assert!(matches!(&got[..], [Packet::Unsuback { codes, .. }] if codes == &vec![reason::SUCCESS]), "{got:?}");
    net.publish(1, V5, publish("jobs", b"after", QoS::AtLeastOnce, Some(1)));
    assert!(publishes(&net.recv(2, V5)).is_empty());
    assert_eq!(puback_codes(&net.recv(1, V5)), vec![reason::NO_MATCHING_SUBSCRIBERS]);
}

#[test]
fn a_removed_session_takes_its_shared_subscriptions_with_it() {
    let mut net = Net::new();
    net.connect(1, V5, "pub", true);
    net.connect(2, V5, "worker", true);
    net.subscribe(2, V5, "$share/g/jobs", QoS::AtMostOnce);
    net.broker.closed(2, net.now); // expiry 0: the session ends here
    net.publish(1, V5, publish("jobs", b"nobody", QoS::AtLeastOnce, Some(1)));
    assert_eq!(puback_codes(&net.recv(1, V5)), vec![reason::NO_MATCHING_SUBSCRIBERS]);
}

#[test]
fn a_session_ended_by_a_malformed_packet_expires_from_that_moment() {
    let mut net = Net::new();
    net.advance(100_000);
    let mut c = connect(V5, "garbled", true);
    c.properties.session_expiry_interval = Some(10);
    net.connect_with(1, c.clone());
    net.raw(1, &[0x30, 0x02, 0xff, 0xff]); // a PUBLISH whose topic runs past the packet
    assert_eq!(codes(&net.recv(1, V5)), disconnect(reason::MALFORMED_PACKET));
    net.advance(5_000);
    let resumed = Connect { clean_start: false, ..c };
    assert_eq!(connack_code(&net.connect_with(2, resumed)), (true, 0), "the session must live 10 s from the error");
}

#[test]
fn inbound_topic_aliases() {
    let mut net = Net::new();
    net.connect(1, V5, "pub", true);
    net.connect(2, V5, "sub", true);
    net.subscribe(2, V5, "long/topic/name", QoS::AtMostOnce);
    let mut first = publish("long/topic/name", b"1", QoS::AtMostOnce, None);
    first.properties.make_mut().topic_alias = Some(3);
    net.publish(1, V5, first);
    let mut second = publish("", b"2", QoS::AtMostOnce, None);
    second.properties.make_mut().topic_alias = Some(3);
    net.publish(1, V5, second);
    let got = publishes(&net.recv(2, V5));
    assert_eq!(
        got.iter().map(|p| (&*p.topic, &*p.payload)).collect::<Vec<_>>(),
        vec![("long/topic/name", &b"1"[..]), ("long/topic/name", &b"2"[..])]
    );
    // An alias never set is a protocol error.
    let mut unknown = publish("", b"3", QoS::AtMostOnce, None);
    unknown.properties.make_mut().topic_alias = Some(9);
    net.publish(1, V5, unknown);
    assert_eq!(codes(&net.recv(1, V5)), disconnect(reason::PROTOCOL_ERROR));
}

/// An offline session `away` subscribed to `t` at QoS 1, and a publisher
/// connected as connection 2.
fn away_on_t_and_a_publisher(net: &mut Net) {
    net.connect(1, V3, "away", false);
    net.subscribe(1, V3, "t", QoS::AtLeastOnce);
    net.broker.closed(1, net.now);
    net.connect(2, V3, "pub", true);
}

#[test]
fn offline_queue_is_bounded_and_drops_are_counted() {
    let mut net = Net::with(Config { max_queued_messages: 3, sys_interval_ms: 0, ..Config::default() });
    away_on_t_and_a_publisher(&mut net);
    for i in 0..10u16 {
        net.publish(2, V3, publish("t", b"m", QoS::AtLeastOnce, Some(i + 1)));
    }
    assert_eq!(net.broker.stats().messages_dropped, 7);
    net.connect(3, V3, "away", false);
    assert_eq!(publishes(&net.recv(3, V3)).len(), 3);
}

#[test]
fn offline_queue_is_bounded_in_bytes_and_a_lone_big_message_still_waits() {
    let config = Config { max_queued_bytes: 250, sys_interval_ms: 0, ..Config::default() };
    let mut net = Net::with(config);
    away_on_t_and_a_publisher(&mut net);
    // Topic and payload: 101 bytes each, so two fit in 250 and the rest drop.
    for i in 0..5u16 {
        net.publish(2, V3, publish("t", &[b'a'; 100], QoS::AtLeastOnce, Some(i + 1)));
    }
    assert_eq!(net.broker.stats().messages_dropped, 3);
    net.connect(3, V3, "away", false);
    let got = publishes(&net.recv(3, V3));
    assert_eq!(got.len(), 2);
    for p in &got {
        net.send(3, V3, &Packet::Puback(ack(p.packet_id.unwrap())));
    }
    net.broker.closed(3, net.now);
    // Delivered messages leave the count: an empty queue takes a message
    // bigger than the bound, and nothing after it.
    net.publish(2, V3, publish("t", &[b'b'; 1000], QoS::AtLeastOnce, Some(10)));
    net.publish(2, V3, publish("t", b"c", QoS::AtLeastOnce, Some(11)));
    assert_eq!(net.broker.stats().messages_dropped, 4);
    net.connect(4, V3, "away", false);
    let got = publishes(&net.recv(4, V3));
    assert_eq!(got.iter().map(|p| p.payload.len()).collect::<Vec<_>>(), [1000]);
}

#[test]
fn a_byte_bound_of_zero_is_no_byte_bound() {
    let mut net = Net::with(Config { max_queued_bytes: 0, sys_interval_ms: 0, ..Config::default() });
    away_on_t_and_a_publisher(&mut net);
    for i in 0..10u16 {
        net.publish(2, V3, publish("t", &[b'a'; 100], QoS::AtLeastOnce, Some(i + 1)));
    }
    assert_eq!(net.broker.stats().messages_dropped, 0);
    net.connect(3, V3, "away", false);
    assert_eq!(publishes(&net.recv(3, V3)).len(), 10);
}

#[test]
fn inflight_window_limits_unacknowledged_messages() {
    let mut net = Net::with(Config { max_inflight: 2, sys_interval_ms: 0, ..Config::default() });
    net.connect(1, V3, "slow", true);
    net.subscribe(1, V3, "t", QoS::AtLeastOnce);
    net.connect(2, V3, "pub", true);
    for i in 0..5u16 {
        net.publish(2, V3, publish("t", b"m", QoS::AtLeastOnce, Some(i + 1)));
    }
    let first = publishes(&net.recv(1, V3));
    assert_eq!(first.len(), 2);
    net.send(1, V3, &Packet::Puback(ack(first[0].packet_id.unwrap())));
    assert_eq!(publishes(&net.recv(1, V3)).len(), 1);
}

#[test]
fn sys_statistics_are_published() {
    let mut net = Net::with(Config { sys_interval_ms: 1000, ..Config::default() });
    net.connect(1, V3, "ops", true);
    net.subscribe(1, V3, "$SYS/broker/clients/connected", QoS::AtMostOnce);
    net.advance(1000);
    let got = publishes(&net.recv(1, V3));
    assert_eq!(got.last().map(|p| &*p.payload), Some(&b"1"[..]));
}

#[test]
fn random_byte_streams_never_panic_and_stay_bounded() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut net = Net::with(Config { max_packet_size: 4096, ..Config::default() });
    // Valid prefixes make random tails reach deeper states.
    let mut connect_bytes = Vec::new();
    packet::encode(&Packet::Connect(Box::new(connect(V5, "fuzz", true))), V5, &mut connect_bytes);
    for conn in 0..300u64 {
        net.broker.open(conn, net.now);
        if conn % 2 == 0 {
            net.raw(conn, &connect_bytes);
        }
        for _ in 0..20 {
            let len = (next() % 64) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| next().to_le_bytes()[0]).collect();
            net.raw(conn, &bytes);
            net.transmit();
        }
        net.advance(next() % 2000);
        net.closes();
        net.wire.clear();
    }
}

const PASSWORDS: &str = "alice:$7$101$UdmVFG4Cfxk2O1VO$rSNLgEwwuKSNj861LvltavG18Kq8wv1IQbj67BhI+jBe6eA9T8etGURdw69SZ2LTo1aWIS2XT9CsGfKLIiqCdg==\n";

fn with_auth(allow_anonymous: bool, acl: Option<&str>) -> Net {
    use mqvisor_broker::auth::{Acl, PasswordFile};
    Net::with(Config {
        passwords: Some(PasswordFile::parse(PASSWORDS).unwrap()),
        allow_anonymous,
        acl: acl.map(|a| Acl::parse(a).unwrap()),
        sys_interval_ms: 0,
        ..Config::default()
    })
}

fn login(version: Version, id: &str, user: Option<&str>, password: &[u8]) -> Connect {
    Connect { username: user.map(String::from), password: Some(password.to_vec()), ..connect(version, id, true) }
}

#[test]
fn user_names_and_passwords_are_checked() {
    let mut net = with_auth(false, None);
    assert_eq!(connack_code(&net.connect_with(1, login(V3, "a", Some("alice"), b"s3cret"))), (false, 0));
    assert_eq!(connack_code(&net.connect_with(2, login(V3, "b", Some("alice"), b"wrong"))), (false, 4));
    assert_eq!(
        connack_code(&net.connect_with(3, login(V5, "c", Some("mallory"), b"s3cret"))),
        (false, reason::BAD_USER_NAME_OR_PASSWORD)
    );
    // Anonymous refused unless allowed.
    assert_eq!(connack_code(&net.connect(4, V3, "d", true)), (false, 5));
    assert_eq!(connack_code(&net.connect(5, V5, "e", true)), (false, reason::NOT_AUTHORIZED));
    let mut open = with_auth(true, None);
    assert_eq!(connack_code(&open.connect(1, V3, "anon", true)), (false, 0));
}

#[test]
fn acl_denied_subscriptions_get_0x80_or_0x87_and_publishes_are_dropped() {
    let acl = "user alice\ntopic readwrite alice/#\ntopic read shared/#\n";
    let mut net = with_auth(false, Some(acl));
    net.connect_with(1, login(V3, "a3", Some("alice"), b"s3cret"));
    assert_eq!(net.subscribe(1, V3, "alice/+", QoS::AtMostOnce), vec![0]);
    assert_eq!(net.subscribe(1, V3, "bob/#", QoS::AtMostOnce), vec![0x80]);
    net.connect_with(2, login(V5, "a5", Some("alice"), b"s3cret"));
    assert_eq!(net.subscribe(2, V5, "#", QoS::AtLeastOnce), vec![reason::NOT_AUTHORIZED]);
    assert_eq!(net.subscribe(2, V5, "shared/x", QoS::AtLeastOnce), vec![1]);
    // Publishing where only read is granted: QoS 1 gets PUBACK 0x87, nobody receives it.
    net.publish(2, V5, publish("shared/x", b"no", QoS::AtLeastOnce, Some(4)));
    assert!(matches!(net.recv(2, V5)[..], [Packet::Puback(Ack { packet_id: 4, code: reason::NOT_AUTHORIZED, .. })]));
    net.publish(1, V3, publish("alice/x", b"yes", QoS::AtMostOnce, None));
    assert_eq!(publishes(&net.recv(1, V3)).len(), 1);
}

#[test]
fn reason_strings_unless_the_client_declines_them() {
    let mut net = Net::new();
    net.connect(1, V5, "chatty", true);
    net.send(1, V5, &Packet::Connect(Box::new(connect(V5, "chatty", true))));
    let got = net.recv(1, V5);
    assert!(
        matches!(&got[..], [Packet::Disconnect { properties, .. }] if properties.reason_string.as_deref() == Some("second CONNECT"))
    );
    let mut quiet = connect(V5, "quiet", true);
    quiet.properties.request_problem_information = Some(0);
    net.connect_with(2, quiet.clone());
    net.send(2, V5, &Packet::Connect(Box::new(quiet)));
    let got = net.recv(2, V5);
    assert!(matches!(&got[..], [Packet::Disconnect { properties, .. }] if properties.reason_string.is_none()));
}

#[test]
fn response_information_when_requested() {
    let mut net = Net::new();
    let mut c = connect(V5, "asker", true);
    c.properties.request_response_information = Some(1);
    let Packet::Connack(ack) = net.connect_with(1, c) else { panic!() };
    assert_eq!(ack.properties.response_information.as_deref(), Some("response/asker/"));
    let Packet::Connack(ack) = net.connect(2, V5, "other", true) else { panic!() };
    assert_eq!(ack.properties.response_information, None);
}

#[test]
fn outbound_topic_aliases_for_clients_that_accept_them() {
    let mut net = Net::new();
    let mut c = connect(V5, "aliased", true);
    c.properties.topic_alias_maximum = Some(1);
    net.connect_with(1, c);
    net.subscribe(1, V5, "#", QoS::AtMostOnce);
    net.connect(2, V5, "pub", true);
    for topic in ["a/long/topic", "a/long/topic", "other"] {
        net.publish(2, V5, publish(topic, b"x", QoS::AtMostOnce, None));
    }
    let got = publishes(&net.recv(1, V5));
    let seen: Vec<(&str, Option<u16>)> = got.iter().map(|p| (&*p.topic, p.properties.topic_alias)).collect();
    // First use sets alias 1, the second uses it alone, the table is then full.
    assert_eq!(seen, vec![("a/long/topic", Some(1)), ("", Some(1)), ("other", None)]);
}

#[test]
fn max_connections_refuses_with_server_busy() {
    let mut net = Net::with(Config { max_connections: 1, sys_interval_ms: 0, ..Config::default() });
    assert_eq!(connack_code(&net.connect(1, V5, "first", true)), (false, 0));
    assert_eq!(connack_code(&net.connect(2, V5, "second", true)), (false, reason::SERVER_BUSY));
    assert_eq!(connack_code(&net.connect(3, V3, "third", true)), (false, 3));
}

#[test]
fn subscriptions_per_client_are_limited() {
    let mut net = Net::with(Config { max_subscriptions_per_client: 2, sys_interval_ms: 0, ..Config::default() });
    net.connect(1, V5, "greedy", true);
    assert_eq!(net.subscribe(1, V5, "a", QoS::AtMostOnce), vec![0]);
    assert_eq!(net.subscribe(1, V5, "b", QoS::AtMostOnce), vec![0]);
    assert_eq!(net.subscribe(1, V5, "c", QoS::AtMostOnce), vec![reason::QUOTA_EXCEEDED]);
    // Re-subscribing to a held filter is a replacement, not a new one.
    assert_eq!(net.subscribe(1, V5, "a", QoS::AtLeastOnce), vec![1]);
}

#[test]
fn messages_larger_than_the_client_accepts_are_not_sent() {
    let mut net = Net::new();
    let mut c = connect(V5, "small", true);
    c.properties.maximum_packet_size = Some(64);
    net.connect_with(1, c);
    net.subscribe(1, V5, "t", QoS::AtMostOnce);
    net.connect(2, V5, "pub", true);
    net.publish(2, V5, publish("t", &[0u8; 100], QoS::AtMostOnce, None));
    net.publish(2, V5, publish("t", b"fits", QoS::AtMostOnce, None));
    let got = publishes(&net.recv(1, V5));
    assert_eq!(got.iter().map(|p| &*p.payload).collect::<Vec<_>>(), vec![&b"fits"[..]]);
    assert_eq!(net.broker.stats().messages_dropped, 1);
}

#[test]
fn the_clients_receive_maximum_bounds_unacknowledged_messages() {
    let mut net = Net::new();
    let mut c = connect(V5, "careful", true);
    c.properties.receive_maximum = Some(2);
    net.connect_with(1, c);
    net.subscribe(1, V5, "t", QoS::AtLeastOnce);
    net.connect(2, V5, "pub", true);
    for i in 0..5u16 {
        net.publish(2, V5, publish("t", b"m", QoS::AtLeastOnce, Some(i + 1)));
    }
    let first = publishes(&net.recv(1, V5));
    assert_eq!(first.len(), 2);
    for p in &first {
        net.send(1, V5, &Packet::Puback(ack(p.packet_id.unwrap())));
    }
    assert_eq!(publishes(&net.recv(1, V5)).len(), 2);
}

#[test]
fn expired_messages_are_not_delivered_and_the_rest_count_down() {
    let mut net = Net::new();
    let mut c = connect(V5, "away", false);
    c.properties.session_expiry_interval = Some(600);
    net.connect_with(1, c.clone());
    net.subscribe(1, V5, "t", QoS::AtLeastOnce);
    net.broker.closed(1, net.now);
    net.connect(2, V5, "pub", true);
    let mut short = publish("t", b"short", QoS::AtLeastOnce, Some(1));
    short.properties.make_mut().message_expiry_interval = Some(5);
    let mut long = publish("t", b"long", QoS::AtLeastOnce, Some(2));
    long.properties.make_mut().message_expiry_interval = Some(60);
    net.publish(2, V5, short);
    net.publish(2, V5, long);
    net.advance(10_000);
    net.connect_with(3, c);
    let got = publishes(&net.recv(3, V5));
    assert_eq!(got.len(), 1);
    assert_eq!(&*got[0].payload, b"long");
    assert_eq!(got[0].properties.message_expiry_interval, Some(50));
}

#[test]
fn topic_length_and_level_limits() {
    use mqvisor_broker::topic::TopicLimits;
    let limits = TopicLimits { max_len: 16, max_levels: 3 };
    let mut net = Net::with(Config { topic_limits: limits, sys_interval_ms: 0, ..Config::default() });
    net.connect(1, V5, "c", true);
    assert_eq!(net.subscribe(1, V5, "a/b/c/d", QoS::AtMostOnce), vec![reason::TOPIC_FILTER_INVALID]);
    net.publish(1, V5, publish("a/very/long/topic/name", b"x", QoS::AtMostOnce, None));
    assert_eq!(codes(&net.recv(1, V5)), disconnect(reason::TOPIC_NAME_INVALID));
}

#[test]
fn acl_read_access_is_checked_for_every_message() {
    // "#" may be subscribed to, but nothing under private/ may be read.
    let acl = "user alice\ntopic read #\ntopic deny private/#\ntopic write #\n";
    let mut net = with_auth(false, Some(acl));
    net.connect_with(1, login(V3, "reader", Some("alice"), b"s3cret"));
    assert_eq!(net.subscribe(1, V3, "#", QoS::AtMostOnce), vec![0]);
    net.connect_with(2, login(V3, "writer", Some("alice"), b"s3cret"));
    net.publish(2, V3, publish("public/x", b"ok", QoS::AtMostOnce, None));
    net.publish(2, V3, publish("private/x", b"secret", QoS::AtMostOnce, None));
    let got = publishes(&net.recv(1, V3));
    assert_eq!(got.iter().map(|p| &*p.payload).collect::<Vec<_>>(), vec![&b"ok"[..]]);
}

/// A live table swap ends only the removed user's connections (v5 with
/// DISCONNECT 0x98), and the next PUBLISH, SUBSCRIBE and delivery obey the
/// new ACL.
#[test]
fn swapping_the_tables_live_ends_only_removed_users_and_applies_the_acl_at_once() {
    use mqvisor_broker::auth::{Acl, AuthUpdate, PBKDF2_ITERATIONS, PasswordFile, pbkdf2_sha512_hash};
    let bob = format!("bob:{}\n", pbkdf2_sha512_hash(b"hunter2", b"salt-of-bob!", PBKDF2_ITERATIONS));
    let both = format!("{PASSWORDS}{bob}");
    let mut net = with_auth(false, Some("user alice\ntopic readwrite #\n"));
    net.broker.update_auth(
        AuthUpdate {
            passwords: Some(Some(PasswordFile::parse(&both).unwrap())),
            acl: Some(Some(Acl::parse("user alice\ntopic readwrite #\nuser bob\ntopic readwrite #\n").unwrap())),
            allow_anonymous: None,
        },
        net.now,
    );
    assert_eq!(connack_code(&net.connect_with(1, login(V5, "a5", Some("alice"), b"s3cret"))), (false, 0));
    assert_eq!(connack_code(&net.connect_with(2, login(V3, "b3", Some("bob"), b"hunter2"))), (false, 0));
    assert_eq!(connack_code(&net.connect_with(3, login(V5, "b5", Some("bob"), b"hunter2"))), (false, 0));
    assert_eq!(net.subscribe(1, V5, "t/#", QoS::AtMostOnce), vec![0]);
    assert_eq!(net.subscribe(2, V3, "t/#", QoS::AtMostOnce), vec![0]);

    // The ACL alone: nobody is ended; alice may no longer read t/secret.
    let acl = "user alice\ntopic readwrite #\ntopic deny t/secret\nuser bob\ntopic readwrite #\n";
    let ended = net
        .broker
        .update_auth(AuthUpdate { acl: Some(Some(Acl::parse(acl).unwrap())), ..AuthUpdate::default() }, net.now);
    assert_eq!(ended, 0);
    assert!(net.closes().is_empty());
    net.publish(3, V5, publish("t/secret", b"s", QoS::AtMostOnce, None));
    net.publish(3, V5, publish("t/open", b"o", QoS::AtMostOnce, None));
    let got = publishes(&net.recv(1, V5));
    assert_eq!(got.iter().map(|p| &*p.payload).collect::<Vec<_>>(), vec![&b"o"[..]]);
    assert_eq!(net.subscribe(1, V5, "t/secret", QoS::AtMostOnce), vec![reason::NOT_AUTHORIZED]);
    assert_eq!(publishes(&net.recv(2, V3)).len(), 2);

    // bob removed: both his connections end, alice's stays.
    let ended = net.broker.update_auth(
        AuthUpdate { passwords: Some(Some(PasswordFile::parse(PASSWORDS).unwrap())), ..AuthUpdate::default() },
        net.now,
    );
    assert_eq!(ended, 2);
    let got = net.recv(3, V5);
    assert!(matches!(&got[..], [Packet::Disconnect { code: reason::ADMINISTRATIVE_ACTION, .. }]), "{got:?}");
    assert!(net.recv(2, V3).is_empty(), "3.x: closed without a packet");
    let mut closed = net.closes();
    closed.sort_unstable();
    assert_eq!(closed, vec![2, 3]);
    net.publish(1, V5, publish("t/x", b"still here", QoS::AtMostOnce, None));
    assert_eq!(publishes(&net.recv(1, V5)).len(), 1);
    assert_eq!(
        connack_code(&net.connect_with(4, login(V5, "b6", Some("bob"), b"hunter2"))),
        (false, reason::BAD_USER_NAME_OR_PASSWORD)
    );
}

#[test]
fn max_keep_alive_caps_v5_clients_that_ask_for_more_or_none() {
    for asked in [600, 0] {
        let mut net = Net::with(Config { max_keep_alive: Some(5), sys_interval_ms: 0, ..Config::default() });
        let mut c = connect(V5, "k", true);
        c.keep_alive = asked;
        let Packet::Connack(ack) = net.connect_with(1, c) else { panic!() };
        assert_eq!((ack.code, ack.properties.server_keep_alive), (reason::SUCCESS, Some(5)), "asked {asked}");
        // Enforced at the cap: 1.5 times 5 s of silence ends the connection.
        net.advance(7_499);
        assert!(net.closes().is_empty());
        net.advance(1);
        assert_eq!(net.closes(), vec![1]);
    }
}

#[test]
fn max_keep_alive_leaves_a_shorter_keep_alive_alone() {
    let mut net = Net::with(Config { max_keep_alive: Some(60), sys_interval_ms: 0, ..Config::default() });
    let mut c = connect(V5, "k", true);
    c.keep_alive = 2;
    let Packet::Connack(ack) = net.connect_with(1, c) else { panic!() };
    assert_eq!(ack.properties.server_keep_alive, None);
    net.advance(3_000);
    assert_eq!(net.closes(), vec![1]);
}

#[test]
fn max_keep_alive_refuses_a_v3_client_that_asks_for_more() {
    let mut net = Net::with(Config { max_keep_alive: Some(60), sys_interval_ms: 0, ..Config::default() });
    let mut c = connect(V3, "k", true);
    c.keep_alive = 61;
    let Packet::Connack(ack) = net.connect_with(1, c) else { panic!() };
    assert_eq!(ack.code, 2, "identifier rejected, as Mosquitto answers");
    assert_eq!(net.closes(), vec![1]);
    let mut c = connect(V3, "k", true);
    c.keep_alive = 60;
    let Packet::Connack(ack) = net.connect_with(2, c) else { panic!() };
    assert_eq!(ack.code, 0);
}

#[test]
fn a_connection_silent_before_connect_is_closed() {
    let mut net = Net::with(Config { connect_timeout_ms: 2_000, sys_interval_ms: 0, ..Config::default() });
    net.broker.open(1, net.now);
    assert_eq!(net.broker.next_deadline(), Some(net.now + 2_000));
    net.advance(1_999);
    assert!(net.closes().is_empty());
    net.advance(1);
    assert_eq!(net.closes(), vec![1]);
}

#[test]
fn topic_aliases_outside_the_announced_range_are_refused() {
    for alias in [0, 17] {
        let mut net = Net::new(); // announces topic_alias_maximum 16
        net.connect(1, V5, "a", true);
        let mut p = publish("t", b"x", QoS::AtMostOnce, None);
        p.properties.make_mut().topic_alias = Some(alias);
        net.publish(1, V5, p);
        assert_eq!(codes(&net.recv(1, V5)), disconnect(reason::TOPIC_ALIAS_INVALID), "alias {alias}");
    }
}

#[test]
fn unsupported_qos_and_retain_are_refused_on_publish_and_in_wills() {
    let config =
        || Config { max_qos: QoS::AtLeastOnce, retain_available: false, sys_interval_ms: 0, ..Config::default() };
    let mut net = Net::with(config());
    let Packet::Connack(ack) = net.connect(1, V5, "a", true) else { panic!() };
    assert_eq!((ack.properties.maximum_qos, ack.properties.retain_available), (Some(1), Some(0)));
    net.publish(1, V5, publish("t", b"x", QoS::ExactlyOnce, Some(1)));
    assert_eq!(codes(&net.recv(1, V5)), disconnect(reason::QOS_NOT_SUPPORTED));
    net.connect(2, V5, "b", true);
    net.publish(2, V5, Publish { retain: true, ..publish("t", b"x", QoS::AtMostOnce, None) });
    assert_eq!(codes(&net.recv(2, V5)), disconnect(reason::RETAIN_NOT_SUPPORTED));

    let will = |qos, retain, topic: &str| Will {
        topic: topic.into(),
        payload: b"w".to_vec(),
        qos,
        retain,
        properties: Properties::default(),
    };
    for (conn, w, expected) in [
        (3, will(QoS::ExactlyOnce, false, "w"), reason::QOS_NOT_SUPPORTED),
        (4, will(QoS::AtMostOnce, true, "w"), reason::RETAIN_NOT_SUPPORTED),
        (5, will(QoS::AtMostOnce, false, "w/+"), reason::TOPIC_NAME_INVALID),
    ] {
        let c = Connect { will: Some(w), ..connect(V5, &format!("w{conn}"), true) };
        assert_eq!(connack_code(&net.connect_with(conn, c)), (false, expected));
    }
}

#[test]
fn a_will_outside_the_acl_is_refused_at_connect() {
    let mut net = with_auth(false, Some("user alice\ntopic readwrite alice/#\n"));
    let mut c = login(V5, "a", Some("alice"), b"s3cret");
    c.will = Some(Will {
        topic: "bob/will".into(),
        payload: b"w".to_vec(),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: Properties::default(),
    });
    assert_eq!(connack_code(&net.connect_with(1, c)), (false, reason::NOT_AUTHORIZED));
}

#[test]
fn exceeding_the_receive_maximum_ends_the_connection_and_is_counted() {
    let mut net = Net::with(Config { receive_maximum: 2, sys_interval_ms: 0, ..Config::default() });
    net.connect(1, V5, "flood", true);
    for id in 1..=2 {
        net.publish(1, V5, publish("t", b"x", QoS::ExactlyOnce, Some(id)));
    }
    assert_eq!(net.recv(1, V5).len(), 2, "two PUBRECs");
    net.publish(1, V5, publish("t", b"x", QoS::ExactlyOnce, Some(3)));
    assert_eq!(codes(&net.recv(1, V5)), disconnect(reason::RECEIVE_MAXIMUM_EXCEEDED));
    assert_eq!(net.closes(), vec![1]);
    assert_eq!(net.broker.stats().quota_refusals, 1);
    // MQTT 3.1.1 has no Receive Maximum to tell: the connection just ends,
    // and the count says why. A released one makes room again.
    net.connect(2, V3, "flood311", true);
    for id in 1..=2 {
        net.publish(2, V3, publish("t", b"x", QoS::ExactlyOnce, Some(id)));
    }
    assert_eq!(net.recv(2, V3).len(), 2, "two PUBRECs");
    net.send(2, V3, &Packet::Pubrel(ack(1)));
    net.publish(2, V3, publish("t", b"x", QoS::ExactlyOnce, Some(3)));
    assert_eq!(net.recv(2, V3).len(), 2, "PUBCOMP 1 and PUBREC 3");
    net.publish(2, V3, publish("t", b"x", QoS::ExactlyOnce, Some(4)));
    assert!(net.recv(2, V3).is_empty(), "nothing a 3.1.1 client could read");
    assert_eq!(net.closes(), vec![2]);
    assert_eq!(net.broker.stats().quota_refusals, 2);
}

#[test]
fn no_local_on_a_shared_subscription_is_a_protocol_error() {
    let mut net = Net::new();
    net.connect(1, V5, "a", true);
    let options =
        SubscriptionOptions { qos: QoS::AtMostOnce, no_local: true, retain_as_published: false, retain_handling: 0 };
    let s =
        Subscribe { packet_id: 1, properties: Properties::default(), filters: vec![("$share/g/t".into(), options)] };
    net.send(1, V5, &Packet::Subscribe(s));
    assert_eq!(codes(&net.recv(1, V5)), disconnect(reason::PROTOCOL_ERROR));
}

#[test]
fn raising_a_zero_session_expiry_at_disconnect_is_a_protocol_error() {
    let mut net = Net::new();
    net.connect(1, V5, "a", true); // session expiry 0
    let properties = Properties { session_expiry_interval: Some(60), ..Properties::default() };
    net.send(1, V5, &Packet::Disconnect { code: 0, properties });
    assert_eq!(codes(&net.recv(1, V5)), disconnect(reason::PROTOCOL_ERROR));
    assert_eq!(net.closes(), vec![1]);
}

#[test]
fn clients_cannot_publish_into_sys() {
    let mut net = Net::new();
    net.connect(1, V5, "spoof", true);
    net.connect(2, V5, "watch", true);
    net.subscribe(2, V5, "$SYS/#", QoS::AtMostOnce);
    net.publish(1, V5, publish("$SYS/broker/uptime", b"forever", QoS::AtLeastOnce, Some(9)));
    assert!(matches!(net.recv(1, V5)[..], [Packet::Puback(Ack { packet_id: 9, code: reason::NOT_AUTHORIZED, .. })]));
    assert!(publishes(&net.recv(2, V5)).is_empty());
}

#[test]
fn unknown_packet_identifiers_in_the_qos2_flow_get_0x92() {
    let mut net = Net::new();
    net.connect(1, V5, "a", true);
    net.send(1, V5, &Packet::Pubrel(ack(77)));
    assert!(matches!(
        net.recv(1, V5)[..],
        [Packet::Pubcomp(Ack { packet_id: 77, code: reason::PACKET_IDENTIFIER_NOT_FOUND, .. })]
    ));
    net.send(1, V5, &Packet::Pubrec(ack(78)));
    assert!(matches!(
        net.recv(1, V5)[..],
        [Packet::Pubrel(Ack { packet_id: 78, code: reason::PACKET_IDENTIFIER_NOT_FOUND, .. })]
    ));
}

#[test]
fn low_memory_refuses_publishes_and_subscriptions_with_quota_exceeded() {
    let mut net = Net::new();
    net.connect(1, V5, "pub5", true);
    net.connect(2, V3, "pub3", true);
    net.connect(3, V5, "sub", true);
    assert_eq!(net.subscribe(3, V5, "t/#", QoS::AtLeastOnce), vec![1]);
    // A QoS 2 publish taken before memory ran low, its PUBREC lost.
    net.publish(2, V3, publish("t/2", b"m", QoS::ExactlyOnce, Some(9)));
    assert_eq!(net.recv(2, V3), vec![Packet::Pubrec(ack(9))]);
    assert_eq!(publishes(&net.recv(3, V5)).len(), 1);
    net.broker.set_memory_low(true);
    // Its retransmission is acknowledged again, not refused.
    net.publish(2, V3, Publish { dup: true, ..publish("t/2", b"m", QoS::ExactlyOnce, Some(9)) });
    assert_eq!(net.recv(2, V3), vec![Packet::Pubrec(ack(9))]);
    net.publish(1, V5, publish("t/a", b"m", QoS::AtLeastOnce, Some(1)));
    assert_eq!(puback_codes(&net.recv(1, V5)), vec![reason::QUOTA_EXCEEDED]);
    // 3.x has no refusal in PUBACK: the connection ends unacknowledged (an
    // acknowledged publish that was dropped would be a loss the client
    // never learns of); its QoS 0 publish is dropped.
    net.publish(2, V3, publish("t/q0", b"m", QoS::AtMostOnce, None));
    assert!(net.recv(2, V3).is_empty());
    assert!(net.closes().is_empty(), "QoS 0 needs no acknowledgement");
    net.publish(2, V3, publish("t/b", b"m", QoS::AtLeastOnce, Some(2)));
    assert!(net.recv(2, V3).is_empty(), "no PUBACK for what was not taken");
    assert_eq!(net.closes(), vec![2]);
    let retained = Publish { retain: true, ..publish("t/r", b"kept?", QoS::AtMostOnce, None) };
    net.publish(1, V5, retained);
    assert!(publishes(&net.recv(3, V5)).is_empty(), "nothing refused was delivered");
    assert_eq!(net.subscribe(3, V5, "other", QoS::AtMostOnce), vec![reason::QUOTA_EXCEEDED]);
    assert_eq!(net.broker.stats().quota_refusals, 5);
    // Memory back: served again, and the refused retained message was never kept.
    net.broker.set_memory_low(false);
    net.publish(1, V5, publish("t/a", b"m", QoS::AtLeastOnce, Some(3)));
    assert_eq!(puback_codes(&net.recv(1, V5)), vec![0]);
    assert_eq!(publishes(&net.recv(3, V5)).len(), 1);
    net.connect(4, V5, "late", true);
    assert_eq!(net.subscribe(4, V5, "t/r", QoS::AtMostOnce), vec![0]);
    assert!(publishes(&net.recv(4, V5)).is_empty());
}

#[test]
fn low_memory_bounds_the_packets_being_assembled_together() {
    let mut net = Net::new();
    for (conn, id) in [(1, "first"), (2, "second5"), (4, "after")] {
        net.connect(conn, V5, id, true);
    }
    net.connect(3, V3, "second3", true);
    net.broker.set_memory_low(true);
    let big = |version| {
        let mut bytes = Vec::new();
        let publish = publish("t/big", &[7u8; 600 << 10], QoS::AtLeastOnce, Some(5));
        packet::encode(&Packet::Publish(publish), version, &mut bytes);
        bytes
    };
    let (big5, big3) = (big(V5), big(V3));
    // One packet of 600 KiB fits in the room kept for one of the maximum
    // size (1 MiB): it is read whole, and refused as every publish is now.
    net.raw(1, &big5[..100]);
    assert!(net.recv(1, V5).is_empty());
    // A second one at the same time does not fit: its connection is ended
    // before anything is reserved (once its length is known).
    net.raw(2, &big5[..100]);
    assert!(matches!(net.recv(2, V5)[..], [Packet::Disconnect { code: reason::QUOTA_EXCEEDED, .. }]));
    net.raw(3, &big3[..1]);
    net.raw(3, &big3[1..100]);
    assert!(net.recv(3, V3).is_empty(), "3.1.1 has no DISCONNECT from the server");
    assert_eq!(net.broker.stats().quota_refusals, 2, "two connections ended");
    net.raw(1, &big5[100..]);
    assert_eq!(puback_codes(&net.recv(1, V5)), vec![reason::QUOTA_EXCEEDED]);
    // With the first one done, another may start.
    net.raw(4, &big5[..100]);
    net.raw(4, &big5[100..]);
    assert_eq!(puback_codes(&net.recv(4, V5)), vec![reason::QUOTA_EXCEEDED]);
}

#[test]
fn packets_split_anywhere_or_batched_arrive_the_same() {
    // A burst of packets (one larger than a shared payload), cut at every
    // size from one byte up, and all at once.
    let big = vec![9u8; 10_000];
    let mut burst = Vec::new();
    for (i, payload) in [&b"a"[..], &big[..], &b"c"[..]].into_iter().enumerate() {
        let id = u16::try_from(i + 1).unwrap();
        packet::encode(&Packet::Publish(publish("t", payload, QoS::AtLeastOnce, Some(id))), V3, &mut burst);
    }
    for step in [1, 2, 3, 7, 100, 4096, burst.len()] {
        let mut net = Net::new();
        net.connect(1, V3, "pub", true);
        net.connect(2, V3, "sub", true);
        assert_eq!(net.subscribe(2, V3, "t", QoS::AtMostOnce), vec![0]);
        for chunk in burst.chunks(step) {
            net.raw(1, chunk);
        }
        let acks = net.recv(1, V3);
        assert_eq!(acks, (1..=3).map(|id| Packet::Puback(ack(id))).collect::<Vec<_>>(), "step {step}");
        let got = publishes(&net.recv(2, V3));
        let payloads: Vec<usize> = got.iter().map(|p| p.payload.len()).collect();
        assert_eq!(payloads, vec![1, 10_000, 1], "step {step}");
        assert_eq!(&got[1].payload[..], &big[..]);
    }
}

#[test]
fn new_sessions_are_refused_past_max_sessions_and_when_memory_is_low() {
    let mut net = Net::with(Config { max_sessions: 2, sys_interval_ms: 0, ..Config::default() });
    // Two offline persistent sessions fill the table.
    for (conn, id) in [(1, "a"), (2, "b")] {
        assert_eq!(connack_code(&net.connect(conn, V3, id, false)), (false, 0));
        net.send(conn, V3, &Packet::Disconnect { code: 0, properties: Properties::default() });
        net.transmit();
    }
    assert_eq!(connack_code(&net.connect(3, V5, "c", true)), (false, reason::QUOTA_EXCEEDED));
    assert_eq!(connack_code(&net.connect(4, V3, "d", true)), (false, 3));
    // Resuming a session is not a new one.
    assert_eq!(connack_code(&net.connect(5, V3, "a", false)), (true, 0));
    // Low memory refuses new sessions whatever the table says.
    let mut net = Net::new();
    net.broker.set_memory_low(true);
    assert_eq!(connack_code(&net.connect(1, V5, "x", true)), (false, reason::QUOTA_EXCEEDED));
    assert_eq!(net.broker.stats().quota_refusals, 1);
    net.broker.set_memory_low(false);
    assert_eq!(connack_code(&net.connect(2, V5, "x", true)), (false, 0));
}

#[test]
fn retained_messages_are_bounded_by_count_and_bytes() {
    let config = Config { max_retained_messages: 2, max_retained_bytes: 100, sys_interval_ms: 0, ..Config::default() };
    let mut net = Net::with(config);
    net.connect(1, V5, "keeper", true);
    let retained = |topic: &str, payload: &[u8], id: u16| Publish {
        retain: true,
        ..publish(topic, payload, QoS::AtLeastOnce, Some(id))
    };
    net.publish(1, V5, retained("a", b"1", 1));
    net.publish(1, V5, retained("b", b"2", 2));
    // A third topic is over the count: refused, counted.
    net.publish(1, V5, retained("c", b"3", 3));
    // Replacing one in place is not a new one.
    net.publish(1, V5, retained("a", b"11", 4));
    // Over the bytes: refused, even for a replacement that grows.
    net.publish(1, V5, retained("b", &[b'x'; 120], 5));
    // Deleting always works, and makes room.
    net.publish(1, V5, retained("b", b"", 6));
    net.publish(1, V5, retained("c", b"3", 7));
    let codes = puback_codes(&net.recv(1, V5));
    let no_subscribers = reason::NO_MATCHING_SUBSCRIBERS;
    assert_eq!(
        codes,
        vec![
            no_subscribers,
            no_subscribers,
            reason::QUOTA_EXCEEDED,
            no_subscribers,
            reason::QUOTA_EXCEEDED,
            no_subscribers,
            no_subscribers
        ]
    );
    assert_eq!(net.broker.stats().quota_refusals, 2);
}

/// A broker rebuilt from `from`'s journal (every record through its
/// encoding), as after a restart on the same state.
fn restarted(from: &mut Net) -> Net {
    let mut bodies = Vec::new();
    for record in from.broker.take_journal() {
        let mut body = Vec::new();
        record.encode(&mut body);
        bodies.push(body);
    }
    // A compacted log (the live state's snapshot) restores the same state.
    let mut snapshot = Vec::new();
    from.broker
        .snapshot(&mut |record| {
            let mut body = Vec::new();
            record.encode(&mut body);
            snapshot.push(body);
            Ok::<(), ()>(())
        })
        .unwrap();
    let mut compacted = Net::new();
    for body in &snapshot {
        assert!(compacted.broker.restore(body, compacted.now));
    }
    compacted.broker.finish_restore(compacted.now);
    assert_eq!(compacted.broker.durable_counts(), from.broker.durable_counts(), "the snapshot holds it all");
    let mut net = Net::new();
    for body in &bodies {
        assert!(net.broker.restore(body, net.now));
    }
    net.broker.finish_restore(net.now);
    net.broker.enable_journal();
    net
}

#[test]
fn a_journal_restores_sessions_subscriptions_queues_and_retained() {
    let mut net = Net::new();
    net.broker.enable_journal();
    // A durable v3 subscriber with a QoS 1 and a QoS 2 subscription, gone offline.
    net.connect(2, V3, "sub", false);
    net.subscribe(2, V3, "q1/#", QoS::AtLeastOnce);
    net.subscribe(2, V3, "q2", QoS::ExactlyOnce);
    net.broker.closed(2, net.now);
    // A clean-session subscriber: nothing of it is kept.
    net.connect(3, V3, "clean", true);
    net.subscribe(3, V3, "q1/#", QoS::AtLeastOnce);
    net.connect(1, V5, "pub", true);
    for i in 0..5u16 {
        net.publish(1, V5, publish("q1/a", format!("m{i}").as_bytes(), QoS::AtLeastOnce, Some(10 + i)));
    }
    net.publish(1, V5, publish("q2", b"exactly", QoS::ExactlyOnce, Some(20)));
    let mut retained = publish("r", b"kept", QoS::AtLeastOnce, Some(21));
    retained.retain = true;
    net.publish(1, V5, retained);
    net.recv(1, V5);
    net.recv(3, V3);

    let mut net = restarted(&mut net);
    let (present, code) = connack_code(&net.connect(2, V3, "sub", false));
    assert_eq!((present, code), (true, 0), "the session survives");
    let got = publishes(&net.recv(2, V3));
    let payloads: Vec<&[u8]> = got.iter().map(|p| &*p.payload).collect();
    assert_eq!(payloads, [&b"m0"[..], b"m1", b"m2", b"m3", b"m4", b"exactly"]);
    assert!(got.iter().all(|p| p.dup), "restored messages may be repeats: DUP");
    // The subscriptions survive too, and the clean session does not.
    assert_eq!(connack_code(&net.connect(3, V3, "clean", false)), (false, 0));
    net.connect(4, V3, "late", true);
    net.subscribe(4, V3, "r", QoS::AtLeastOnce);
    let late = publishes(&net.recv(4, V3));
    assert_eq!(late.len(), 1);
    assert_eq!(&*late[0].payload, b"kept");
    net.connect(5, V3, "pub2", true);
    net.publish(5, V3, publish("q1/b", b"after", QoS::AtLeastOnce, Some(1)));
    assert_eq!(publishes(&net.recv(2, V3)).len(), 1);
}

#[test]
fn acknowledged_messages_stay_delivered_and_qos2_keeps_its_packet_id_across_a_restart() {
    let mut net = Net::new();
    net.broker.enable_journal();
    net.connect(2, V5, "sub", false);
    // v5: the session must outlive the connection to be kept.
    net.broker.closed(2, net.now);
    let mut c = connect(V5, "sub", false);
    c.properties.session_expiry_interval = Some(600);
    net.connect_with(2, c);
    net.subscribe(2, V5, "t", QoS::ExactlyOnce);
    net.connect(1, V5, "pub", true);
    for i in 0..3u16 {
        net.publish(1, V5, publish("t", &[b"abc"[usize::from(i)]], QoS::ExactlyOnce, Some(1 + i)));
        // The publisher's PUBREL: its QoS 2 flow is finished.
        net.send(1, V5, &Packet::Pubrel(ack(1 + i)));
    }
    let sent = publishes(&net.recv(2, V5));
    assert_eq!(sent.len(), 3);
    // The first is completed, the second released (PUBREC), the third unanswered.
    let ids: Vec<u16> = sent.iter().map(|p| p.packet_id.unwrap()).collect();
    net.send(2, V5, &Packet::Pubrec(ack(ids[0])));
    net.send(2, V5, &Packet::Pubcomp(ack(ids[0])));
    net.send(2, V5, &Packet::Pubrec(ack(ids[1])));
    net.recv(2, V5);

    let mut net = restarted(&mut net);
    let mut c = connect(V5, "sub", false);
    c.properties.session_expiry_interval = Some(600);
    assert_eq!(connack_code(&net.connect_with(2, c)), (true, 0));
    let after = net.recv(2, V5);
    assert!(after.contains(&Packet::Pubrel(ack(ids[1]))), "PUBREL still owed for the released one: {after:?}");
    let again = publishes(&after);
    assert_eq!(again.len(), 1, "only the unanswered message comes again: {after:?}");
    assert_eq!((again[0].packet_id, again[0].dup, &*again[0].payload), (Some(ids[2]), true, &b"c"[..]));
}

#[test]
fn a_durable_sessions_will_fires_after_a_restart_and_a_clean_disconnect_forgets_it() {
    let mut net = Net::new();
    net.broker.enable_journal();
    let will = |topic: &str| Will {
        topic: topic.into(),
        payload: b"gone".to_vec(),
        qos: QoS::AtLeastOnce,
        retain: true,
        properties: Properties { will_delay_interval: Some(5), ..Properties::default() },
    };
    // Two durable sessions with wills: one connection is still up when the
    // broker stops (its will must fire after the restart), the other ends
    // with a clean DISCONNECT (its will is gone).
    for (conn, id) in [(1, "crashed"), (2, "polite")] {
        let mut c = connect(V5, id, true);
        c.properties.session_expiry_interval = Some(600);
        c.will = Some(will(&format!("will/{id}")));
        net.connect_with(conn, c);
    }
    net.send(2, V5, &Packet::Disconnect { code: 0, properties: Properties::default() });
    net.recv(2, V5);

    let mut net = restarted(&mut net);
    net.connect(3, V5, "watcher", true);
    net.subscribe(3, V5, "will/#", QoS::AtLeastOnce);
    assert!(publishes(&net.recv(3, V5)).is_empty(), "no will before its delay");
    net.advance(6_000);
    let fired = publishes(&net.recv(3, V5));
    assert_eq!(fired.iter().map(|p| &*p.topic).collect::<Vec<_>>(), ["will/crashed"]);
}

#[test]
fn acknowledgements_the_log_could_not_keep_are_withdrawn_with_their_connection() {
    let mut net = Net::new();
    net.broker.enable_journal();
    net.connect(1, V3, "pub", true);
    net.connect(2, V3, "reader", true);
    net.subscribe(2, V3, "t", QoS::AtMostOnce);
    let mut retained = publish("t", b"m", QoS::AtLeastOnce, Some(7));
    retained.retain = true;
    net.publish(1, V3, retained);
    // The runner's commit of that Retain record failed: no PUBACK may leave.
    assert_eq!(net.broker.withdraw_output(net.now), 2, "the publisher and the reader had output waiting");
    assert!(net.recv(1, V3).is_empty(), "no acknowledgement of what is not on disk");
    let mut closed = net.closes();
    closed.sort();
    assert_eq!(closed, [1, 2]);
}
