//! The broker's settings: every limit and switch, their defaults, and the
//! one check ([`Config::validate`]) that every runner applies before it
//! builds a [`super::Broker`].
//!
//! Owns what a setting means and which values are refused. Never reads a
//! file or a command line: runners turn those into a `Config`.

use core::fmt;

use crate::auth::{Acl, PasswordFile};
use crate::packet::QoS;
use crate::topic::TopicLimits;

/// The largest packet MQTT can express: a 4-byte remaining length of
/// 268,435,455 plus a 5-byte fixed header.
pub const MAX_PACKET_SIZE_LIMIT: usize = 268_435_460;
/// The smallest `max_packet_size` that still fits a useful CONNECT.
pub const MIN_PACKET_SIZE: usize = 16;

/// Limits and switches; every limit is explicit.
#[derive(Debug, Clone)]
pub struct Config {
    pub max_connections: usize,
    /// Largest packet accepted from a client, and announced to v5 clients.
    pub max_packet_size: usize,
    /// Messages queued per offline or slow session before new ones drop.
    pub max_queued_messages: usize,
    /// Topic and payload bytes queued per offline or slow session before
    /// new messages drop (a message alone in its queue is never dropped
    /// for its size); 0: no byte bound.
    pub max_queued_bytes: usize,
    /// Outgoing QoS 1/2 messages unacknowledged per session.
    pub max_inflight: u16,
    /// Incoming QoS 1/2 messages a client may have unacknowledged (v5 Receive Maximum).
    pub receive_maximum: u16,
    pub topic_limits: TopicLimits,
    /// Sessions kept at most, connected or not; past it a client without a
    /// session is refused (v5 0x97 Quota exceeded, 3.x "server unavailable").
    pub max_sessions: usize,
    /// Retained messages kept at most; past it new topics are refused
    /// (v5 0x97 Quota exceeded, 3.x counted drops).
    pub max_retained_messages: usize,
    /// Topic and payload bytes of all retained messages together, at most.
    pub max_retained_bytes: usize,
    pub max_subscriptions_per_client: usize,
    pub max_qos: QoS,
    pub retain_available: bool,
    /// Topic aliases a v5 client may use towards us.
    pub topic_alias_maximum: u16,
    /// The longest keep-alive a client may ask for, seconds (Mosquitto's
    /// `max_keepalive`). A client asking for more, or for none (0), gets this
    /// value as v5 Server Keep Alive; a 3.x client asking for more is refused
    /// (there is no way to tell it). `None`: any keep-alive, 0 included.
    pub max_keep_alive: Option<u16>,
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
            max_queued_bytes: 16 << 20,
            max_inflight: 20,
            receive_maximum: 100,
            topic_limits: TopicLimits::default(),
            max_sessions: 100_000,
            max_retained_messages: 100_000,
            max_retained_bytes: 64 << 20,
            max_subscriptions_per_client: 1000,
            max_qos: QoS::ExactlyOnce,
            retain_available: true,
            topic_alias_maximum: 16,
            max_keep_alive: None,
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

/// A setting the broker cannot work with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigError {
    /// `max_packet_size` outside `MIN_PACKET_SIZE..=MAX_PACKET_SIZE_LIMIT`.
    PacketSize(usize),
    /// `max_inflight` or `receive_maximum` is 0: nothing could ever be sent.
    ZeroWindow,
    /// A topic length or level limit of 0: no topic would be valid.
    ZeroTopicLimit,
    /// `max_keep_alive` of 0 would refuse every client.
    ZeroKeepAlive,
    /// `connect_timeout_ms` of 0 would close every connection at once.
    ZeroConnectTimeout,
}

impl core::error::Error for ConfigError {}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::PacketSize(n) => {
                write!(f, "max packet size {n} is outside {MIN_PACKET_SIZE}..={MAX_PACKET_SIZE_LIMIT}")
            }
            ConfigError::ZeroWindow => f.write_str("max inflight and receive maximum must be at least 1"),
            ConfigError::ZeroTopicLimit => f.write_str("topic length and level limits must be at least 1"),
            ConfigError::ZeroKeepAlive => f.write_str("max keep alive must be at least 1 second"),
            ConfigError::ZeroConnectTimeout => f.write_str("connect timeout must be at least 1 ms"),
        }
    }
}

impl Config {
    /// Refuses settings the broker cannot honour. Every runner calls this
    /// before [`super::Broker::new`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(MIN_PACKET_SIZE..=MAX_PACKET_SIZE_LIMIT).contains(&self.max_packet_size) {
            return Err(ConfigError::PacketSize(self.max_packet_size));
        }
        if self.max_inflight == 0 || self.receive_maximum == 0 {
            return Err(ConfigError::ZeroWindow);
        }
        if self.topic_limits.max_len == 0 || self.topic_limits.max_levels == 0 {
            return Err(ConfigError::ZeroTopicLimit);
        }
        if self.max_keep_alive == Some(0) {
            return Err(ConfigError::ZeroKeepAlive);
        }
        if self.connect_timeout_ms == 0 {
            return Err(ConfigError::ZeroConnectTimeout);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_each_impossible_setting_is_named() {
        assert_eq!(Config::default().validate(), Ok(()));
        let bad = |c: Config| c.validate().unwrap_err();
        assert_eq!(bad(Config { max_packet_size: 15, ..Config::default() }), ConfigError::PacketSize(15));
        assert_eq!(
            bad(Config { max_packet_size: MAX_PACKET_SIZE_LIMIT + 1, ..Config::default() }),
            ConfigError::PacketSize(MAX_PACKET_SIZE_LIMIT + 1)
        );
        assert_eq!(bad(Config { max_inflight: 0, ..Config::default() }), ConfigError::ZeroWindow);
        let no_levels = TopicLimits { max_levels: 0, ..TopicLimits::default() };
        assert_eq!(bad(Config { topic_limits: no_levels, ..Config::default() }), ConfigError::ZeroTopicLimit);
        assert_eq!(bad(Config { max_keep_alive: Some(0), ..Config::default() }), ConfigError::ZeroKeepAlive);
        assert_eq!(bad(Config { connect_timeout_ms: 0, ..Config::default() }), ConfigError::ZeroConnectTimeout);
    }
}
