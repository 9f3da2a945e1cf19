//! Sessions (MQTT 5 section 4.1): what the broker keeps for a client id
//! across connections — subscriptions, messages queued and in flight, the
//! will — and their life: creation, detaching from a connection, delayed
//! wills, expiry, removal.
//!
//! Owns the session table and the client-id index. Never writes to a
//! connection: resuming delivery is [`super::delivery`]'s job.

use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::string::{String, ToString};
use alloc::sync::Arc;
use alloc::vec::Vec;

use super::{Broker, ConnId};
use crate::auth::Want;
use crate::packet::{Payload, Publish, SubscriptionOptions, Version, Will};
use crate::store::record::Record;
use crate::subscriptions::{SessionKey, share_key};
use crate::topic;

/// What an outgoing QoS 1/2 message waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Awaiting {
    Puback,
    Pubrec,
    Pubcomp,
}

#[derive(Debug, Clone)]
pub(super) struct Outgoing {
    pub(super) publish: Publish,
    pub(super) state: Awaiting,
    /// Its number in a durable session's log; 0 when not logged.
    pub(super) seq: u64,
}

/// A message waiting for delivery, with its absolute expiry time.
#[derive(Debug, Clone)]
pub(super) struct Queued {
    pub(super) publish: Publish,
    pub(super) expires_at: Option<u64>,
    /// Its number in a durable session's log; 0 when not logged.
    pub(super) seq: u64,
}

/// What a stored message counts against the byte bounds
/// (`max_queued_bytes`, `max_retained_bytes`): its topic and payload.
pub(super) fn stored_bytes(p: &Publish) -> usize {
    p.topic.len() + p.payload.len()
}

impl Queued {
    pub(super) fn bytes(&self) -> usize {
        stored_bytes(&self.publish)
    }
}

/// A session's queued messages, oldest first, with the sum of their
/// [`Queued::bytes`] kept as they come and go.
#[derive(Debug, Default)]
pub(super) struct MessageQueue {
    messages: VecDeque<Queued>,
    bytes: usize,
}

impl MessageQueue {
    pub(super) fn len(&self) -> usize {
        self.messages.len()
    }

    /// Topic and payload bytes of every queued message.
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    pub(super) fn front(&self) -> Option<&Queued> {
        self.messages.front()
    }

    pub(super) fn iter(&self) -> impl DoubleEndedIterator<Item = &Queued> + ExactSizeIterator {
        self.messages.iter()
    }

    /// Each message's log number (nothing that changes its size).
    pub(super) fn seqs_mut(&mut self) -> impl Iterator<Item = (&Publish, &mut u64)> {
        self.messages.iter_mut().map(|q| (&q.publish, &mut q.seq))
    }

    pub(super) fn push_back(&mut self, queued: Queued) {
        self.bytes += queued.bytes();
        self.messages.push_back(queued);
    }

    pub(super) fn pop_front(&mut self) -> Option<Queued> {
        let queued = self.messages.pop_front()?;
        self.bytes -= queued.bytes();
        Some(queued)
    }

    pub(super) fn remove(&mut self, at: usize) -> Option<Queued> {
        let queued = self.messages.remove(at)?;
        self.bytes -= queued.bytes();
        Some(queued)
    }
}

/// A subscription as its session keeps it, to log and restore it.
pub(super) type Held = (SubscriptionOptions, Option<u32>);

#[derive(Debug)]
pub(super) struct Session {
    pub(super) client_id: String,
    /// The user the session was last authenticated as (for ACL reads).
    pub(super) username: Option<String>,
    pub(super) conn: Option<ConnId>,
    pub(super) version: Version,
    /// Seconds the session outlives its connection; u32::MAX: forever.
    pub(super) expiry: u32,
    pub(super) disconnected_at: Option<u64>,
    /// Raw filters (with any `$share/` prefix) this session holds.
    pub(super) filters: BTreeMap<String, Held>,
    pub(super) next_packet_id: u16,
    pub(super) inflight: BTreeMap<u16, Outgoing>,
    /// QoS 2 packet ids received and not yet released by PUBREL.
    pub(super) incoming_qos2: BTreeSet<u16>,
    pub(super) queue: MessageQueue,
    pub(super) will: Option<Will>,
    /// When a delayed will falls due, once the connection is gone.
    pub(super) will_at: Option<u64>,
    /// Its state is in the log (the broker keeps a journal and the
    /// session outlives its connection).
    pub(super) persisted: bool,
    /// The next log number for a message queued to it.
    pub(super) next_seq: u64,
}

impl Session {
    /// When a disconnected session ends, if it does.
    pub(super) fn end(&self) -> Option<u64> {
        let at = self.disconnected_at?;
        (self.expiry != u32::MAX).then(|| at + u64::from(self.expiry) * 1000)
    }

    /// The next packet identifier not in flight (1..=65535, wrapping).
    pub(super) fn next_free_id(&mut self) -> u16 {
        // The window is far smaller than 65535, so a free id is always found.
        loop {
            let id = self.next_packet_id;
            self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
            if !self.inflight.contains_key(&id) {
                return id;
            }
        }
    }
}

impl Broker {
    pub(super) fn new_session(&mut self, client_id: &str, version: Version) -> SessionKey {
        let key = self.next_session;
        self.next_session += 1;
        self.sessions.insert(
            key,
            Session {
                client_id: client_id.to_string(),
                username: None,
                conn: None,
                version,
                expiry: 0,
                disconnected_at: None,
                filters: BTreeMap::new(),
                next_packet_id: 1,
                inflight: BTreeMap::new(),
                incoming_qos2: BTreeSet::new(),
                queue: MessageQueue::default(),
                will: None,
                will_at: None,
                persisted: false,
                next_seq: 1,
            },
        );
        self.by_client_id.insert(client_id.to_string(), key);
        key
    }

    /// Detaches the session from its connection: will, expiry.
    pub(super) fn detach(&mut self, key: SessionKey, conn: ConnId, graceful: bool, now: u64) {
        self.deadline = None;
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
        } else {
            if delay == 0 {
                self.fire_will(key, now);
            }
            // Its will and expiry may have changed.
            self.log_session(key);
        }
    }

    pub(super) fn fire_will(&mut self, key: SessionKey, now: u64) {
        let Some(session) = self.sessions.get_mut(&key) else { return };
        session.will_at = None;
        let Some(will) = session.will.take() else { return };
        // Checked again now: the ACL may have changed since its CONNECT
        // (a will kept across a restart under a narrower ACL).
        let Some(session) = self.sessions.get(&key) else { return };
        if !self.acl_allows(session.username.as_deref(), &session.client_id, Want::Publish, &will.topic) {
            return;
        }
        let mut properties = will.properties;
        properties.will_delay_interval = None;
        let p = Publish {
            dup: false,
            qos: will.qos,
            retain: will.retain,
            topic: Arc::from(will.topic.as_str()),
            packet_id: None,
            properties: properties.into(),
            payload: Payload::from(will.payload.as_slice()),
        };
        self.accept_publish(key, p, now);
    }

    pub(super) fn remove_session(&mut self, key: SessionKey) {
        let Some(session) = self.sessions.remove(&key) else { return };
        if session.persisted {
            self.log(Record::SessionGone { client_id: session.client_id.clone() });
        }
        for raw in session.filters.keys() {
            if let Ok(parsed) = topic::parse_filter(raw, self.config.topic_limits)
                && let (true, Some(share)) = (self.index.remove(parsed, key), share_key(&parsed))
            {
                self.shares.left(&share);
            }
        }
        if self.by_client_id.get(&session.client_id) == Some(&key) {
            self.by_client_id.remove(&session.client_id);
        }
    }

    /// Fires the wills that fell due and ends the sessions that expired.
    pub(super) fn expire_sessions(&mut self, now: u64) {
        let due: Vec<SessionKey> =
            self.sessions.iter().filter(|(_, s)| s.will_at.is_some_and(|t| now >= t)).map(|(&k, _)| k).collect();
        for key in due {
            self.fire_will(key, now);
            self.log_session(key);
        }
        let expired: Vec<SessionKey> =
            self.sessions.iter().filter(|(_, s)| s.end().is_some_and(|t| now >= t)).map(|(&k, _)| k).collect();
        for key in expired {
            self.fire_will(key, now);
            self.remove_session(key);
        }
    }
}
