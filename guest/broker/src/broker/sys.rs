//! The broker's counters and their publication as retained `$SYS/broker/...`
//! messages (the topics Mosquitto uses, so existing dashboards work).
//!
//! Owns nothing but the counters; never publishes anything a client sent.

use alloc::format;
use alloc::string::ToString;
use alloc::sync::Arc;

use super::Broker;
use crate::packet::{Payload, Publish, QoS};

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
    /// Publishes and subscriptions refused because memory ran low (v5:
    /// reason code 0x97 Quota exceeded; 3.x: QoS 1/2 end the connection
    /// unacknowledged, QoS 0 is dropped).
    pub quota_refusals: u64,
}

impl Broker {
    pub(super) fn publish_sys(&mut self, now: u64) {
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
            ("$SYS/broker/messages/refused", stats.quota_refusals.to_string()),
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
                properties: Default::default(),
                payload: Payload::from(value.as_bytes()),
            };
            self.retained.set(&p, None);
            self.route(None, &p, None, now);
        }
    }
}
