//! The broker: the runner-facing API and the dispatcher that hands each
//! decoded packet to the module that owns it (MQTT 3.1.1 and 5.0, sections
//! 3 and 4).
//!
//! Sans-I/O, in the quinn-proto style. The runner calls, in any order:
//! - [`Broker::open`] when a transport connection is accepted,
//! - [`Broker::receive`] with bytes from it,
//! - [`Broker::input_ended`] when the peer has finished sending (FIN),
//! - [`Broker::closed`] when the peer has gone,
//! - [`Broker::tick`] when [`Broker::next_deadline`] has passed;
//!
//! and after any of them [`Broker::poll_transmit`], the one output call: it
//! offers each connection's pending bytes, and asks for a close once a
//! connection the broker ended has sent everything. Time is milliseconds,
//! passed in: from any origin without durable state, Unix time with it
//! (times in the log are compared after a restart). Nothing here blocks,
//! reads a clock, or grows without a configured bound.
//!
//! The parts: [`config`] (settings and their check), [`connection`]
//! (per-connection state), [`connect`] (admission and CONNACK), [`session`]
//! (session life), [`subscribe`], [`delivery`] (publish, route, queue,
//! acknowledge), [`sys`] (counters and `$SYS`), [`reason`] (codes).

mod config;
mod connect;
mod connection;
mod delivery;
mod journal;
mod output;
pub mod reason;
mod retained;
mod session;
mod shares;
mod subscribe;
mod sys;

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::string::String;
use alloc::vec::Vec;

pub use config::{Config, ConfigError, MAX_PACKET_SIZE_LIMIT, MIN_PACKET_SIZE};
pub use sys::Stats;

use crate::auth::Want;
use crate::packet::{self, Packet, Version};
use crate::properties::Properties;
use crate::subscriptions::{SessionKey, SubscriptionIndex};
use crate::wire::DecodeError;
use connection::{Conn, Phase};
use retained::Retained;
use session::{Awaiting, Session};
use shares::SharedGroups;

/// A transport connection, numbered by the runner.
pub type ConnId = u64;

/// What [`Broker::poll_transmit`] asks of the runner for one connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Transmit<'a> {
    /// Send these bytes, in order; answer how many were taken (0 when there
    /// is no room now: they are offered again on the next call).
    Bytes(&'a [u8]),
    /// Everything is sent: close the transport connection (FIN). The broker
    /// has already forgotten it; do not call [`Broker::closed`] for it.
    Close,
}

/// A buffer holding `rest`, the start of a packet, with room for the whole
/// packet once its length is known (bounded by the maximum packet size,
/// which `packet::frame` enforces before the body arrives); `None` when the
/// heap has no room for it.
fn packet_start(rest: &[u8], max_packet_size: usize) -> Option<Vec<u8>> {
    let total = packet::announced_len(rest).unwrap_or(rest.len()).clamp(rest.len(), max_packet_size.max(rest.len()));
    let mut inbuf = Vec::new();
    inbuf.try_reserve_exact(total).ok()?;
    inbuf.extend_from_slice(rest);
    Some(inbuf)
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
    retained: Retained,
    shares: SharedGroups,
    /// Connections with output or a close for the runner.
    ready: BTreeSet<ConnId>,
    stats: Stats,
    next_session: SessionKey,
    next_assigned_id: u64,
    started_at: Option<u64>,
    next_sys_at: u64,
    /// The runner says memory is low: refuse what would hold more.
    memory_low: bool,
    /// The earliest deadline as last computed, or `None` once something
    /// may have made a deadline earlier. Packets that only move deadlines
    /// later (a client's traffic) leave it: a tick that finds nothing due
    /// recomputes it. So the hot path never scans every connection.
    deadline: Option<Option<u64>>,
    /// Connections in the Connected phase (the `max_connections` count).
    connected: usize,
    /// Records of durable state changes not yet taken by the runner;
    /// `None` when nothing is kept (see [`journal`]).
    journal: Option<Vec<crate::store::record::Record>>,
    /// Messages read back from the log, by session, until
    /// [`Broker::finish_restore`] queues them.
    restoring: BTreeMap<SessionKey, BTreeMap<u64, journal::Restoring>>,
    /// Retained-message changes read back from the log, in order, until
    /// [`Broker::finish_restore`] builds the store from them at once.
    restoring_retained: Vec<(alloc::sync::Arc<str>, Option<session::Queued>)>,
    /// The runner cannot keep state: refuse what would need it.
    store_failed: bool,
    /// How to undo what clients' publishes changed with records not yet
    /// taken by the runner, and with those it took last (see [`journal`]).
    unsettled: Vec<journal::Unsettled>,
    withdrawable: Vec<journal::Unsettled>,
    /// The changes of the client publish being accepted, while one is.
    tracking: Option<Vec<journal::Unsettled>>,
    /// Restored sessions that were connected when the broker stopped: they
    /// lost their connection at the restart, logged once the journal starts.
    lost_at_restart: Vec<SessionKey>,
}

impl Broker {
    /// A broker with `config`, which the runner has checked with
    /// [`Config::validate`].
    pub fn new(config: Config) -> Broker {
        Broker {
            config,
            conns: BTreeMap::new(),
            sessions: BTreeMap::new(),
            by_client_id: BTreeMap::new(),
            index: SubscriptionIndex::default(),
            retained: Retained::default(),
            shares: SharedGroups::default(),
            ready: BTreeSet::new(),
            stats: Stats::default(),
            next_session: 1,
            next_assigned_id: 1,
            started_at: None,
            next_sys_at: 0,
            memory_low: false,
            deadline: None,
            connected: 0,
            journal: None,
            restoring: BTreeMap::new(),
            restoring_retained: Vec::new(),
            store_failed: false,
            unsettled: Vec::new(),
            withdrawable: Vec::new(),
            tracking: None,
            lost_at_restart: Vec::new(),
        }
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// The runner's word on memory: while low, publishes are refused (v5
    /// 0x97 Quota exceeded on PUBACK/PUBREC; 3.x QoS 1/2 end the connection
    /// unacknowledged, QoS 0 is dropped),
    /// new subscriptions are refused, and nothing queued is encoded for a
    /// connection that still has output. Every refusal is counted.
    pub fn set_memory_low(&mut self, low: bool) {
        self.memory_low = low;
    }

    /// Swaps the tables clients are checked against, at once and whole
    /// (the runner has parsed and checked them): the next CONNECT,
    /// PUBLISH, SUBSCRIBE and delivery see the new ones. Connections of
    /// users the old password table had and the new one lacks are ended
    /// (v5: DISCONNECT 0x98 Administrative action; 3.x: closed); nobody
    /// else is. Returns how many were ended.
    pub fn update_auth(&mut self, update: crate::auth::AuthUpdate, now: u64) -> usize {
        let removed = |old: &Option<crate::auth::PasswordFile>, new: &Option<crate::auth::PasswordFile>, user: &str| {
            old.as_ref().is_some_and(|old| old.contains(user)) && new.as_ref().is_some_and(|new| !new.contains(user))
        };
        let mut ended = Vec::new();
        if let Some(passwords) = update.passwords {
            let old = core::mem::replace(&mut self.config.passwords, passwords);
            for (&conn, c) in &self.conns {
                if matches!(c.phase, Phase::Connected(_))
                    && c.username.as_deref().is_some_and(|user| removed(&old, &self.config.passwords, user))
                {
                    ended.push(conn);
                }
            }
        }
        if let Some(acl) = update.acl {
            self.config.acl = acl;
        }
        if let Some(allow) = update.allow_anonymous {
            self.config.allow_anonymous = allow;
        }
        for &conn in &ended {
            self.end_connection(conn, refuse(reason::ADMINISTRATIVE_ACTION, "user removed"), now);
        }
        ended.len()
    }

    /// Number of open transport connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    // ----- the runner's side -------------------------------------------------

    /// A transport connection was accepted.
    pub fn open(&mut self, conn: ConnId, now: u64) {
        self.deadline = None;
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
        self.stats.bytes_received += bytes.len() as u64;
        // Whole packets are decoded where they lie; only a packet's start
        // that has no end yet is kept, in a buffer sized once for it, and
        // once complete that buffer becomes the message (no copy).
        let mut rest = bytes;
        if !c.inbuf.is_empty() {
            let mut partial = core::mem::take(&mut c.inbuf);
            let (version, connected) = (c.version, matches!(c.phase, Phase::Connected(_)));
            let frame = loop {
                match packet::frame(&partial, self.config.max_packet_size) {
                    Ok(Some(frame)) => break frame,
                    Err(e) => return self.decode_failed(conn, e, connected, now),
                    Ok(None) if rest.is_empty() => {
                        if let Some(c) = self.conns.get_mut(&conn) {
                            c.inbuf = partial;
                        }
                        return;
                    }
                    Ok(None) => {
                        // One byte at a time until the length is known, then
                        // up to the end of the packet.
                        let need = match packet::announced_len(&partial) {
                            Some(len) => {
                                if !self.may_hold(len) || partial.try_reserve_exact(len - partial.len()).is_err() {
                                    return self.no_room_for_packet(conn, connected, now);
                                }
                                len - partial.len()
                            }
                            None => 1,
                        };
                        let take = need.min(rest.len());
                        partial.extend_from_slice(&rest[..take]);
                        rest = &rest[take..];
                    }
                }
            };
            match packet::decode_owned(frame, partial, version) {
                Ok(packet) => self.handle(conn, packet, now),
                Err(e) => return self.decode_failed(conn, e, connected, now),
            }
        }
        let used = self.decode_packets(conn, rest, now);
        let Some(c) = self.conns.get(&conn) else { return };
        if used < rest.len() && c.phase != Phase::Closing {
            let connected = matches!(c.phase, Phase::Connected(_));
            let start = &rest[used..];
            let buffer = packet::announced_len(start)
                .is_none_or(|len| self.may_hold(len))
                .then(|| packet_start(start, self.config.max_packet_size))
                .flatten();
            match (buffer, self.conns.get_mut(&conn)) {
                (Some(buffer), Some(c)) => c.inbuf = buffer,
                _ => self.no_room_for_packet(conn, connected, now),
            }
        }
    }

    /// Whether a connection may start assembling a packet of `len` bytes.
    /// Each reserves its whole packet once its length is known, so many
    /// clients starting packets of the maximum size at once could reserve
    /// more than the heap holds. The runner keeps room for one such packet
    /// when it says memory is low; from then on, all the packets being
    /// assembled together stay within it.
    fn may_hold(&self, len: usize) -> bool {
        if !self.memory_low {
            return true;
        }
        let assembling: usize = self.conns.values().map(|c| c.inbuf.capacity()).sum();
        assembling.saturating_add(len) <= self.config.max_packet_size
    }

    /// A connection started a packet the heap cannot hold now ([`Broker::may_hold`],
    /// or the reservation failed): it is ended (v5: DISCONNECT 0x97, quota
    /// exceeded) and counted, where reserving the packet could have ended
    /// the VM.
    fn no_room_for_packet(&mut self, conn: ConnId, connected: bool, now: u64) {
        self.stats.quota_refusals += 1;
        if connected {
            self.end_connection(conn, refuse(reason::QUOTA_EXCEEDED, "no memory for the packet"), now);
        } else {
            self.close(conn);
        }
    }

    /// Decodes and handles the whole packets at the start of `buf`; returns
    /// how many bytes they took (all of `buf` once the connection is ending).
    fn decode_packets(&mut self, conn: ConnId, buf: &[u8], now: u64) -> usize {
        let mut at = 0;
        loop {
            let Some(c) = self.conns.get(&conn) else { return buf.len() };
            if c.phase == Phase::Closing {
                return buf.len();
            }
            let (version, connected) = (c.version, matches!(c.phase, Phase::Connected(_)));
            let frame = match packet::frame(&buf[at..], self.config.max_packet_size) {
                Ok(Some(frame)) => frame,
                Ok(None) => return at,
                Err(e) => {
                    self.decode_failed(conn, e, connected, now);
                    return buf.len();
                }
            };
            let decoded = packet::decode(frame, &buf[at..], version);
            at += frame.len;
            match decoded {
                Ok(packet) => self.handle(conn, packet, now),
                Err(e) => {
                    self.decode_failed(conn, e, connected, now);
                    return buf.len();
                }
            }
        }
    }

    /// The one output call: offers every connection's pending bytes to
    /// `transmit` (`Transmit::Bytes`, which answers how many it took), and
    /// once a connection the broker ended has nothing left, asks for its
    /// close (`Transmit::Close`). Room freed in a connection's output lets
    /// its queued messages move, and they are offered in the same call.
    /// Returns true if anything was taken or closed.
    pub fn poll_transmit(&mut self, now: u64, mut transmit: impl FnMut(ConnId, Transmit<'_>) -> usize) -> bool {
        let mut moved = false;
        let ready: Vec<ConnId> = self.ready.iter().copied().collect();
        for conn in ready {
            while let Some(c) = self.conns.get_mut(&conn) {
                if c.out.is_empty() {
                    break;
                }
                let taken = transmit(conn, Transmit::Bytes(c.out.front()));
                if taken == 0 {
                    break;
                }
                c.out.consume(taken);
                self.stats.bytes_sent += taken as u64;
                moved = true;
                if let Phase::Connected(key) = c.phase {
                    self.pump(key, now);
                }
            }
            let Some(c) = self.conns.get(&conn) else {
                self.ready.remove(&conn);
                continue;
            };
            if !c.out.is_empty() {
                continue; // No room at the runner: offered again next time.
            }
            self.ready.remove(&conn);
            if c.phase == Phase::Closing {
                transmit(conn, Transmit::Close);
                self.conns.remove(&conn);
                moved = true;
            }
        }
        moved
    }

    /// The peer will send nothing more (it shut its side down: FIN), but
    /// may still read. What it sent is answered: its output (a CONNACK, the
    /// PUBACK of its last PUBLISH) goes out, then
    /// [`Broker::poll_transmit`] asks for the close. Its session is detached
    /// at once, as for a lost connection (no DISCONNECT: its will fires).
    /// Returns false when the broker does not know `conn` (the runner then
    /// closes it itself).
    pub fn input_ended(&mut self, conn: ConnId, now: u64) -> bool {
        let Some(c) = self.conns.get_mut(&conn) else { return false };
        // A packet cut short by the FIN is never completed.
        c.inbuf = Vec::new();
        self.close_as_lost(conn, now);
        true
    }

    /// The transport connection is gone (the peer reset it, or the runner
    /// can neither read from it nor write to it): what it had not taken is
    /// dropped.
    /// Ends `conn` as a lost connection (no DISCONNECT): it is closed once
    /// its output is sent, and its session is detached (its will fires).
    pub(super) fn close_as_lost(&mut self, conn: ConnId, now: u64) {
        let session = match self.conns.get(&conn).map(|c| &c.phase) {
            Some(Phase::Connected(key)) => Some(*key),
            _ => None,
        };
        self.close(conn);
        if let Some(key) = session {
            self.detach(key, conn, false, now);
        }
    }

    pub fn closed(&mut self, conn: ConnId, now: u64) {
        self.deadline = None;
        let Some(c) = self.conns.remove(&conn) else { return };
        self.ready.remove(&conn);
        // A Closing connection has already been detached from its session.
        if let Phase::Connected(key) = c.phase {
            // Gone without DISCONNECT (a DISCONNECT leaves the phase Closing).
            self.connected -= 1;
            self.detach(key, conn, false, now);
        }
    }

    /// When `tick` must next be called, if ever (possibly earlier than
    /// needed: a tick with nothing due is harmless).
    pub fn next_deadline(&mut self) -> Option<u64> {
        match self.deadline {
            Some(deadline) => deadline,
            None => {
                let deadline = self.earliest_deadline();
                self.deadline = Some(deadline);
                deadline
            }
        }
    }

    /// Every connection's and session's deadline, scanned.
    fn earliest_deadline(&self) -> Option<u64> {
        let keep_alive = self.conns.values().filter_map(Conn::keep_alive_deadline);
        let connects = self.conns.values().filter_map(|c| c.connect_deadline(self.config.connect_timeout_ms));
        let wills = self.sessions.values().filter_map(|s| s.will_at);
        let expiries = self.sessions.values().filter_map(Session::end);
        let sys = (self.config.sys_interval_ms > 0 && !self.conns.is_empty()).then_some(self.next_sys_at);
        keep_alive.chain(connects).chain(wills).chain(expiries).chain(sys).min()
    }

    /// Enforces keep-alive and the CONNECT timeout, fires delayed wills, ends
    /// expired sessions and retained messages, publishes `$SYS` statistics.
    pub fn tick(&mut self, now: u64) {
        self.deadline = None;
        let late: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.keep_alive_deadline().is_some_and(|t| now >= t))
            .map(|(&id, _)| id)
            .collect();
        for conn in late {
            self.end_connection(conn, refuse(reason::KEEP_ALIVE_TIMEOUT, "keep alive timeout"), now);
        }
        let silent: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.connect_deadline(self.config.connect_timeout_ms).is_some_and(|t| now >= t))
            .map(|(&id, _)| id)
            .collect();
        for conn in silent {
            self.close(conn);
        }
        self.expire_sessions(now);
        self.retained.expire(now);
        if self.config.sys_interval_ms > 0 && now >= self.next_sys_at {
            self.next_sys_at = now + self.config.sys_interval_ms;
            self.publish_sys(now);
        }
    }

    // ----- dispatch -----------------------------------------------------------

    fn decode_failed(&mut self, conn: ConnId, error: DecodeError, connected: bool, now: u64) {
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
            let refusal = reason::v3::UNACCEPTABLE_PROTOCOL_VERSION;
            self.send(conn, Version::V3_1_1, &connect::connack(false, refusal, Properties::default()));
            self.close(conn);
            return;
        }
        if connected {
            self.end_connection(conn, refuse(code, "malformed or invalid packet"), now);
        } else {
            self.close(conn);
        }
    }

    fn handle(&mut self, conn: ConnId, packet: Packet, now: u64) {
        let traffic = matches!(
            packet,
            Packet::Publish(_)
                | Packet::Puback(_)
                | Packet::Pubrec(_)
                | Packet::Pubrel(_)
                | Packet::Pubcomp(_)
                | Packet::Subscribe(_)
                | Packet::Unsubscribe(_)
                | Packet::Pingreq
        );
        if !traffic {
            // CONNECT sets a keep-alive, DISCONNECT a will or an expiry.
            self.deadline = None;
        }
        let Some(c) = self.conns.get(&conn) else { return };
        let key = match c.phase {
            Phase::Connected(key) => key,
            Phase::AwaitingConnect => {
                if let Packet::Connect(connect) = packet {
                    return self.handle_connect(conn, *connect, now);
                }
                // Anything before CONNECT: close without a word (3.1.1 3.1.0-1).
                self.stats.protocol_errors += 1;
                return self.close(conn);
            }
            Phase::Closing => return,
        };
        let result = match packet {
            Packet::Connect(_) => Err(refuse(reason::PROTOCOL_ERROR, "second CONNECT")),
            Packet::Publish(p) => self.handle_publish(conn, key, p, now),
            Packet::Puback(a) => self.handle_ack(key, a.packet_id, Awaiting::Puback, now),
            Packet::Pubrec(a) => self.handle_pubrec(conn, key, a, now),
            Packet::Pubcomp(a) => self.handle_ack(key, a.packet_id, Awaiting::Pubcomp, now),
            Packet::Pubrel(a) => self.handle_pubrel(conn, key, a, now),
            Packet::Subscribe(s) => self.handle_subscribe(conn, key, s, now),
            Packet::Unsubscribe(u) => self.handle_unsubscribe(conn, key, u, now),
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

    // ----- ending connections and sending ----------------------------------------

    /// Server-side end of a connection: v5 clients get a DISCONNECT with the
    /// reason; the will is published as for a lost connection.
    fn end_connection(&mut self, conn: ConnId, refusal: Refusal, now: u64) {
        self.deadline = None;
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

    /// Ends `conn` once its output is out (once); its input is ignored from now on.
    fn close(&mut self, conn: ConnId) {
        self.deadline = None;
        if let Some(c) = self.conns.get_mut(&conn).filter(|c| c.phase != Phase::Closing) {
            if matches!(c.phase, Phase::Connected(_)) {
                self.connected -= 1;
            }
            c.phase = Phase::Closing;
            self.ready.insert(conn);
        }
    }

    fn send(&mut self, conn: ConnId, version: Version, packet: &Packet) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.out.push(packet, version);
            self.ready.insert(conn);
        }
    }

    fn send_to(&mut self, conn: ConnId, packet: &Packet) {
        let Some(version) = self.conns.get(&conn).map(|c| c.version) else { return };
        self.send(conn, version, packet);
    }
}
