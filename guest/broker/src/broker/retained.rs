//! The retained messages: at most one per topic, with their count and size
//! kept so that a bound is checked before a message is stored, never after.
//!
//! Owns the store and its totals. Never decides what to refuse: the
//! delivery path asks [`Retained::fits`] and answers the client.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::sync::Arc;

use super::session::Queued;
use crate::packet::Publish;

#[derive(Default)]
pub(super) struct Retained {
    /// Boxed: a message with its properties is a few hundred bytes, which
    /// tree nodes would otherwise shift on every insertion.
    by_topic: BTreeMap<Arc<str>, Box<Queued>>,
    /// Topic and payload bytes of every stored message.
    bytes: usize,
}

fn size(p: &Publish) -> usize {
    p.topic.len() + p.payload.len()
}

impl Retained {
    pub(super) fn len(&self) -> usize {
        self.by_topic.len()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &Queued)> {
        self.by_topic.iter().map(|(topic, message)| (topic, &**message))
    }

    /// Whether storing `p` keeps the store within `max_count` messages and
    /// `max_bytes` bytes (a deletion or a smaller replacement always does).
    pub(super) fn fits(&self, p: &Publish, max_count: usize, max_bytes: usize) -> bool {
        let old = self.by_topic.get(&p.topic).map(|q| size(&q.publish));
        if p.payload.is_empty() || old.is_some_and(|old| old >= size(p)) {
            return true;
        }
        let count = self.by_topic.len() + usize::from(old.is_none());
        count <= max_count && self.bytes - old.unwrap_or(0) + size(p) <= max_bytes
    }

    /// Stores `p` for its topic, or deletes the topic's message when the
    /// payload is empty (MQTT 3.3.1.3).
    pub(super) fn set(&mut self, p: &Publish, expires_at: Option<u64>) {
        self.set_owned(p.clone(), expires_at);
    }

    /// [`Retained::set`] for a message the caller gives away (a restart
    /// sets a million of these: one walk of the tree each, no copy).
    pub(super) fn set_owned(&mut self, p: Publish, expires_at: Option<u64>) {
        if p.payload.is_empty() {
            if let Some(old) = self.by_topic.remove(&p.topic) {
                self.bytes -= size(&old.publish);
            }
            return;
        }
        self.bytes += size(&p);
        let topic = p.topic.clone();
        if let Some(old) = self.by_topic.insert(topic, Box::new(Queued { publish: p, expires_at, seq: 0 })) {
            self.bytes -= size(&old.publish);
        }
    }

    /// Drops messages whose expiry has passed.
    pub(super) fn expire(&mut self, now: u64) {
        let bytes = &mut self.bytes;
        self.by_topic.retain(|_, m| {
            let keep = m.expires_at.is_none_or(|t| now < t);
            if !keep {
                *bytes -= size(&m.publish);
            }
            keep
        });
    }
}
