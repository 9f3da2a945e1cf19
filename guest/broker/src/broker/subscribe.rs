//! SUBSCRIBE and UNSUBSCRIBE (MQTT 5 sections 3.8 to 3.11): filter checks,
//! read access, the per-client subscription limit, granted QoS, and the
//! retained messages a new subscription receives.
//!
//! Owns the session's side of the subscription index (its `filters`); the
//! index itself is [`crate::subscriptions`].

use alloc::vec::Vec;

use super::{Broker, ConnId, Refusal, reason, refuse};
use crate::auth::Want;
use crate::packet::{Packet, Subscribe, Unsubscribe, Version};
use crate::properties::Properties;
use crate::store::record::Record;
use crate::subscriptions::{SessionKey, Subscription, share_key};
use crate::topic;

impl Broker {
    pub(super) fn handle_subscribe(
        &mut self,
        conn: ConnId,
        key: SessionKey,
        s: Subscribe,
        now: u64,
    ) -> Result<(), Refusal> {
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
            if !self.conn_allows(conn, Want::Read, parsed.filter) {
                codes.push(if v5 { reason::NOT_AUTHORIZED } else { reason::UNSPECIFIED_ERROR });
                continue;
            }
            let session = self.sessions.get_mut(&key).ok_or(refuse(reason::UNSPECIFIED_ERROR, "no session"))?;
            if parsed.share_name.is_some() && options.no_local {
                // MQTT 5 3.8.3-4: no local on a shared subscription is a protocol error.
                return Err(refuse(reason::PROTOCOL_ERROR, "no local on a shared subscription"));
            }
            if self.store_failed && session.persisted {
                // A durable session's subscriptions are on disk, which fails.
                self.stats.quota_refusals += 1;
                codes.push(if v5 { reason::QUOTA_EXCEEDED } else { reason::UNSPECIFIED_ERROR });
                continue;
            }
            if !session.filters.contains_key(raw.as_str())
                && (session.filters.len() >= self.config.max_subscriptions_per_client || self.memory_low)
            {
                if self.memory_low {
                    self.stats.quota_refusals += 1;
                }
                codes.push(if v5 { reason::QUOTA_EXCEEDED } else { reason::UNSPECIFIED_ERROR });
                continue;
            }
            let mut granted = *options;
            granted.qos = options.qos.min(self.config.max_qos);
            let subscription = Subscription::new(key, &parsed, granted, identifier);
            let share = subscription.share_key.clone();
            let existed = self.index.insert(parsed, subscription);
            if let (false, Some(share)) = (existed, &share) {
                self.shares.joined(share);
            }
            session.filters.insert(raw.clone(), (granted, identifier));
            if session.persisted {
                let client_id = session.client_id.clone();
                self.log(Record::Subscribe { client_id, filter: raw.clone(), options: granted, identifier });
            }
            codes.push(granted.qos as u8);
            let wants_retained = match granted.retain_handling {
                0 => true,
                1 => !existed,
                _ => false,
            };
            if wants_retained && parsed.share_name.is_none() {
                for (name, message) in self.retained.iter() {
                    if topic::matches(parsed.filter, name) {
                        let mut p = message.publish.clone();
                        p.qos = p.qos.min(granted.qos);
                        // Retained messages keep retain = 1 on subscribe (3.3.1.3).
                        p.retain = true;
                        p.dup = false;
                        let ids: Vec<u32> = identifier.into_iter().collect();
                        if p.properties.subscription_identifiers != ids {
                            p.properties.make_mut().subscription_identifiers = ids;
                        }
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

    pub(super) fn handle_unsubscribe(
        &mut self,
        conn: ConnId,
        key: SessionKey,
        u: Unsubscribe,
        now: u64,
    ) -> Result<(), Refusal> {
        // A durable session's subscriptions are on disk: while it fails,
        // they stay (v5: 0x80 per filter; a 3.x UNSUBACK cannot say no, so
        // the connection ends without one).
        let on_disk = |b: &Broker, raw: &str| {
            b.store_failed && b.sessions.get(&key).is_some_and(|s| s.persisted && s.filters.contains_key(raw))
        };
        let v5 = self.conns.get(&conn).is_some_and(|c| c.version == Version::V5);
        if !v5 && u.filters.iter().any(|raw| on_disk(self, raw)) {
            self.refuse_for_store(conn, now);
            return Ok(());
        }
        let mut codes = Vec::with_capacity(u.filters.len());
        for raw in &u.filters {
            if on_disk(self, raw) {
                self.stats.quota_refusals += 1;
                codes.push(reason::UNSPECIFIED_ERROR);
                continue;
            }
            let removed = match topic::parse_filter(raw, self.config.topic_limits) {
                Ok(parsed) => {
                    let removed = self.index.remove(parsed, key);
                    if let (true, Some(share)) = (removed, share_key(&parsed)) {
                        self.shares.left(&share);
                    }
                    removed
                }
                Err(_) => false,
            };
            if let Some(session) = self.sessions.get_mut(&key)
                && session.filters.remove(raw.as_str()).is_some()
                && session.persisted
            {
                let client_id = session.client_id.clone();
                self.log(Record::Unsubscribe { client_id, filter: raw.clone() });
            }
            codes.push(if removed { reason::SUCCESS } else { reason::NO_SUBSCRIPTION_EXISTED });
        }
        self.send_to(conn, &Packet::Unsuback { packet_id: u.packet_id, properties: Properties::default(), codes });
        Ok(())
    }
}
