//! The broker's side of durable state: the records it emits as durable
//! state changes, rebuilding itself from them at start, and the snapshot
//! that compaction writes.
//!
//! Durable state is the retained store and every session that outlives its
//! connection (expiry > 0), with its subscriptions, its QoS 1/2 messages
//! (queued, in flight, released) and its incoming QoS 2 ids. QoS 0
//! messages, `$SYS`, and sessions that end with their connection are never
//! logged. Owns no I/O: the runner takes the records
//! ([`Broker::take_journal`]), commits them, and holds the output produced
//! meanwhile until they are durable. When it cannot, the broker undoes what
//! the lost records carried of clients' publishes
//! ([`Broker::withdraw_output`]), so a publish that was never acknowledged
//! leaves nothing behind. Times in records are Unix milliseconds.

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;

use super::session::{Awaiting, Outgoing, Queued};
use super::{Broker, ConnId, delivery::seq_packet_id};
use crate::packet::{Publish, QoS};
use crate::store::record::{Record, SessionRecord};
use crate::subscriptions::{SessionKey, Subscription, share_key};
use crate::topic;

/// A message read back from the log, and whether its PUBREC had arrived.
pub(super) struct Restoring {
    queued: Queued,
    released: bool,
}

/// A change a client's publish made whose records are not yet durable: how
/// to undo it if they never are.
pub(super) enum Unsettled {
    /// A retained message was set or cleared; the topic held `before`.
    Retained { topic: Arc<str>, before: Option<Queued> },
    /// A message was queued for a session: under `seq` when logged, else
    /// found by its content.
    Delivered { session: SessionKey, seq: u64, publish: Publish },
    /// An incoming QoS 2 id was taken.
    Incoming { session: SessionKey, packet_id: u16 },
}

/// Why a request that needs the failing state store is refused.
pub(super) const STORE_FAILING: &str = "the state store is failing";

impl Broker {
    /// Starts keeping a journal of durable state changes. Call after
    /// restoring, so restoring logs nothing but what the restart itself
    /// changed: sessions that were connected when the broker stopped lost
    /// their connection then, which their next records say.
    pub fn enable_journal(&mut self) {
        self.journal.get_or_insert_with(Vec::new);
        for key in core::mem::take(&mut self.lost_at_restart) {
            self.log_session(key);
        }
    }

    /// The records since the last call, oldest first. What clients'
    /// publishes changed with them can be undone until the next records
    /// are taken ([`Broker::withdraw_output`]).
    pub fn take_journal(&mut self) -> Vec<Record> {
        let records = self.journal.as_mut().map(core::mem::take).unwrap_or_default();
        if !records.is_empty() {
            self.withdrawable = core::mem::take(&mut self.unsettled);
        }
        records
    }

    /// Whether records are waiting for the runner.
    pub fn journal_pending(&self) -> bool {
        self.journal.as_ref().is_some_and(|j| !j.is_empty())
    }

    /// The runner's word on the state log: while it fails, nothing is
    /// acknowledged that would need it. Publishes that would (QoS 1/2 or
    /// retained) are refused, and so are sessions that outlive their
    /// connection (at CONNECT), their subscription changes, and their QoS 2
    /// releases (the connection ends, without PUBCOMP or PUBREL, and the
    /// flow resumes when the client comes back). Clients whose sessions end
    /// with their connection are served as before.
    pub fn set_store_failed(&mut self, failed: bool) {
        self.store_failed = failed;
    }

    /// The runner could not make the latest records durable (the last
    /// records it took, and any since), so the acknowledgements that wait
    /// for them must never go out: what clients' publishes changed with
    /// those records is undone (retained messages, messages queued for
    /// sessions, incoming QoS 2 ids), and every connection with output not
    /// yet taken is ended without it (as a lost connection; its client
    /// sends again what it saw no acknowledgement for). Nothing a client
    /// was not told about is undone (subscriptions, sessions: the client
    /// asks again, and they are idempotent). The runner's next write must
    /// be the whole state (a compaction). Returns how many were ended.
    pub fn withdraw_output(&mut self, now: u64) -> usize {
        self.undo_unsettled();
        let pending: Vec<ConnId> =
            self.ready.iter().copied().filter(|id| self.conns.get(id).is_some_and(|c| !c.out.is_empty())).collect();
        for &conn in &pending {
            let Some(c) = self.conns.get_mut(&conn) else { continue };
            c.out = Default::default();
            self.close_as_lost(conn, now);
        }
        pending.len()
    }

    pub(super) fn log(&mut self, record: Record) {
        if let Some(journal) = &mut self.journal {
            journal.push(record);
        }
    }

    /// Ends `conn` because what it asked for needs the failing state store
    /// (v5: DISCONNECT 0x97).
    pub(super) fn refuse_for_store(&mut self, conn: ConnId, now: u64) {
        self.stats.quota_refusals += 1;
        self.end_connection(conn, super::refuse(super::reason::QUOTA_EXCEEDED, STORE_FAILING), now);
    }

    /// Runs `change`, a client's publish being accepted, keeping how to
    /// undo what it changes if it logs a record that output waits for.
    pub(super) fn tracked<R>(&mut self, change: impl FnOnce(&mut Broker) -> R) -> R {
        let Some(mark) = self.journal.as_ref().map(Vec::len) else { return change(self) };
        self.tracking = Some(Vec::new());
        let result = change(self);
        let changes = self.tracking.take().unwrap_or_default();
        if self.journal.as_ref().is_some_and(|j| j.get(mark..).unwrap_or_default().iter().any(Record::gates_output)) {
            self.unsettled.extend(changes);
        }
        result
    }

    /// Notes a change of the publish being tracked, if one is.
    pub(super) fn track(&mut self, change: impl FnOnce() -> Unsettled) {
        if let Some(tracking) = &mut self.tracking {
            tracking.push(change());
        }
    }

    /// Undoes the tracked changes whose records were lost, newest first.
    fn undo_unsettled(&mut self) {
        let mut changes = core::mem::take(&mut self.withdrawable);
        changes.append(&mut self.unsettled);
        for change in changes.into_iter().rev() {
            match change {
                Unsettled::Retained { topic, before } => self.retained.restore(topic, before),
                Unsettled::Delivered { session, seq, publish } => {
                    let Some(s) = self.sessions.get_mut(&session) else { continue };
                    let queued = if seq > 0 {
                        s.queue.iter().rposition(|q| q.seq == seq)
                    } else {
                        s.queue.iter().rposition(|q| {
                            q.seq == 0
                                && q.publish.qos == publish.qos
                                && q.publish.topic == publish.topic
                                && *q.publish.payload == *publish.payload
                        })
                    };
                    if let Some(at) = queued {
                        s.queue.remove(at);
                    } else if seq > 0 {
                        // Sent: its connection's output is withdrawn below.
                        s.inflight.retain(|_, out| out.seq != seq);
                    }
                }
                Unsettled::Incoming { session, packet_id } => {
                    if let Some(s) = self.sessions.get_mut(&session) {
                        s.incoming_qos2.remove(&packet_id);
                    }
                }
            }
        }
    }

    /// Logs a session's header after a change, when it outlives its
    /// connection; a session that no longer does is logged as gone. A
    /// session logged for the first time is logged whole.
    pub(super) fn log_session(&mut self, key: SessionKey) {
        if self.journal.is_none() {
            return;
        }
        let Some(session) = self.sessions.get_mut(&key) else { return };
        match (session.persisted, session.expiry > 0) {
            (false, false) => {}
            (true, false) => {
                session.persisted = false;
                let client_id = session.client_id.clone();
                self.log(Record::SessionGone { client_id });
            }
            (true, true) => {
                let record = Record::Session(Box::new(session_record(session)));
                self.log(record);
            }
            (false, true) => {
                session.persisted = true;
                // Messages it already holds get numbers from now on.
                for (_, seq) in session.queue.seqs_mut().filter(|(p, seq)| p.qos != QoS::AtMostOnce && **seq == 0) {
                    *seq = session.next_seq;
                    session.next_seq += 1;
                }
                let mut records = Vec::new();
                let _ = self.snapshot_session(key, &mut |r: &Record| {
                    records.push(r.clone());
                    Ok::<(), ()>(())
                });
                if let Some(journal) = &mut self.journal {
                    journal.extend(records);
                }
            }
        }
    }

    /// Every record of the live durable state, for compaction.
    pub fn snapshot<E>(&self, emit: &mut dyn FnMut(&Record) -> Result<(), E>) -> Result<(), E> {
        // `$SYS` is the broker's own, published afresh: never kept.
        for (_, retained) in self.retained.iter().filter(|(topic, _)| !topic.starts_with("$SYS")) {
            emit(&Record::Retain { publish: retained.publish.clone(), expires_at: retained.expires_at })?;
        }
        for (&key, session) in &self.sessions {
            if session.persisted {
                self.snapshot_session(key, emit)?;
            }
        }
        Ok(())
    }

    fn snapshot_session<E>(&self, key: SessionKey, emit: &mut dyn FnMut(&Record) -> Result<(), E>) -> Result<(), E> {
        let Some(session) = self.sessions.get(&key) else { return Ok(()) };
        let client_id = || session.client_id.clone();
        emit(&Record::Session(Box::new(session_record(session))))?;
        for (filter, &(options, identifier)) in &session.filters {
            emit(&Record::Subscribe { client_id: client_id(), filter: filter.clone(), options, identifier })?;
        }
        for &packet_id in &session.incoming_qos2 {
            emit(&Record::Incoming { client_id: client_id(), packet_id })?;
        }
        let mut inflight: Vec<&Outgoing> = session.inflight.values().filter(|o| o.seq > 0).collect();
        inflight.sort_by_key(|o| o.seq);
        for out in inflight {
            let publish = out.publish.clone();
            emit(&Record::Message { client_id: client_id(), seq: out.seq, expires_at: None, publish })?;
            if out.state == Awaiting::Pubcomp {
                emit(&Record::Released { client_id: client_id(), seq: out.seq })?;
            }
        }
        for q in session.queue.iter().filter(|q| q.seq > 0) {
            let publish = q.publish.clone();
            emit(&Record::Message { client_id: client_id(), seq: q.seq, expires_at: q.expires_at, publish })?;
        }
        Ok(())
    }

    /// Applies one record read back from the log; false if it does not
    /// decode. `now` is the broker's clock at start (Unix ms).
    pub fn restore(&mut self, body: &[u8], now: u64) -> bool {
        let Ok(record) = Record::decode(body) else { return false };
        let key_of = |b: &Broker, client_id: &str| b.by_client_id.get(client_id).copied();
        match record {
            Record::Retain { publish, expires_at } => {
                let live = expires_at.is_none_or(|t| now < t) && !publish.payload.is_empty();
                let topic = publish.topic.clone();
                let message = live.then_some(Queued { publish, expires_at, seq: 0 });
                self.restoring_retained.push((topic, message));
            }
            Record::RetainGone { topic } => self.restoring_retained.push((topic.as_str().into(), None)),
            Record::Session(s) => {
                let s = *s;
                let key = key_of(self, &s.client_id).unwrap_or_else(|| self.new_session(&s.client_id, s.version));
                if let Some(session) = self.sessions.get_mut(&key) {
                    session.version = s.version;
                    session.expiry = s.expiry;
                    session.username = s.username;
                    session.will = s.will;
                    session.persisted = true;
                    // `None`: connected when the broker stopped (see finish_restore).
                    session.disconnected_at = s.disconnected_at;
                }
            }
            Record::SessionGone { client_id } => {
                if let Some(key) = key_of(self, &client_id) {
                    self.restoring.remove(&key);
                    self.remove_session(key);
                }
            }
            Record::Subscribe { client_id, filter, options, identifier } => {
                let Some(key) = key_of(self, &client_id) else { return true };
                let Ok(parsed) = topic::parse_filter(&filter, self.config.topic_limits) else { return true };
                let subscription = Subscription::new(key, &parsed, options, identifier);
                let share = subscription.share_key.clone();
                if let (false, Some(share)) = (self.index.insert(parsed, subscription), &share) {
                    self.shares.joined(share);
                }
                if let Some(session) = self.sessions.get_mut(&key) {
                    session.filters.insert(filter, (options, identifier));
                }
            }
            Record::Unsubscribe { client_id, filter } => {
                let Some(key) = key_of(self, &client_id) else { return true };
                if let Ok(parsed) = topic::parse_filter(&filter, self.config.topic_limits)
                    && let (true, Some(share)) = (self.index.remove(parsed, key), share_key(&parsed))
                {
                    self.shares.left(&share);
                }
                if let Some(session) = self.sessions.get_mut(&key) {
                    session.filters.remove(&filter);
                }
            }
            Record::Message { client_id, seq, expires_at, publish } => {
                let Some(key) = key_of(self, &client_id) else { return true };
                if let Some(session) = self.sessions.get_mut(&key) {
                    session.next_seq = session.next_seq.max(seq + 1);
                }
                let queued = Queued { publish, expires_at, seq };
                self.restoring.entry(key).or_default().insert(seq, Restoring { queued, released: false });
            }
            Record::Released { client_id, seq } => {
                if let Some(m) = key_of(self, &client_id)
                    .and_then(|key| self.restoring.get_mut(&key))
                    .and_then(|messages| messages.get_mut(&seq))
                {
                    m.released = true;
                }
            }
            Record::Done { client_id, seq } => {
                if let Some(messages) = key_of(self, &client_id).and_then(|key| self.restoring.get_mut(&key)) {
                    messages.remove(&seq);
                }
            }
            Record::Incoming { client_id, packet_id } => {
                if let Some(session) = key_of(self, &client_id).and_then(|key| self.sessions.get_mut(&key)) {
                    session.incoming_qos2.insert(packet_id);
                }
            }
            Record::IncomingDone { client_id, packet_id } => {
                if let Some(session) = key_of(self, &client_id).and_then(|key| self.sessions.get_mut(&key)) {
                    session.incoming_qos2.remove(&packet_id);
                }
            }
        }
        true
    }

    /// Ends restoring: queues every message read back, in log order, with
    /// DUP set (it may have reached its subscriber before the restart);
    /// those whose PUBREC had arrived wait for PUBCOMP under their packet
    /// id. A restored session's expiry, and its will's delay, count from
    /// when it lost its connection (a time in the log, kept across any
    /// number of restarts), or from `now` if it was connected when the
    /// broker stopped; a session past its expiry ends at the next tick.
    pub fn finish_restore(&mut self, now: u64) {
        self.deadline = None;
        let retained = core::mem::take(&mut self.restoring_retained);
        if !retained.is_empty() {
            self.retained.rebuild(retained);
        }
        for (key, messages) in core::mem::take(&mut self.restoring) {
            let Some(session) = self.sessions.get_mut(&key) else { continue };
            for (seq, Restoring { mut queued, released }) in messages {
                queued.publish.dup = true;
                if released {
                    let id = seq_packet_id(seq);
                    queued.publish.packet_id = Some(id);
                    session.inflight.insert(id, Outgoing { publish: queued.publish, state: Awaiting::Pubcomp, seq });
                } else {
                    session.queue.push_back(queued);
                }
            }
        }
        for (&key, session) in &mut self.sessions {
            let lost = *session.disconnected_at.get_or_insert_with(|| {
                self.lost_at_restart.push(key);
                now
            });
            if let Some(will) = &session.will {
                let delay = will.properties.will_delay_interval.unwrap_or(0);
                session.will_at = Some(lost + u64::from(delay) * 1000);
            }
        }
    }

    /// Durable sessions and retained messages held now (for the runner's log line).
    pub fn durable_counts(&self) -> (usize, usize) {
        (self.sessions.values().filter(|s| s.persisted).count(), self.retained.len())
    }
}

fn session_record(session: &super::session::Session) -> SessionRecord {
    SessionRecord {
        client_id: session.client_id.clone(),
        version: session.version,
        expiry: session.expiry,
        disconnected_at: session.disconnected_at,
        username: session.username.clone(),
        will: session.will.clone(),
    }
}
