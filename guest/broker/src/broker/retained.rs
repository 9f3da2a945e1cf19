//! The retained messages: at most one per topic, with their count and size
//! kept so that a bound is checked before a message is stored, never after.
//!
//! Owns the store and its totals. Never decides what to refuse: the
//! delivery path asks [`Retained::fits`] and answers the client.

use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use alloc::vec::Vec;

use super::session::{Queued, stored_bytes};
use crate::packet::Publish;

#[derive(Default)]
pub(super) struct Retained {
    by_topic: BTreeMap<Arc<str>, Queued>,
    /// Topic and payload bytes of every stored message.
    bytes: usize,
}

impl Retained {
    pub(super) fn len(&self) -> usize {
        self.by_topic.len()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &Queued)> {
        self.by_topic.iter()
    }

    /// Whether storing `p` keeps the store within `max_count` messages and
    /// `max_bytes` bytes (a deletion or a smaller replacement always does).
    pub(super) fn fits(&self, p: &Publish, max_count: usize, max_bytes: usize) -> bool {
        let old = self.by_topic.get(&p.topic).map(|q| stored_bytes(&q.publish));
        if p.payload.is_empty() || old.is_some_and(|old| old >= stored_bytes(p)) {
            return true;
        }
        let count = self.by_topic.len() + usize::from(old.is_none());
        count <= max_count && self.bytes - old.unwrap_or(0) + stored_bytes(p) <= max_bytes
    }

    /// Stores `p` for its topic, or deletes the topic's message when the
    /// payload is empty (MQTT 3.3.1.3).
    pub(super) fn set(&mut self, p: &Publish, expires_at: Option<u64>) {
        if p.payload.is_empty() {
            if let Some(old) = self.by_topic.remove(&p.topic) {
                self.bytes -= stored_bytes(&old.publish);
            }
            return;
        }
        self.bytes += stored_bytes(p);
        // One walk of the tree, not a removal and an insertion.
        let message = Queued { publish: p.clone(), expires_at, seq: 0 };
        if let Some(old) = self.by_topic.insert(p.topic.clone(), message) {
            self.bytes -= stored_bytes(&old.publish);
        }
    }

    /// The message held for `topic`.
    pub(super) fn get(&self, topic: &str) -> Option<&Queued> {
        self.by_topic.get(topic)
    }

    /// Puts back what `topic` held (`None`: nothing), undoing a change.
    pub(super) fn restore(&mut self, topic: Arc<str>, message: Option<Queued>) {
        let old = match message {
            Some(message) => {
                self.bytes += stored_bytes(&message.publish);
                self.by_topic.insert(topic, message)
            }
            None => self.by_topic.remove(&topic),
        };
        if let Some(old) = old {
            self.bytes -= stored_bytes(&old.publish);
        }
    }

    /// Replaces the store with the last word on each topic in `changes`
    /// (in log order; `None` deletes): one sort and one bulk build instead
    /// of a tree walk per change, which is most of a restart's time with a
    /// million retained messages.
    pub(super) fn rebuild(&mut self, mut changes: Vec<(Arc<str>, Option<Queued>)>) {
        // Stable: among changes to one topic, the last in the log stays last.
        changes.sort_by(|a, b| a.0.cmp(&b.0));
        let mut last: Vec<(Arc<str>, Option<Queued>)> = Vec::with_capacity(changes.len());
        for change in changes {
            match last.last_mut() {
                Some(previous) if previous.0 == change.0 => *previous = change,
                _ => last.push(change),
            }
        }
        self.bytes = 0;
        let bytes = &mut self.bytes;
        self.by_topic = last
            .into_iter()
            .filter_map(|(topic, message)| {
                let message = message?;
                *bytes += stored_bytes(&message.publish);
                Some((topic, message))
            })
            .collect();
    }

    /// Drops messages whose expiry has passed.
    pub(super) fn expire(&mut self, now: u64) {
        let bytes = &mut self.bytes;
        self.by_topic.retain(|_, m| {
            let keep = m.expires_at.is_none_or(|t| now < t);
            if !keep {
                *bytes -= stored_bytes(&m.publish);
            }
            keep
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{Payload, QoS};

    fn message(topic: &str, payload: &[u8]) -> (Arc<str>, Option<Queued>) {
        let publish = Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: true,
            topic: topic.into(),
            packet_id: None,
            properties: Default::default(),
            payload: Payload::from(payload),
        };
        (topic.into(), Some(Queued { publish, expires_at: None, seq: 0 }))
    }

    #[test]
    fn a_rebuild_keeps_the_last_change_of_each_topic_in_log_order() {
        let gone = |topic: &str| (Arc::from(topic), None);
        let mut store = Retained::default();
        store.rebuild(alloc::vec![
            message("a", b"1"),
            message("b", b"22"),
            gone("a"),
            message("c", b"333"),
            message("a", b"4444"),
            gone("b"),
            gone("never-set"),
        ]);
        let kept: Vec<(&str, &[u8])> = store.iter().map(|(t, m)| (&**t, &*m.publish.payload)).collect();
        assert_eq!(kept, [("a", &b"4444"[..]), ("c", b"333")]);
        assert_eq!(store.bytes, 1 + 4 + 1 + 3, "topic and payload bytes of what is kept");
    }
}
