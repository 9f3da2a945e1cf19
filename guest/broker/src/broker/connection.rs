//! Per transport connection state: where it is in its life (before CONNECT,
//! attached to a session, closing), its input and output buffers, and what
//! its CONNECT negotiated (keep-alive, limits, topic aliases both ways).
//!
//! Owns nothing that outlives the connection: anything a session keeps
//! across reconnects lives in [`super::session`].

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;

use super::output::Output;
use crate::packet::{Publish, Version};
use crate::subscriptions::SessionKey;

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Phase {
    AwaitingConnect,
    Connected(SessionKey),
    /// The broker is ending the connection: its remaining output goes out,
    /// then the runner is told to close it; input is ignored.
    Closing,
}

pub(super) struct Conn {
    pub(super) opened_at: u64,
    pub(super) phase: Phase,
    pub(super) version: Version,
    /// Bytes of a packet not yet complete.
    pub(super) inbuf: Vec<u8>,
    /// Encoded packets not yet taken by the runner.
    pub(super) out: Output,
    pub(super) keep_alive_ms: u64,
    pub(super) last_rx: u64,
    /// v5: what the client accepts from us.
    pub(super) client_max_packet: usize,
    pub(super) client_receive_max: u16,
    pub(super) client_alias_max: u16,
    /// Aliases the client set towards us.
    pub(super) inbound_aliases: BTreeMap<u16, Arc<str>>,
    /// Aliases we set towards the client.
    pub(super) outbound_aliases: BTreeMap<Arc<str>, u16>,
    /// The authenticated user, for ACL checks.
    pub(super) username: Option<String>,
    pub(super) client_id: String,
    /// v5: the client accepts reason strings.
    pub(super) problem_information: bool,
}

impl Conn {
    pub(super) fn new(now: u64) -> Conn {
        Conn {
            opened_at: now,
            phase: Phase::AwaitingConnect,
            version: Version::V3_1_1,
            inbuf: Vec::new(),
            out: Output::default(),
            keep_alive_ms: 0,
            last_rx: now,
            client_max_packet: usize::MAX,
            client_receive_max: u16::MAX,
            client_alias_max: 0,
            inbound_aliases: BTreeMap::new(),
            outbound_aliases: BTreeMap::new(),
            username: None,
            client_id: String::new(),
            problem_information: true,
        }
    }

    /// When silence on this connection ends it (keep-alive times 1.5, MQTT
    /// 3.1.2.10), if ever.
    pub(super) fn keep_alive_deadline(&self) -> Option<u64> {
        (self.keep_alive_ms > 0 && self.phase != Phase::Closing).then(|| self.last_rx + self.keep_alive_ms * 3 / 2)
    }

    /// When a connection that has not sent CONNECT is closed, if it has not.
    pub(super) fn connect_deadline(&self, timeout_ms: u64) -> Option<u64> {
        (self.phase == Phase::AwaitingConnect).then(|| self.opened_at + timeout_ms)
    }

    /// Uses a topic alias towards a v5 client that accepts them: the first
    /// message on a topic sets the alias, later ones send it with an empty
    /// topic, until the client's alias table is full.
    pub(super) fn apply_outbound_alias(&mut self, publish: &mut Publish) {
        if self.client_alias_max == 0 || publish.dup {
            return;
        }
        if let Some(&alias) = self.outbound_aliases.get(&publish.topic) {
            publish.properties.make_mut().topic_alias = Some(alias);
            publish.topic = Arc::from("");
        } else if let Some(next) =
            u16::try_from(self.outbound_aliases.len() + 1).ok().filter(|&n| n <= self.client_alias_max)
        {
            self.outbound_aliases.insert(publish.topic.clone(), next);
            publish.properties.make_mut().topic_alias = Some(next);
        }
    }
}
