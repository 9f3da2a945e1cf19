//! Messages in and out (MQTT 5 sections 3.3 to 3.7, 4.3, 4.6): PUBLISH from
//! a client with its QoS handshake, retained messages, routing to the
//! matching sessions (one delivery per session, shared subscriptions in
//! turn), per-session queues, the inflight window, and resending after a
//! reconnect.
//!
//! Owns the path of a message from one connection's input to other
//! connections' output. Every queue and window it fills is bounded by the
//! configuration; what does not fit is dropped and counted.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;

use super::journal::{STORE_FAILING, Unsettled};
use super::session::{Awaiting, Outgoing, Queued, stored_bytes};
use super::{Broker, ConnId, Refusal, reason, refuse};
use crate::auth::Want;
use crate::packet::{self, Ack, Packet, Publish, QoS, Version};
use crate::properties::Properties;
use crate::store::record::Record;
use crate::subscriptions::{SessionKey, Subscription};

impl Broker {
    pub(super) fn handle_publish(
        &mut self,
        conn: ConnId,
        key: SessionKey,
        mut p: Publish,
        now: u64,
    ) -> Result<(), Refusal> {
        let c = self.conns.get_mut(&conn).ok_or(refuse(reason::UNSPECIFIED_ERROR, "no connection"))?;
        let v5 = c.version == Version::V5;
        if let Some(alias) = p.properties.topic_alias {
            p.properties.make_mut().topic_alias = None;
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
        if crate::topic::validate_name(&p.topic, self.config.topic_limits).is_err() {
            return Err(refuse(reason::TOPIC_NAME_INVALID, "invalid topic name"));
        }
        if p.qos > self.config.max_qos {
            return Err(refuse(reason::QOS_NOT_SUPPORTED, "QoS not supported"));
        }
        if p.retain && !self.config.retain_available {
            return Err(refuse(reason::RETAIN_NOT_SUPPORTED, "retain not supported"));
        }
        self.stats.messages_received += 1;
        // With the state log failing, nothing durable is accepted: v5
        // clients are refused per message, 3.x clients (whose PUBACK cannot
        // say no) lose the connection.
        let undurable = self.store_failed && (p.qos != QoS::AtMostOnce || p.retain);
        if undurable && !v5 {
            self.stats.quota_refusals += 1;
            return Err(refuse(reason::UNSPECIFIED_ERROR, STORE_FAILING));
        }
        // Clients may not publish into the broker's own namespace.
        let allowed = !p.topic.starts_with("$SYS") && self.conn_allows(conn, Want::Publish, &p.topic);
        // Low on memory, a 3.x client's QoS 1/2 publish could only be
        // acknowledged and dropped, a loss it would never learn of: its
        // connection ends unacknowledged instead, and it sends the publish
        // again when it reconnects (a QoS 2 retransmission already taken is
        // acknowledged again below).
        let retransmission = p.qos == QoS::ExactlyOnce
            && p.packet_id.is_some_and(|id| self.sessions.get(&key).is_some_and(|s| s.incoming_qos2.contains(&id)));
        if self.memory_low && !v5 && allowed && p.qos != QoS::AtMostOnce && !retransmission {
            self.stats.quota_refusals += 1;
            return Err(refuse(reason::QUOTA_EXCEEDED, "memory low"));
        }
        let quota = !self.memory_low
            && !undurable
            && (!p.retain || self.retained.fits(&p, self.config.max_retained_messages, self.config.max_retained_bytes));
        if allowed && !quota && !retransmission {
            self.stats.quota_refusals += 1;
        }
        let session = self.sessions.get_mut(&key).ok_or(refuse(reason::UNSPECIFIED_ERROR, "no session"))?;
        match (p.qos, p.packet_id) {
            (QoS::AtMostOnce, _) => {
                if allowed && quota {
                    self.accept_publish(key, p, now);
                }
            }
            (QoS::AtLeastOnce, Some(id)) => {
                let delivered = if allowed && quota { self.tracked(|b| b.accept_publish(key, p, now)) } else { 0 };
                let code = ack_code(allowed, quota, delivered);
                self.send_to(conn, &Packet::Puback(ack(id, if v5 { code } else { 0 })));
            }
            (QoS::ExactlyOnce, Some(id)) => {
                if session.incoming_qos2.contains(&id) {
                    // A retransmission: acknowledged again, delivered once.
                    self.send_to(conn, &Packet::Pubrec(ack(id, 0)));
                    return Ok(());
                }
                if session.incoming_qos2.len() >= usize::from(self.config.receive_maximum) {
                    // A 3.x client was told no limit: its connection ends
                    // without a word, so the count is what says why.
                    self.stats.quota_refusals += 1;
                    return Err(refuse(reason::RECEIVE_MAXIMUM_EXCEEDED, "receive maximum exceeded"));
                }
                let delivered = if allowed && quota {
                    session.incoming_qos2.insert(id);
                    let logged = session.persisted.then(|| session.client_id.clone());
                    self.tracked(|b| {
                        b.track(|| Unsettled::Incoming { session: key, packet_id: id });
                        if let Some(client_id) = logged {
                            b.log(Record::Incoming { client_id, packet_id: id });
                        }
                        b.accept_publish(key, p, now)
                    })
                } else {
                    0
                };
                let code = ack_code(allowed, quota, delivered);
                self.send_to(conn, &Packet::Pubrec(ack(id, if v5 { code } else { 0 })));
            }
            _ => return Err(refuse(reason::MALFORMED_PACKET, "QoS > 0 without packet identifier")),
        }
        Ok(())
    }

    /// Stores a retained message and routes `p`; returns how many sessions got it.
    pub(super) fn accept_publish(&mut self, from: SessionKey, p: Publish, now: u64) -> usize {
        let expires_at = p.properties.message_expiry_interval.map(|s| now + u64::from(s) * 1000);
        if p.retain {
            if self.tracking.is_some() {
                let before = self.retained.get(&p.topic).cloned();
                self.track(|| Unsettled::Retained { topic: p.topic.clone(), before });
            }
            self.retained.set(&p, expires_at);
            if self.journal.is_some() {
                self.log(if p.payload.is_empty() {
                    Record::RetainGone { topic: String::from(&*p.topic) }
                } else {
                    Record::Retain { publish: p.clone(), expires_at }
                });
            }
        }
        self.route(Some(from), &p, expires_at, now)
    }

    /// Delivers `p` to every matching session; returns how many.
    pub(super) fn route(&mut self, from: Option<SessionKey>, p: &Publish, expires_at: Option<u64>, now: u64) -> usize {
        // One delivery per session: the highest QoS among its matching
        // subscriptions, with all their identifiers (MQTT 5 3.3.4).
        let mut targets: BTreeMap<SessionKey, (QoS, bool, Vec<u32>)> = BTreeMap::new();
        let mut shared: BTreeMap<String, Vec<Subscription>> = BTreeMap::new();
        self.index.for_each_match(&p.topic, |s| {
            if let Some(share) = &s.share_key {
                shared.entry(share.clone()).or_default().push(s.clone());
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
        for (share, mut members) in shared {
            members.sort_by_key(|s| s.session);
            members.dedup_by_key(|s| s.session);
            let chosen = &members[self.shares.next(&share, members.len())];
            let entry = targets.entry(chosen.session).or_insert((QoS::AtMostOnce, false, Vec::new()));
            entry.0 = entry.0.max(chosen.options.qos);
            entry.2.extend(chosen.identifier);
        }
        let count = targets.len();
        for (session, (sub_qos, retain_as_published, ids)) in targets {
            // Read access is checked per message too, as Mosquitto does: an
            // ACL changed after subscribing, or a wide filter, does not leak.
            let readable = match (&self.config.acl, self.sessions.get(&session)) {
                (Some(acl), Some(s)) => acl.allows(s.username.as_deref(), &s.client_id, Want::Read, &p.topic),
                _ => true,
            };
            if !readable {
                continue;
            }
            let mut out = p.clone();
            out.qos = p.qos.min(sub_qos);
            out.retain = retain_as_published && p.retain;
            out.dup = false;
            if out.properties.topic_alias.is_some() || out.properties.subscription_identifiers != ids {
                let properties = out.properties.make_mut();
                properties.topic_alias = None;
                properties.subscription_identifiers = ids;
            }
            self.deliver(session, out, expires_at, now);
        }
        count
    }

    /// Queues `p` for `key` and moves what the window allows.
    pub(super) fn deliver(&mut self, key: SessionKey, p: Publish, expires_at: Option<u64>, now: u64) {
        let Some(session) = self.sessions.get_mut(&key) else { return };
        let online = session.conn.is_some();
        if p.qos == QoS::AtMostOnce && !online {
            // QoS 0 is not stored for offline sessions; for a slow online
            // one it waits in the (bounded) queue like any other message.
            self.stats.messages_dropped += 1;
            return;
        }
        // A message bigger than the byte bound still goes to an empty queue:
        // the bound limits what waits, not what may be sent at all. 0 is no
        // byte bound, as in Mosquitto (a configuration carried over must
        // not mean "one message").
        let max_bytes = self.config.max_queued_bytes;
        let over_bytes =
            max_bytes != 0 && session.queue.len() > 0 && session.queue.bytes() + stored_bytes(&p) > max_bytes;
        if session.queue.len() >= self.config.max_queued_messages || over_bytes {
            self.stats.messages_dropped += 1;
            return;
        }
        let seq = if session.persisted && p.qos != QoS::AtMostOnce {
            let seq = session.next_seq;
            session.next_seq += 1;
            let client_id = session.client_id.clone();
            self.log(Record::Message { client_id, seq, expires_at, publish: p.clone() });
            seq
        } else {
            0
        };
        self.track(|| Unsettled::Delivered { session: key, seq, publish: p.clone() });
        let Some(session) = self.sessions.get_mut(&key) else { return };
        session.queue.push_back(Queued { publish: p, expires_at, seq });
        if online {
            self.pump(key, now);
        }
    }

    /// Moves queued messages to the connection while the inflight window and
    /// the output bound allow.
    pub(super) fn pump(&mut self, key: SessionKey, now: u64) {
        let Some(session) = self.sessions.get_mut(&key) else { return };
        let Some(conn) = session.conn else { return };
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let window = usize::from(self.config.max_inflight.min(c.client_receive_max));
        // Low on memory, a connection gets one encoded message at a time.
        let max_out = if self.memory_low { 1 } else { self.config.max_pending_output };
        let mut done = Vec::new();
        while c.out.len() < max_out {
            let Some(front) = session.queue.front() else { break };
            if front.publish.qos != QoS::AtMostOnce && session.inflight.len() >= window {
                break;
            }
            // A logged message's packet id follows from its number, so it
            // is the same after a restart (QoS 2 stays exactly-once); one
            // whose id is still in flight waits for it.
            if front.seq > 0 && session.inflight.contains_key(&seq_packet_id(front.seq)) {
                break;
            }
            let Some(Queued { mut publish, expires_at, seq }) = session.queue.pop_front() else { break };
            if let Some(t) = expires_at {
                if now >= t {
                    done.push(seq);
                    continue; // Expired while waiting (MQTT 5 3.3.2.3.3).
                }
                publish.properties.make_mut().message_expiry_interval =
                    Some(u32::try_from((t - now).div_ceil(1000)).unwrap_or(u32::MAX));
            }
            if publish.qos != QoS::AtMostOnce {
                let id = if seq > 0 { seq_packet_id(seq) } else { session.next_free_id() };
                publish.packet_id = Some(id);
                let state = if publish.qos == QoS::AtLeastOnce { Awaiting::Puback } else { Awaiting::Pubrec };
                session.inflight.insert(id, Outgoing { publish: publish.clone(), state, seq });
            } else {
                publish.packet_id = None;
            }
            if packet::publish_len(&publish, c.version) > c.client_max_packet {
                // Too big for this client: dropped as if sent (MQTT 5 3.1.2.25).
                if let Some(id) = publish.packet_id {
                    session.inflight.remove(&id);
                }
                done.push(seq);
                self.stats.messages_dropped += 1;
                continue;
            }
            c.apply_outbound_alias(&mut publish);
            c.out.push(&Packet::Publish(publish), c.version);
            self.stats.messages_sent += 1;
            self.ready.insert(conn);
        }
        self.log_done(key, &done);
    }

    /// Logs that the messages numbered `seqs` need no delivery any more.
    fn log_done(&mut self, key: SessionKey, seqs: &[u64]) {
        // Called on every pump and acknowledgement: nothing logged, no lookup.
        if seqs.iter().all(|&seq| seq == 0) {
            return;
        }
        let Some(session) = self.sessions.get(&key).filter(|s| s.persisted) else { return };
        let client_id = session.client_id.clone();
        for &seq in seqs.iter().filter(|&&seq| seq > 0) {
            self.log(Record::Done { client_id: client_id.clone(), seq });
        }
    }

    /// After a reconnect: every unacknowledged message again, with DUP set,
    /// and the PUBRELs still owed.
    pub(super) fn resend_inflight(&mut self, key: SessionKey, conn: ConnId) {
        let Some(session) = self.sessions.get(&key) else { return };
        let Some(c) = self.conns.get_mut(&conn) else { return };
        c.outbound_aliases.clear();
        for (&id, out) in &session.inflight {
            let packet = match out.state {
                Awaiting::Puback | Awaiting::Pubrec => {
                    let mut p = out.publish.clone();
                    p.dup = true;
                    if p.properties.topic_alias.is_some() {
                        p.properties.make_mut().topic_alias = None;
                    }
                    Packet::Publish(p)
                }
                Awaiting::Pubcomp => Packet::Pubrel(ack(id, 0)),
            };
            c.out.push(&packet, c.version);
        }
        if !session.inflight.is_empty() {
            self.ready.insert(conn);
        }
    }

    pub(super) fn handle_ack(&mut self, key: SessionKey, id: u16, expected: Awaiting, now: u64) -> Result<(), Refusal> {
        let session = self.sessions.get_mut(&key).ok_or(refuse(reason::UNSPECIFIED_ERROR, "no session"))?;
        // An unknown id is ignored: a late duplicate after a resend.
        if session.inflight.get(&id).is_some_and(|out| out.state == expected) {
            let seq = session.inflight.remove(&id).map_or(0, |out| out.seq);
            self.log_done(key, &[seq]);
            self.pump(key, now);
        }
        Ok(())
    }

    pub(super) fn handle_pubrec(&mut self, conn: ConnId, key: SessionKey, a: Ack, now: u64) -> Result<(), Refusal> {
        let session = self.sessions.get_mut(&key).ok_or(refuse(reason::UNSPECIFIED_ERROR, "no session"))?;
        let known = match session.inflight.get_mut(&a.packet_id) {
            Some(out) if out.state != Awaiting::Puback => {
                let seq = out.seq;
                if a.code >= 0x80 {
                    // The receiver refused the message: the flow ends here.
                    session.inflight.remove(&a.packet_id);
                    self.log_done(key, &[seq]);
                    self.pump(key, now);
                    return Ok(());
                }
                if seq > 0 && session.persisted && self.store_failed {
                    // Its release cannot be written: no PUBREL. The
                    // message comes again (DUP) when the subscriber is
                    // back, and is released then.
                    self.refuse_for_store(conn, now);
                    return Ok(());
                }
                out.state = Awaiting::Pubcomp;
                if seq > 0 && session.persisted {
                    let client_id = session.client_id.clone();
                    self.log(Record::Released { client_id, seq });
                }
                true
            }
            _ => false,
        };
        let code = if known { 0 } else { reason::PACKET_IDENTIFIER_NOT_FOUND };
        let v5 = self.conns.get(&conn).is_some_and(|c| c.version == Version::V5);
        self.send_to(conn, &Packet::Pubrel(ack(a.packet_id, if v5 { code } else { 0 })));
        Ok(())
    }

    pub(super) fn handle_pubrel(&mut self, conn: ConnId, key: SessionKey, a: Ack, now: u64) -> Result<(), Refusal> {
        let session = self.sessions.get_mut(&key).ok_or(refuse(reason::UNSPECIFIED_ERROR, "no session"))?;
        if self.store_failed && session.persisted && session.incoming_qos2.contains(&a.packet_id) {
            // Its release cannot be written: no PUBCOMP, and the id stays
            // (after a restart a new message under it would be taken for
            // this one). The client sends PUBREL again when it is back.
            self.refuse_for_store(conn, now);
            return Ok(());
        }
        let known = session.incoming_qos2.remove(&a.packet_id);
        if known && session.persisted {
            let client_id = session.client_id.clone();
            self.log(Record::IncomingDone { client_id, packet_id: a.packet_id });
        }
        let v5 = self.conns.get(&conn).is_some_and(|c| c.version == Version::V5);
        let code = if known || !v5 { 0 } else { reason::PACKET_IDENTIFIER_NOT_FOUND };
        self.send_to(conn, &Packet::Pubcomp(ack(a.packet_id, code)));
        Ok(())
    }
}

/// The packet id of the logged message numbered `seq` (1..=65535).
pub(super) fn seq_packet_id(seq: u64) -> u16 {
    u16::try_from((seq - 1) % 65535).map_or(1, |n| n + 1)
}

pub(super) fn ack(packet_id: u16, code: u8) -> Ack {
    Ack { packet_id, code, properties: Properties::default() }
}

fn ack_code(allowed: bool, quota: bool, delivered: usize) -> u8 {
    match (allowed, quota, delivered) {
        (false, _, _) => reason::NOT_AUTHORIZED,
        (true, false, _) => reason::QUOTA_EXCEEDED,
        (true, true, 0) => reason::NO_MATCHING_SUBSCRIBERS,
        _ => reason::SUCCESS,
    }
}
