//! The broker: connections, sessions, message delivery, retained messages,
//! wills, keep-alive and limits (MQTT 3.1.1 and 5.0, sections 3 and 4).
//!
//! Sans-I/O, in the quinn-proto style. The runner calls, in any order:
//! - [`Broker::open`] when a transport connection is accepted,
//! - [`Broker::receive`] with bytes from it,
//! - [`Broker::closed`] when it has gone (after a [`Event::Close`] or not),
//! - [`Broker::tick`] when [`Broker::next_deadline`] has passed;
//!
//! and then drains [`Broker::take_dirty`] / [`Broker::output`] /
//! [`Broker::consume_output`] and [`Broker::poll_event`]. Time is
//! milliseconds from any origin, passed in. Nothing here blocks, reads a
//! clock, or grows without a configured bound.

use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::sync::Arc;
use alloc::vec::Vec;

use crate::auth::{Acl, PasswordFile, Want};
use crate::packet::{self, Ack, Connack, Connect, Packet, Publish, QoS, Subscribe, Unsubscribe, Version, Will};
use crate::properties::Properties;
use crate::subscriptions::{SessionKey, Subscription, SubscriptionIndex};
use crate::topic::{self, TopicLimits};
use crate::wire::DecodeError;

/// A transport connection, numbered by the runner.
pub type ConnId = u64;

/// MQTT 5 reason codes used here (section 2.4).
pub mod reason {
    pub const SUCCESS: u8 = 0x00;
    pub const GRANTED_QOS_1: u8 = 0x01;
    pub const GRANTED_QOS_2: u8 = 0x02;
    pub const DISCONNECT_WITH_WILL: u8 = 0x04;
    pub const NO_MATCHING_SUBSCRIBERS: u8 = 0x10;
    pub const NO_SUBSCRIPTION_EXISTED: u8 = 0x11;
    pub const UNSPECIFIED_ERROR: u8 = 0x80;
    pub const MALFORMED_PACKET: u8 = 0x81;
    pub const PROTOCOL_ERROR: u8 = 0x82;
    pub const UNSUPPORTED_PROTOCOL_VERSION: u8 = 0x84;
    pub const CLIENT_IDENTIFIER_NOT_VALID: u8 = 0x85;
    pub const BAD_USER_NAME_OR_PASSWORD: u8 = 0x86;
    pub const NOT_AUTHORIZED: u8 = 0x87;
    pub const SERVER_UNAVAILABLE: u8 = 0x88;
    pub const SERVER_BUSY: u8 = 0x89;
    pub const BAD_AUTHENTICATION_METHOD: u8 = 0x8c;
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8d;
    pub const SESSION_TAKEN_OVER: u8 = 0x8e;
    pub const TOPIC_FILTER_INVALID: u8 = 0x8f;
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    pub const PACKET_IDENTIFIER_NOT_FOUND: u8 = 0x92;
    pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
    pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    pub const RETAIN_NOT_SUPPORTED: u8 = 0x9a;
    pub const QOS_NOT_SUPPORTED: u8 = 0x9b;
}

/// MQTT 3.x CONNACK return codes (3.1.1 section 3.2.2.3).
mod v3_return {
    pub const ACCEPTED: u8 = 0;
    pub const UNACCEPTABLE_PROTOCOL_VERSION: u8 = 1;
    pub const IDENTIFIER_REJECTED: u8 = 2;
    pub const SERVER_UNAVAILABLE: u8 = 3;
    pub const BAD_USER_NAME_OR_PASSWORD: u8 = 4;
    pub const NOT_AUTHORIZED: u8 = 5;
}

/// Limits and switches; every limit is explicit.
#[derive(Debug, Clone)]
pub struct Config {
    pub max_connections: usize,
    /// Largest packet accepted from a client, and announced to v5 clients.
    pub max_packet_size: usize,
    /// Messages queued per offline or slow session before new ones drop.
    pub max_queued_messages: usize,
    /// Outgoing QoS 1/2 messages unacknowledged per session.
    pub max_inflight: u16,
    /// Incoming QoS 1/2 messages a client may have unacknowledged (v5 Receive Maximum).
    pub receive_maximum: u16,
    pub topic_limits: TopicLimits,
    pub max_subscriptions_per_client: usize,
    pub max_qos: QoS,
    pub retain_available: bool,
    /// Topic aliases a v5 client may use towards us.
    pub topic_alias_maximum: u16,
    /// Overrides the client's keep-alive (v5 Server Keep Alive) when set.
    pub server_keep_alive: Option<u16>,
    /// Cap on a session's expiry interval, seconds.
    pub max_session_expiry: u32,
    /// Bytes of encoded output a connection may have pending before further
    /// messages to it wait in its session queue (bounded by
    /// `max_queued_messages`; beyond that they are dropped and counted).
    pub max_pending_output: usize,
    /// How often `$SYS/broker/...` statistics are published, ms (0: never).
    pub sys_interval_ms: u64,
    /// How long a connection may stay silent before its CONNECT, ms.
    pub connect_timeout_ms: u64,
    /// When set, clients must present a user name and password from it
    /// (unless `allow_anonymous` and they present no user name).
    pub passwords: Option<PasswordFile>,
    /// Whether clients without a user name may connect.
    pub allow_anonymous: bool,
    /// When set, every publish and subscribe must be granted by it.
    pub acl: Option<Acl>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_connections: 10_000,
            max_packet_size: 1 << 20,
            max_queued_messages: 1000,
            max_inflight: 20,
            receive_maximum: 100,
            topic_limits: TopicLimits::default(),
            max_subscriptions_per_client: 1000,
            max_qos: QoS::ExactlyOnce,
            retain_available: true,
            topic_alias_maximum: 16,
            server_keep_alive: None,
            max_session_expiry: u32::MAX,
            max_pending_output: 256 * 1024,
            sys_interval_ms: 10_000,
            connect_timeout_ms: 10_000,
            passwords: None,
            allow_anonymous: true,
            acl: None,
        }
    }
}

/// What the runner must do besides moving bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Send the remaining output of this connection, then close it.
    Close(ConnId),
}

/// Counters, published under `$SYS/broker/`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub messages_received: u64,
    pub messages_sent: u64,
    /// Messages not delivered because a queue or window was full.
    pub messages_dropped: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub connections_refused: u64,
    pub protocol_errors: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
/// What an outgoing QoS 1/2 message waits for.
enum Awaiting {
    Puback,
    Pubrec,
    Pubcomp,
}

#[derive(Debug, Clone)]
struct Outgoing {
    publish: Publish,
    state: Awaiting,
}

/// A message waiting for delivery, with its absolute expiry time.
#[derive(Debug, Clone)]
struct Queued {
    publish: Publish,
    expires_at: Option<u64>,
}

#[derive(Debug)]
struct Session {
    client_id: String,
    /// The user the session was last authenticated as (for ACL reads).
    username: Option<String>,
    conn: Option<ConnId>,
    version: Version,
    /// Seconds the session outlives its connection; u32::MAX: forever.
    expiry: u32,
    disconnected_at: Option<u64>,
    /// Raw filters (with any `$share/` prefix) this session holds.
    filters: BTreeSet<String>,
    next_packet_id: u16,
    inflight: BTreeMap<u16, Outgoing>,
    /// QoS 2 packet ids received and not yet released by PUBREL.
    incoming_qos2: BTreeSet<u16>,
    queue: VecDeque<Queued>,
    will: Option<Will>,
    /// When a delayed will falls due, once the connection is gone.
    will_at: Option<u64>,
}

#[derive(Debug, PartialEq, Eq)]
enum Phase {
    AwaitingConnect,
    Connected(SessionKey),
    /// A Close event was issued; input is ignored until `closed`.
    Closing,
}

struct Conn {
    opened_at: u64,
    phase: Phase,
    version: Version,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    keep_alive_ms: u64,
    last_rx: u64,
    /// v5: what the client accepts from us.
    client_max_packet: usize,
    client_receive_max: u16,
    client_alias_max: u16,
    /// Aliases the client set towards us.
    inbound_aliases: BTreeMap<u16, Arc<str>>,
    /// Aliases we set towards the client.
    outbound_aliases: BTreeMap<Arc<str>, u16>,
    /// The authenticated user, for ACL checks.
    username: Option<String>,
    client_id: String,
    /// v5: the client accepts reason strings.
    problem_information: bool,
}

impl Conn {
    fn new(now: u64) -> Conn {
        Conn {
            opened_at: now,
            phase: Phase::AwaitingConnect,
            version: Version::V3_1_1,
            inbuf: Vec::new(),
            out: Vec::new(),
            keep_alive_ms: 0,
            last_rx: now,
            client_max_packet: usize::MAX,
            client_receive_max: u16::MAX,
            client_alias_max: 0,
            inbound_aliases: BTreeMap::new(),
            username: None,
            client_id: String::new(),
            problem_information: true,
            outbound_aliases: BTreeMap::new(),
        }
    }
}

/// Why a connection is being ended by the server.
struct Refusal {
    code: u8,
    why: &'static str,
}

fn refuse(code: u8, why: &'static str) -> Refusal {
    Refusal { code, why }
}

/// The broker.
pub struct Broker {
    config: Config,
    conns: BTreeMap<ConnId, Conn>,
    sessions: BTreeMap<SessionKey, Session>,
    by_client_id: BTreeMap<String, SessionKey>,
    index: SubscriptionIndex,
    retained: BTreeMap<Arc<str>, Queued>,
    /// Round-robin position per shared subscription (`$share/group/filter`).
    share_cursor: BTreeMap<String, usize>,
    events: VecDeque<Event>,
    dirty: BTreeSet<ConnId>,
    stats: Stats,
    next_session: SessionKey,
    next_assigned_id: u64,
    started_at: Option<u64>,
    next_sys_at: u64,
}

impl Broker {
    pub fn new(config: Config) -> Broker {
        Broker {
            config,
            conns: BTreeMap::new(),
            sessions: BTreeMap::new(),
            by_client_id: BTreeMap::new(),
            index: SubscriptionIndex::default(),
            retained: BTreeMap::new(),
            share_cursor: BTreeMap::new(),
            events: VecDeque::new(),
            dirty: BTreeSet::new(),
            stats: Stats::default(),
            next_session: 1,
            next_assigned_id: 1,
            started_at: None,
            next_sys_at: 0,
        }
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Number of open transport connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    // ----- the runner's side -------------------------------------------------

    /// A transport connection was accepted.
    pub fn open(&mut self, conn: ConnId, now: u64) {
        self.started_at.get_or_insert(now);
        self.conns.insert(conn, Conn::new(now));
    }

    /// Bytes arrived on `conn`.
    pub fn receive(&mut self, conn: ConnId, bytes: &[u8], now: u64) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        if c.phase == Phase::Closing {
            return;
        }
        c.last_rx = now;
        c.inbuf.extend_from_slice(bytes);
        self.stats.bytes_received += bytes.len() as u64;
        loop {
            let Some(c) = self.conns.get_mut(&conn) else { return };
            if c.phase == Phase::Closing {
                c.inbuf.clear();
                return;
            }
            let (version, connected) = (c.version, matches!(c.phase, Phase::Connected(_)));
            let framed = packet::frame(&c.inbuf, self.config.max_packet_size);
            let frame = match framed {
                Ok(Some(frame)) => frame,
                Ok(None) => return,
                Err(e) => {
                    self.decode_failed(conn, e, connected);
                    return;
                }
            };
            let decoded = packet::decode(frame, &c.inbuf, version);
            c.inbuf.drain(..frame.len);
            match decoded {
                Ok(packet) => self.handle(conn, packet, now),
                Err(e) => {
                    self.decode_failed(conn, e, connected);
                    return;
                }
            }
        }
    }

    /// Connections with new output since the last call.
    pub fn take_dirty(&mut self) -> Vec<ConnId> {
        let dirty = core::mem::take(&mut self.dirty);
        dirty.into_iter().collect()
    }

    /// Encoded bytes waiting to be sent on `conn`.
    pub fn output(&self, conn: ConnId) -> &[u8] {
        self.conns.get(&conn).map_or(&[], |c| &c.out)
    }

    /// The runner sent `n` bytes of `output(conn)`. Room in the output may
    /// let queued messages move.
    pub fn consume_output(&mut self, conn: ConnId, n: usize, now: u64) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let n = n.min(c.out.len());
        c.out.drain(..n);
        self.stats.bytes_sent += n as u64;
        if let Phase::Connected(key) = c.phase {
            self.pump(key, now);
        }
    }

    /// Events for the runner, oldest first.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The transport connection is gone (by either side).
    pub fn closed(&mut self, conn: ConnId, now: u64) {
        let Some(c) = self.conns.remove(&conn) else { return };
        self.dirty.remove(&conn);
        let key = match c.phase {
            Phase::Connected(key) => key,
            // A Closing connection has already been detached from its session.
            _ => return,
        };
        // Gone without DISCONNECT (a DISCONNECT leaves the phase Closing).
        self.detach(key, conn, false, now);
    }

    /// When `tick` must next be called, if ever.
    pub fn next_deadline(&self) -> Option<u64> {
        let keep_alive = self
            .conns
            .values()
            .filter(|c| c.keep_alive_ms > 0 && c.phase != Phase::Closing)
            .map(|c| c.last_rx + c.keep_alive_ms * 3 / 2);
        let connects = self
            .conns
            .values()
            .filter(|c| c.phase == Phase::AwaitingConnect)
            .map(|c| c.opened_at + self.config.connect_timeout_ms);
        let wills = self.sessions.values().filter_map(|s| s.will_at);
        let expiries = self.sessions.values().filter_map(session_end);
        let sys = (self.config.sys_interval_ms > 0 && !self.conns.is_empty()).then_some(self.next_sys_at);
        keep_alive.chain(connects).chain(wills).chain(expiries).chain(sys).min()
    }

    /// Enforces keep-alive, fires delayed wills, ends expired sessions,
    /// publishes `$SYS` statistics.
    pub fn tick(&mut self, now: u64) {
        let late: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.keep_alive_ms > 0 && c.phase != Phase::Closing && now >= c.last_rx + c.keep_alive_ms * 3 / 2
            })
            .map(|(&id, _)| id)
            .collect();
        for conn in late {
            self.end_connection(conn, refuse(reason::KEEP_ALIVE_TIMEOUT, "keep alive timeout"), now);
        }
        let silent: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.phase == Phase::AwaitingConnect && now >= c.opened_at + self.config.connect_timeout_ms)
            .map(|(&id, _)| id)
            .collect();
        for conn in silent {
            self.close(conn);
        }
        let due: Vec<SessionKey> =
            self.sessions.iter().filter(|(_, s)| s.will_at.is_some_and(|t| now >= t)).map(|(&k, _)| k).collect();
        for key in due {
            self.fire_will(key, now);
        }
        let expired: Vec<SessionKey> =
            self.sessions.iter().filter(|(_, s)| session_end(s).is_some_and(|t| now >= t)).map(|(&k, _)| k).collect();
        for key in expired {
            self.fire_will(key, now);
            self.remove_session(key);
        }
        self.retained.retain(|_, m| m.expires_at.is_none_or(|t| now < t));
        if self.config.sys_interval_ms > 0 && now >= self.next_sys_at {
            self.next_sys_at = now + self.config.sys_interval_ms;
            self.publish_sys(now);
        }
    }

    // ----- packet handling ---------------------------------------------------

    fn decode_failed(&mut self, conn: ConnId, error: DecodeError, connected: bool) {
        self.stats.protocol_errors += 1;
        let code = match error {
            DecodeError::TooLarge => reason::PACKET_TOO_LARGE,
            DecodeError::Protocol(_) => reason::PROTOCOL_ERROR,
            DecodeError::UnsupportedProtocol => reason::UNSUPPORTED_PROTOCOL_VERSION,
            _ => reason::MALFORMED_PACKET,
        };
        if !connected && error == DecodeError::UnsupportedProtocol {
            // A CONNECT with a level we do not speak: answer in 3.1.1 form,
            // which every client version can read (3.1.1 section 3.1.2.2).
            self.send(
                conn,
                Version::V3_1_1,
                &connack(false, v3_return::UNACCEPTABLE_PROTOCOL_VERSION, Properties::default()),
            );
            self.close(conn);
            return;
        }
        if connected {
            self.end_connection(conn, refuse(code, "malformed or invalid packet"), 0);
        } else {
            self.close(conn);
        }
    }

    fn handle(&mut self, conn: ConnId, packet: Packet, now: u64) {
        let Some(c) = self.conns.get(&conn) else { return };
        let key = match (&c.phase, &packet) {
            (Phase::Connected(key), _) => *key,
            (Phase::AwaitingConnect, Packet::Connect(_)) => {
                let Packet::Connect(connect) = packet else { return };
                return self.handle_connect(conn, *connect, now);
            }
            (Phase::AwaitingConnect, _) => {
                // Anything before CONNECT: close without a word (3.1.1 3.1.0-1).
                self.stats.protocol_errors += 1;
                return self.close(conn);
            }
            (Phase::Closing, _) => return,
        };
        let result = match packet {
            Packet::Connect(_) => Err(refuse(reason::PROTOCOL_ERROR, "second CONNECT")),
            Packet::Publish(p) => self.handle_publish(conn, key, p, now),
            Packet::Puback(a) => self.handle_ack(key, a.packet_id, Awaiting::Puback, now),
            Packet::Pubrec(a) => self.handle_pubrec(conn, key, a, now),
            Packet::Pubcomp(a) => self.handle_ack(key, a.packet_id, Awaiting::Pubcomp, now),
            Packet::Pubrel(a) => self.handle_pubrel(conn, key, a),
            Packet::Subscribe(s) => self.handle_subscribe(conn, key, s, now),
            Packet::Unsubscribe(u) => self.handle_unsubscribe(conn, key, u),
            Packet::Pingreq => {
                self.send_to(conn, &Packet::Pingresp);
                Ok(())
            }
            Packet::Disconnect { code, properties } => self.handle_disconnect(conn, key, code, properties, now),
            Packet::Auth { .. } => Err(refuse(reason::PROTOCOL_ERROR, "AUTH without an authentication method")),
            // Server-to-client packets never decode from a client.
            _ => Err(refuse(reason::PROTOCOL_ERROR, "unexpected packet")),
        };
        if let Err(refusal) = result {
            self.stats.protocol_errors += 1;
            self.end_connection(conn, refusal, now);
        }
    }

    fn handle_connect(&mut self, conn: ConnId, connect: Connect, now: u64) {
        let version = connect.version;
        let v5 = version == Version::V5;
        if let Some(c) = self.conns.get_mut(&conn) {
            c.version = version;
        }
        let refuse_connect = |broker: &mut Broker, v5_code: u8, v3_code: u8| {
            broker.stats.connections_refused += 1;
            let code = if v5 { v5_code } else { v3_code };
            broker.send(conn, version, &connack(false, code, Properties::default()));
            broker.close(conn);
        };
        let connected = self.conns.values().filter(|c| matches!(c.phase, Phase::Connected(_))).count();
        if connected >= self.config.max_connections {
            return refuse_connect(self, reason::SERVER_BUSY, v3_return::SERVER_UNAVAILABLE);
        }
        if v5 && connect.properties.authentication_method.is_some() {
            // No authentication methods are configured (MQTT 5 4.12).
            return refuse_connect(self, reason::BAD_AUTHENTICATION_METHOD, v3_return::NOT_AUTHORIZED);
        }
        let user = connect.username.as_deref();
        let authenticated = match (&self.config.passwords, user) {
            (_, None) => self.config.allow_anonymous,
            (Some(passwords), Some(name)) => connect.password.as_deref().is_some_and(|pw| passwords.verify(name, pw)),
            // A user name but no password file: nothing to check it against.
            (None, Some(_)) => self.config.allow_anonymous,
        };
        if !authenticated {
            let bad_credentials = user.is_some();
            return if bad_credentials {
                refuse_connect(self, reason::BAD_USER_NAME_OR_PASSWORD, v3_return::BAD_USER_NAME_OR_PASSWORD)
            } else {
                refuse_connect(self, reason::NOT_AUTHORIZED, v3_return::NOT_AUTHORIZED)
            };
        }
        if let Some(will) = &connect.will {
            if !self.acl_allows(user, &connect.client_id, Want::Publish, &will.topic) {
                return refuse_connect(self, reason::NOT_AUTHORIZED, v3_return::NOT_AUTHORIZED);
            }
            if topic::validate_name(&will.topic, self.config.topic_limits).is_err() {
                return refuse_connect(self, reason::TOPIC_NAME_INVALID, v3_return::NOT_AUTHORIZED);
            }
            if will.qos > self.config.max_qos {
                return refuse_connect(self, reason::QOS_NOT_SUPPORTED, v3_return::NOT_AUTHORIZED);
            }
            if will.retain && !self.config.retain_available {
                return refuse_connect(self, reason::RETAIN_NOT_SUPPORTED, v3_return::NOT_AUTHORIZED);
            }
        }
        let mut assigned = None;
        let client_id = if connect.client_id.is_empty() {
            if !v5 && !connect.clean_start {
                // 3.1.1 3.1.3-8: a zero-length id needs a clean session.
                return refuse_connect(self, reason::CLIENT_IDENTIFIER_NOT_VALID, v3_return::IDENTIFIER_REJECTED);
            }
            let id = format!("mqvisor-{}", self.next_assigned_id);
            self.next_assigned_id += 1;
            if v5 {
                assigned = Some(id.clone());
            }
            id
        } else {
            connect.client_id.clone()
        };
        let expiry = if v5 {
            connect.properties.session_expiry_interval.unwrap_or(0).min(self.config.max_session_expiry)
        } else if connect.clean_start {
            0
        } else {
            self.config.max_session_expiry
        };

        // Session take-over: the old connection goes (MQTT 5 3.1.4-3).
        let existing = self.by_client_id.get(&client_id).copied();
        if let Some(old) = existing.and_then(|k| self.sessions.get(&k)).and_then(|s| s.conn) {
            self.end_connection(old, refuse(reason::SESSION_TAKEN_OVER, "session taken over"), now);
        }
        let mut session_present = false;
        let key = match existing {
            Some(key) if !connect.clean_start && self.sessions.contains_key(&key) => {
                session_present = true;
                key
            }
            Some(key) => {
                self.fire_will(key, now);
                self.remove_session(key);
                self.new_session(&client_id, version)
            }
            None => self.new_session(&client_id, version),
        };
        let keep_alive = self.config.server_keep_alive.filter(|_| v5).unwrap_or(connect.keep_alive);
        if let Some(s) = self.sessions.get_mut(&key) {
            s.conn = Some(conn);
            s.version = version;
            s.expiry = expiry;
            s.disconnected_at = None;
            // A reconnect before a delayed will fires cancels it (MQTT 5 3.1.3.2.2).
            s.will_at = None;
            s.will = connect.will;
            s.username = connect.username.clone();
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.phase = Phase::Connected(key);
            c.keep_alive_ms = u64::from(keep_alive) * 1000;
            c.client_max_packet = connect.properties.maximum_packet_size.map_or(usize::MAX, |m| m as usize);
            c.client_receive_max = connect.properties.receive_maximum.unwrap_or(u16::MAX);
            c.client_alias_max = connect.properties.topic_alias_maximum.unwrap_or(0);
            c.username = connect.username.clone();
            c.client_id = client_id.clone();
            c.problem_information = connect.properties.request_problem_information != Some(0);
        }
        let mut props = Properties::default();
        if v5 {
            props.assigned_client_identifier = assigned;
            props.receive_maximum = Some(self.config.receive_maximum);
            props.maximum_packet_size = u32::try_from(self.config.max_packet_size).ok();
            props.topic_alias_maximum = Some(self.config.topic_alias_maximum);
            if !self.config.retain_available {
                props.retain_available = Some(0);
            }
            if self.config.max_qos < QoS::ExactlyOnce {
                props.maximum_qos = Some(self.config.max_qos as u8);
            }
            if let Some(ka) = self.config.server_keep_alive {
                props.server_keep_alive = Some(ka);
            }
            if connect.properties.session_expiry_interval.is_some_and(|e| e > expiry) {
                props.session_expiry_interval = Some(expiry);
            }
            if connect.properties.request_response_information == Some(1) {
                // A per-client prefix for response topics (MQTT 5 4.10).
                props.response_information = Some(format!("response/{client_id}/"));
            }
        }
        let code = if v5 { reason::SUCCESS } else { v3_return::ACCEPTED };
        self.send_to(conn, &connack(session_present, code, props));
        // Resume: unacknowledged messages again (DUP), then the queue.
        self.resend_inflight(key, conn);
        self.pump(key, now);
    }

    fn new_session(&mut self, client_id: &str, version: Version) -> SessionKey {
        let key = self.next_session;
        self.next_session += 1;
        self.sessions.insert(
            key,
            Session {
                client_id: client_id.to_string(),
                conn: None,
                version,
                expiry: 0,
                disconnected_at: None,
                filters: BTreeSet::new(),
                next_packet_id: 1,
                inflight: BTreeMap::new(),
                incoming_qos2: BTreeSet::new(),
                queue: VecDeque::new(),
                will: None,
                will_at: None,
                username: None,
            },
        );
        self.by_client_id.insert(client_id.to_string(), key);
        key
    }

    fn handle_publish(&mut self, conn: ConnId, key: SessionKey, mut p: Publish, now: u64) -> Result<(), Refusal> {
        let c = self.conns.get_mut(&conn).ok_or(refuse(reason::UNSPECIFIED_ERROR, "no connection"))?;
        let v5 = c.version == Version::V5;
        if let Some(alias) = p.properties.topic_alias.take() {
            if alias == 0 || alias > self.config.topic_alias_maximum {
                return Err(refuse(reason::TOPIC_ALIAS_INVALID, "topic alias out of range"));
            }
            if p.topic.is_empty() {
                p.topic = c
                    .inbound_aliases
                    .get(&alias)
                    .cloned()
                    .ok_or(refuse(reason::PROTOCOL_ERROR, "unknown topic alias"))?;
            } else {
                c.inbound_aliases.insert(alias, p.topic.clone());
            }
        }
        if topic::validate_name(&p.topic, self.config.topic_limits).is_err() {
            return Err(refuse(reason::TOPIC_NAME_INVALID, "invalid topic name"));
        }
        if p.qos > self.config.max_qos {
            return Err(refuse(reason::QOS_NOT_SUPPORTED, "QoS not supported"));
        }
        if p.retain && !self.config.retain_available {
            return Err(refuse(reason::RETAIN_NOT_SUPPORTED, "retain not supported"));
        }
        self.stats.messages_received += 1;
        // Clients may not publish into the broker's own namespace.
        let allowed = !p.topic.starts_with("$SYS") && self.conn_allows(conn, Want::Publish, &p.topic);
        let session = self.sessions.get_mut(&key).ok_or(refuse(reason::UNSPECIFIED_ERROR, "no session"))?;
        match (p.qos, p.packet_id) {
            (QoS::AtMostOnce, _) => {
                if allowed {
                    self.accept_publish(key, p, now);
                }
            }
            (QoS::AtLeastOnce, Some(id)) => {
                let delivered = if allowed { self.accept_publish(key, p, now) } else { 0 };
                let code = ack_code(allowed, delivered);
                self.send_to(conn, &Packet::Puback(ack(id, if v5 { code } else { 0 })));
            }
            (QoS::ExactlyOnce, Some(id)) => {
                if session.incoming_qos2.contains(&id) {
                    // A retransmission: acknowledged again, delivered once.
                    self.send_to(conn, &Packet::Pubrec(ack(id, 0)));
                    return Ok(());
                }
                if session.incoming_qos2.len() >= usize::from(self.config.receive_maximum) {
                    return Err(refuse(reason::RECEIVE_MAXIMUM_EXCEEDED, "receive maximum exceeded"));
                }
                let delivered = if allowed {
                    session.incoming_qos2.insert(id);
                    self.accept_publish(key, p, now)
                } else {
                    0
                };
                let code = ack_code(allowed, delivered);
                self.send_to(conn, &Packet::Pubrec(ack(id, if v5 { code } else { 0 })));
            }
            _ => return Err(refuse(reason::MALFORMED_PACKET, "QoS > 0 without packet identifier")),
        }
        Ok(())
    }

    /// Stores a retained message and routes `p`; returns how many sessions got it.
    fn accept_publish(&mut self, from: SessionKey, p: Publish, now: u64) -> usize {
        let expires_at = p.properties.message_expiry_interval.map(|s| now + u64::from(s) * 1000);
        if p.retain {
            if p.payload.is_empty() {
                self.retained.remove(&p.topic);
            } else {
                self.retained.insert(p.topic.clone(), Queued { publish: p.clone(), expires_at });
            }
        }
        self.route(Some(from), &p, expires_at, now)
    }

    /// Delivers `p` to every matching session; returns how many.
    fn route(&mut self, from: Option<SessionKey>, p: &Publish, expires_at: Option<u64>, now: u64) -> usize {
        // One delivery per session: the highest QoS among its matching
        // subscriptions, with all their identifiers (MQTT 5 3.3.4).
        let mut targets: BTreeMap<SessionKey, (QoS, bool, Vec<u32>)> = BTreeMap::new();
        let mut shared: BTreeMap<String, Vec<Subscription>> = BTreeMap::new();
        self.index.for_each_match(&p.topic, |s| {
            if let Some(group) = &s.share_group {
                shared.entry(group.clone()).or_default().push(s.clone());
                return;
            }
            if s.options.no_local && Some(s.session) == from {
                return;
            }
            let entry = targets.entry(s.session).or_insert((QoS::AtMostOnce, false, Vec::new()));
            entry.0 = entry.0.max(s.options.qos);
            entry.1 |= s.options.retain_as_published;
            entry.2.extend(s.identifier);
        });
        for (group, mut members) in shared {
            members.sort_by_key(|s| s.session);
            members.dedup_by_key(|s| s.session);
            let cursor = self.share_cursor.entry(group).or_insert(0);
            let chosen = &members[*cursor % members.len()];
            *cursor = cursor.wrapping_add(1);
            let entry = targets.entry(chosen.session).or_insert((QoS::AtMostOnce, false, Vec::new()));
            entry.0 = entry.0.max(chosen.options.qos);
            entry.2.extend(chosen.identifier);
        }
        let count = targets.len();
        for (session, (sub_qos, retain_as_published, ids)) in targets {
            // Read access is checked per message too, as Mosquitto does: an
            // ACL changed after subscribing, or a wide filter, does not leak.
            let readable = match (&self.config.acl, self.sessions.get(&session)) {
                (Some(acl), Some(s)) => acl.allows(s.username.as_deref(), &s.client_id, Want::Subscribe, &p.topic),
                _ => true,
            };
            if !readable {
                continue;
            }
            let mut out = p.clone();
            out.qos = p.qos.min(sub_qos);
            out.retain = retain_as_published && p.retain;
            out.dup = false;
            out.properties.topic_alias = None;
            out.properties.subscription_identifiers = ids;
            self.deliver(session, out, expires_at, now);
        }
        count
    }

    /// Queues `p` for `key` and moves what the window allows.
    fn deliver(&mut self, key: SessionKey, p: Publish, expires_at: Option<u64>, now: u64) {
        let Some(session) = self.sessions.get_mut(&key) else { return };
        let online = session.conn.is_some();
        if p.qos == QoS::AtMostOnce && !online {
            // QoS 0 is not stored for offline sessions; for a slow online
            // one it waits in the (bounded) queue like any other message.
            self.stats.messages_dropped += 1;
            return;
        }
        if session.queue.len() >= self.config.max_queued_messages {
            self.stats.messages_dropped += 1;
            return;
        }
        session.queue.push_back(Queued { publish: p, expires_at });
        if online {
            self.pump(key, now);
        }
    }

    /// Moves queued messages to the connection while the inflight window and
    /// the output bound allow.
    fn pump(&mut self, key: SessionKey, now: u64) {
        let Some(session) = self.sessions.get_mut(&key) else { return };
        let Some(conn) = session.conn else { return };
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let window = usize::from(self.config.max_inflight.min(c.client_receive_max));
        while c.out.len() < self.config.max_pending_output {
            let Some(front) = session.queue.front() else { break };
            if front.publish.qos != QoS::AtMostOnce && session.inflight.len() >= window {
                break;
            }
            let Some(Queued { mut publish, expires_at }) = session.queue.pop_front() else { break };
            if let Some(t) = expires_at {
                if now >= t {
                    continue; // Expired while waiting (MQTT 5 3.3.2.3.3).
                }
                publish.properties.message_expiry_interval =
                    Some(u32::try_from((t - now).div_ceil(1000)).unwrap_or(u32::MAX));
            }
            if publish.qos != QoS::AtMostOnce {
                let id = next_free_id(session);
                publish.packet_id = Some(id);
                let state = if publish.qos == QoS::AtLeastOnce { Awaiting::Puback } else { Awaiting::Pubrec };
                session.inflight.insert(id, Outgoing { publish: publish.clone(), state });
            } else {
                publish.packet_id = None;
            }
            if packet::publish_len(&publish, c.version) > c.client_max_packet {
                // Too big for this client: dropped as if sent (MQTT 5 3.1.2.25).
                if let Some(id) = publish.packet_id {
                    session.inflight.remove(&id);
                }
                self.stats.messages_dropped += 1;
                continue;
            }
            apply_outbound_alias(c, &mut publish);
            packet::encode(&Packet::Publish(publish), c.version, &mut c.out);
            self.stats.messages_sent += 1;
            self.dirty.insert(conn);
        }
    }

    fn resend_inflight(&mut self, key: SessionKey, conn: ConnId) {
        let Some(session) = self.sessions.get(&key) else { return };
        let Some(c) = self.conns.get_mut(&conn) else { return };
        c.outbound_aliases.clear();
        for (&id, out) in &session.inflight {
            let packet = match out.state {
                Awaiting::Puback | Awaiting::Pubrec => {
                    let mut p = out.publish.clone();
                    p.dup = true;
                    p.properties.topic_alias = None;
                    Packet::Publish(p)
                }
                Awaiting::Pubcomp => Packet::Pubrel(ack(id, 0)),
            };
            packet::encode(&packet, c.version, &mut c.out);
        }
        if !session.inflight.is_empty() {
            self.dirty.insert(conn);
        }
    }

    fn handle_ack(&mut self, key: SessionKey, id: u16, expected: Awaiting, now: u64) -> Result<(), Refusal> {
        let session = self.sessions.get_mut(&key).ok_or(refuse(reason::UNSPECIFIED_ERROR, "no session"))?;
        // An unknown id is ignored: a late duplicate after a resend.
        if session.inflight.get(&id).is_some_and(|out| out.state == expected) {
            session.inflight.remove(&id);
            self.pump(key, now);
        }
        Ok(())
    }

    fn handle_pubrec(&mut self, conn: ConnId, key: SessionKey, a: Ack, now: u64) -> Result<(), Refusal> {
        let session = self.sessions.get_mut(&key).ok_or(refuse(reason::UNSPECIFIED_ERROR, "no session"))?;
        let known = match session.inflight.get_mut(&a.packet_id) {
            Some(out) if out.state != Awaiting::Puback => {
                if a.code >= 0x80 {
                    // The receiver refused the message: the flow ends here.
                    session.inflight.remove(&a.packet_id);
                    self.pump(key, now);
                    return Ok(());
                }
                out.state = Awaiting::Pubcomp;
                true
            }
            _ => false,
        };
        let code = if known { 0 } else { reason::PACKET_IDENTIFIER_NOT_FOUND };
        let v5 = self.conns.get(&conn).is_some_and(|c| c.version == Version::V5);
        self.send_to(conn, &Packet::Pubrel(ack(a.packet_id, if v5 { code } else { 0 })));
        Ok(())
    }

    fn handle_pubrel(&mut self, conn: ConnId, key: SessionKey, a: Ack) -> Result<(), Refusal> {
        let session = self.sessions.get_mut(&key).ok_or(refuse(reason::UNSPECIFIED_ERROR, "no session"))?;
        let known = session.incoming_qos2.remove(&a.packet_id);
        let v5 = self.conns.get(&conn).is_some_and(|c| c.version == Version::V5);
        let code = if known || !v5 { 0 } else { reason::PACKET_IDENTIFIER_NOT_FOUND };
        self.send_to(conn, &Packet::Pubcomp(ack(a.packet_id, code)));
        Ok(())
    }

    fn handle_subscribe(&mut self, conn: ConnId, key: SessionKey, s: Subscribe, now: u64) -> Result<(), Refusal> {
        let v5 = self.conns.get(&conn).is_some_and(|c| c.version == Version::V5);
        let identifier = s.properties.subscription_identifiers.first().copied();
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut retained_to_send = Vec::new();
        for (raw, options) in &s.filters {
            let parsed = match topic::parse_filter(raw, self.config.topic_limits) {
                Ok(parsed) => parsed,
                Err(_) => {
                    codes.push(if v5 { reason::TOPIC_FILTER_INVALID } else { reason::UNSPECIFIED_ERROR });
                    continue;
                }
            };
            if !self.conn_allows(conn, Want::Subscribe, parsed.filter) {
                codes.push(if v5 { reason::NOT_AUTHORIZED } else { reason::UNSPECIFIED_ERROR });
                continue;
            }
            let session = self.sessions.get_mut(&key).ok_or(refuse(reason::UNSPECIFIED_ERROR, "no session"))?;
            if parsed.share_group.is_some() && options.no_local {
                // MQTT 5 3.8.3-4: no local on a shared subscription is a protocol error.
                return Err(refuse(reason::PROTOCOL_ERROR, "no local on a shared subscription"));
            }
            if !session.filters.contains(raw.as_str())
                && session.filters.len() >= self.config.max_subscriptions_per_client
            {
                codes.push(if v5 { reason::QUOTA_EXCEEDED } else { reason::UNSPECIFIED_ERROR });
                continue;
            }
            let mut granted = *options;
            granted.qos = options.qos.min(self.config.max_qos);
            let subscription = Subscription {
                session: key,
                options: granted,
                identifier,
                share_group: parsed.share_group.map(|_| raw.clone()),
            };
            let existed = self.index.insert(parsed, subscription);
            session.filters.insert(raw.clone());
            codes.push(granted.qos as u8);
            let wants_retained = match granted.retain_handling {
                0 => true,
                1 => !existed,
                _ => false,
            };
            if wants_retained && parsed.share_group.is_none() {
                for (name, message) in &self.retained {
                    if topic::matches(parsed.filter, name) {
                        let mut p = message.publish.clone();
                        p.qos = p.qos.min(granted.qos);
                        // Retained messages keep retain = 1 on subscribe (3.3.1.3).
                        p.retain = true;
                        p.dup = false;
                        p.properties.subscription_identifiers = identifier.into_iter().collect();
                        retained_to_send.push((p, message.expires_at));
                    }
                }
            }
        }
        self.send_to(conn, &Packet::Suback { packet_id: s.packet_id, properties: Properties::default(), codes });
        for (p, expires_at) in retained_to_send {
            self.deliver(key, p, expires_at, now);
        }
        Ok(())
    }

    fn handle_unsubscribe(&mut self, conn: ConnId, key: SessionKey, u: Unsubscribe) -> Result<(), Refusal> {
        let mut codes = Vec::with_capacity(u.filters.len());
        for raw in &u.filters {
            let removed = match topic::parse_filter(raw, self.config.topic_limits) {
                Ok(parsed) => self.index.remove(parsed, key),
                Err(_) => false,
            };
            if let Some(session) = self.sessions.get_mut(&key) {
                session.filters.remove(raw.as_str());
            }
            codes.push(if removed { reason::SUCCESS } else { reason::NO_SUBSCRIPTION_EXISTED });
        }
        self.send_to(conn, &Packet::Unsuback { packet_id: u.packet_id, properties: Properties::default(), codes });
        Ok(())
    }

    fn handle_disconnect(
        &mut self,
        conn: ConnId,
        key: SessionKey,
        code: u8,
        props: Properties,
        now: u64,
    ) -> Result<(), Refusal> {
        if let Some(requested) = props.session_expiry_interval {
            let session = self.sessions.get_mut(&key).ok_or(refuse(reason::UNSPECIFIED_ERROR, "no session"))?;
            if session.expiry == 0 && requested != 0 {
                // MQTT 5 3.14.2.2.2: cannot turn a 0 expiry into a non-zero one.
                return Err(refuse(reason::PROTOCOL_ERROR, "session expiry raised at DISCONNECT"));
            }
            session.expiry = requested.min(self.config.max_session_expiry);
        }
        // "Disconnect with Will Message" keeps the will; anything else drops it.
        let graceful = code != reason::DISCONNECT_WITH_WILL;
        self.close(conn);
        self.detach(key, conn, graceful, now);
        Ok(())
    }

    fn acl_allows(&self, user: Option<&str>, client_id: &str, want: Want, topic: &str) -> bool {
        self.config.acl.as_ref().is_none_or(|acl| acl.allows(user, client_id, want, topic))
    }

    fn conn_allows(&self, conn: ConnId, want: Want, topic: &str) -> bool {
        let Some(c) = self.conns.get(&conn) else { return false };
        self.acl_allows(c.username.as_deref(), &c.client_id, want, topic)
    }

    // ----- ending things ------------------------------------------------------

    /// Server-side end of a connection: v5 clients get a DISCONNECT with the
    /// reason; the will is published as for a lost connection.
    fn end_connection(&mut self, conn: ConnId, refusal: Refusal, now: u64) {
        let Some(c) = self.conns.get(&conn) else { return };
        let connected = match c.phase {
            Phase::Connected(key) => Some(key),
            _ => None,
        };
        if c.version == Version::V5 {
            // A reason string helps the operator, unless the client asked for
            // none (Request Problem Information = 0, MQTT 5 3.1.2.11.7).
            let reason_string = c.problem_information.then(|| String::from(refusal.why));
            let properties = Properties { reason_string, ..Properties::default() };
            self.send_to(conn, &Packet::Disconnect { code: refusal.code, properties });
        }
        self.close(conn);
        if let Some(key) = connected {
            self.detach(key, conn, false, now);
        }
    }

    /// Detaches the session from its connection: will, expiry.
    fn detach(&mut self, key: SessionKey, conn: ConnId, graceful: bool, now: u64) {
        let Some(session) = self.sessions.get_mut(&key) else { return };
        if session.conn != Some(conn) {
            return; // Already taken over by a newer connection.
        }
        session.conn = None;
        session.disconnected_at = Some(now);
        if graceful {
            session.will = None;
        }
        let delay = session.will.as_ref().and_then(|w| w.properties.will_delay_interval).unwrap_or(0);
        if session.will.is_some() {
            session.will_at = Some(now + u64::from(delay) * 1000);
        }
        if session.expiry == 0 {
            self.fire_will(key, now);
            self.remove_session(key);
        } else if delay == 0 {
            self.fire_will(key, now);
        }
    }

    fn fire_will(&mut self, key: SessionKey, now: u64) {
        let Some(session) = self.sessions.get_mut(&key) else { return };
        session.will_at = None;
        let Some(will) = session.will.take() else { return };
        let mut properties = will.properties;
        properties.will_delay_interval = None;
        let p = Publish {
            dup: false,
            qos: will.qos,
            retain: will.retain,
            topic: Arc::from(will.topic.as_str()),
            packet_id: None,
            properties,
            payload: Arc::from(will.payload.as_slice()),
        };
        self.accept_publish(key, p, now);
    }

    fn remove_session(&mut self, key: SessionKey) {
        let Some(session) = self.sessions.remove(&key) else { return };
        for raw in &session.filters {
            if let Ok(parsed) = topic::parse_filter(raw, self.config.topic_limits) {
                self.index.remove(parsed, key);
            }
        }
        if self.by_client_id.get(&session.client_id) == Some(&key) {
            self.by_client_id.remove(&session.client_id);
        }
    }

    /// Asks the runner to close `conn` (once); its input is ignored from now on.
    fn close(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get_mut(&conn).filter(|c| c.phase != Phase::Closing) {
            c.phase = Phase::Closing;
            self.events.push_back(Event::Close(conn));
        }
    }

    // ----- output --------------------------------------------------------------

    fn send(&mut self, conn: ConnId, version: Version, packet: &Packet) {
        if let Some(c) = self.conns.get_mut(&conn) {
            packet::encode(packet, version, &mut c.out);
            self.dirty.insert(conn);
        }
    }

    fn send_to(&mut self, conn: ConnId, packet: &Packet) {
        let Some(version) = self.conns.get(&conn).map(|c| c.version) else { return };
        self.send(conn, version, packet);
    }

    fn publish_sys(&mut self, now: u64) {
        let uptime = (now - self.started_at.unwrap_or(now)) / 1000;
        let connected = self.sessions.values().filter(|s| s.conn.is_some()).count();
        let stats = self.stats;
        let entries = [
            ("$SYS/broker/version", format!("mqvisor {}", env!("CARGO_PKG_VERSION"))),
            ("$SYS/broker/uptime", format!("{uptime} seconds")),
            ("$SYS/broker/clients/connected", connected.to_string()),
            ("$SYS/broker/clients/total", self.sessions.len().to_string()),
            ("$SYS/broker/subscriptions/count", self.index.len().to_string()),
            ("$SYS/broker/retained messages/count", self.retained.len().to_string()),
            ("$SYS/broker/messages/received", stats.messages_received.to_string()),
            ("$SYS/broker/messages/sent", stats.messages_sent.to_string()),
            ("$SYS/broker/messages/dropped", stats.messages_dropped.to_string()),
            ("$SYS/broker/bytes/received", stats.bytes_received.to_string()),
            ("$SYS/broker/bytes/sent", stats.bytes_sent.to_string()),
        ];
        for (name, value) in entries {
            let p = Publish {
                dup: false,
                qos: QoS::AtMostOnce,
                retain: true,
                topic: Arc::from(name),
                packet_id: None,
                properties: Properties::default(),
                payload: Arc::from(value.as_bytes()),
            };
            self.retained.insert(p.topic.clone(), Queued { publish: p.clone(), expires_at: None });
            self.route(None, &p, None, now);
        }
    }
}

/// When a disconnected session ends, if it does.
fn session_end(s: &Session) -> Option<u64> {
    let at = s.disconnected_at?;
    (s.expiry != u32::MAX).then(|| at + u64::from(s.expiry) * 1000)
}

fn ack(packet_id: u16, code: u8) -> Ack {
    Ack { packet_id, code, properties: Properties::default() }
}

fn ack_code(allowed: bool, delivered: usize) -> u8 {
    match (allowed, delivered) {
        (false, _) => reason::NOT_AUTHORIZED,
        (true, 0) => reason::NO_MATCHING_SUBSCRIBERS,
        _ => reason::SUCCESS,
    }
}

fn connack(session_present: bool, code: u8, properties: Properties) -> Packet {
    Packet::Connack(Connack { session_present, code, properties })
}

/// The next packet identifier not in flight (1..=65535, wrapping).
fn next_free_id(session: &mut Session) -> u16 {
    // The window is far smaller than 65535, so a free id is always found.
    loop {
        let id = session.next_packet_id;
        session.next_packet_id = session.next_packet_id.checked_add(1).unwrap_or(1);
        if !session.inflight.contains_key(&id) {
            return id;
        }
    }
}

/// Uses a topic alias towards a v5 client that accepts them: the first
/// message on a topic sets the alias, later ones send it with an empty topic.
fn apply_outbound_alias(c: &mut Conn, publish: &mut Publish) {
    if c.client_alias_max == 0 || publish.dup {
        return;
    }
    if let Some(&alias) = c.outbound_aliases.get(&publish.topic) {
        publish.properties.topic_alias = Some(alias);
        publish.topic = Arc::from("");
    } else if let Some(next) = u16::try_from(c.outbound_aliases.len() + 1).ok().filter(|&n| n <= c.client_alias_max) {
        c.outbound_aliases.insert(publish.topic.clone(), next);
        publish.properties.topic_alias = Some(next);
    }
}
