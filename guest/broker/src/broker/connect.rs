//! CONNECT (MQTT 5 section 3.1, 3.1.1 section 3.1): admission (capacity,
//! credentials, will, keep-alive), the client identifier, session take-over
//! or resumption, and the CONNACK with what the server decided.
//!
//! Owns the order of the checks, which decides the reason code a refused
//! client sees. Never lets a refused client touch a session.

use alloc::format;
use alloc::string::String;

use super::connection::Phase;
use super::{Broker, ConnId, reason};
use crate::auth::Want;
use crate::packet::{Connack, Connect, Packet, QoS, Version};
use crate::properties::Properties;
use crate::subscriptions::SessionKey;
use crate::topic;

/// A refused CONNECT: the v5 reason code and the 3.x return code.
struct Refused {
    v5: u8,
    v3: u8,
}

const fn refused(v5: u8, v3: u8) -> Refused {
    Refused { v5, v3 }
}

impl Broker {
    pub(super) fn handle_connect(&mut self, conn: ConnId, mut connect: Connect, now: u64) {
        let version = connect.version;
        if let Some(c) = self.conns.get_mut(&conn) {
            c.version = version;
        }
        let admitted = self.admit(&connect).and_then(|keep_alive| {
            let (client_id, assigned) = self.client_id(&connect)?;
            self.room_for_session(&client_id)?;
            self.store_allows(&connect, &client_id)?;
            Ok((keep_alive, client_id, assigned))
        });
        let (keep_alive, client_id, assigned) = match admitted {
            Ok(admitted) => admitted,
            Err(Refused { v5, v3 }) => {
                self.stats.connections_refused += 1;
                let code = if version == Version::V5 { v5 } else { v3 };
                self.send(conn, version, &connack(false, code, Properties::default()));
                return self.close(conn);
            }
        };
        let (key, session_present) = self.take_session(&connect, &client_id, now);
        let expiry = self.session_expiry(&connect);
        if let Some(s) = self.sessions.get_mut(&key) {
            s.conn = Some(conn);
            s.version = version;
            s.expiry = expiry;
            s.disconnected_at = None;
            // A reconnect before a delayed will fires cancels it (MQTT 5 3.1.3.2.2).
            s.will_at = None;
            s.will = connect.will.take();
            s.username = connect.username.clone();
        }
        self.log_session(key);
        if let Some(c) = self.conns.get_mut(&conn) {
            c.phase = Phase::Connected(key);
            self.connected += 1;
            c.keep_alive_ms = u64::from(keep_alive.unwrap_or(connect.keep_alive)) * 1000;
            c.client_max_packet = connect.properties.maximum_packet_size.map_or(usize::MAX, |m| m as usize);
            c.client_receive_max = connect.properties.receive_maximum.unwrap_or(u16::MAX);
            c.client_alias_max = connect.properties.topic_alias_maximum.unwrap_or(0);
            c.username = connect.username.clone();
            c.client_id = client_id.clone();
            c.problem_information = connect.properties.request_problem_information != Some(0);
        }
        let properties = if version == Version::V5 {
            self.connack_properties(&connect, &client_id, assigned, keep_alive, expiry)
        } else {
            Properties::default()
        };
        let code = if version == Version::V5 { reason::SUCCESS } else { reason::v3::ACCEPTED };
        self.send_to(conn, &connack(session_present, code, properties));
        // Resume: unacknowledged messages again (DUP), then the queue.
        self.resend_inflight(key, conn);
        self.pump(key, now);
    }

    /// Checks everything that can refuse a client before it gets a session.
    /// Returns the keep-alive the server imposes, if it overrides the client's.
    fn admit(&self, connect: &Connect) -> Result<Option<u16>, Refused> {
        if self.connected >= self.config.max_connections {
            return Err(refused(reason::SERVER_BUSY, reason::v3::SERVER_UNAVAILABLE));
        }
        let v5 = connect.version == Version::V5;
        if v5 && connect.properties.authentication_method.is_some() {
            // No authentication methods are configured (MQTT 5 4.12).
            return Err(refused(reason::BAD_AUTHENTICATION_METHOD, reason::v3::NOT_AUTHORIZED));
        }
        let user = connect.username.as_deref();
        let authenticated = match (&self.config.passwords, user) {
            (_, None) => self.config.allow_anonymous,
            (Some(passwords), Some(name)) => connect.password.as_deref().is_some_and(|pw| passwords.verify(name, pw)),
            // A user name but no password file: nothing to check it against.
            (None, Some(_)) => self.config.allow_anonymous,
        };
        if !authenticated {
            return Err(match user {
                Some(_) => refused(reason::BAD_USER_NAME_OR_PASSWORD, reason::v3::BAD_USER_NAME_OR_PASSWORD),
                None => refused(reason::NOT_AUTHORIZED, reason::v3::NOT_AUTHORIZED),
            });
        }
        if let Some(will) = &connect.will {
            if !self.acl_allows(user, &connect.client_id, Want::Publish, &will.topic) {
                return Err(refused(reason::NOT_AUTHORIZED, reason::v3::NOT_AUTHORIZED));
            }
            if topic::validate_name(&will.topic, self.config.topic_limits).is_err() {
                return Err(refused(reason::TOPIC_NAME_INVALID, reason::v3::NOT_AUTHORIZED));
            }
            if will.qos > self.config.max_qos {
                return Err(refused(reason::QOS_NOT_SUPPORTED, reason::v3::NOT_AUTHORIZED));
            }
            if will.retain && !self.config.retain_available {
                return Err(refused(reason::RETAIN_NOT_SUPPORTED, reason::v3::NOT_AUTHORIZED));
            }
        }
        // Mosquitto's `max_keepalive`: asking for more, or for none, gets the
        // cap as Server Keep Alive; a 3.x client cannot be told, so it is
        // refused with "identifier rejected", as Mosquitto does.
        match self.config.max_keep_alive {
            Some(cap) if connect.keep_alive == 0 || connect.keep_alive > cap => {
                if v5 {
                    Ok(Some(cap))
                } else {
                    Err(refused(reason::UNSPECIFIED_ERROR, reason::v3::IDENTIFIER_REJECTED))
                }
            }
            _ => Ok(None),
        }
    }

    /// A client without a session gets one only within `max_sessions` and
    /// while memory is not low; resuming or taking over one always works.
    fn room_for_session(&mut self, client_id: &str) -> Result<(), Refused> {
        if self.by_client_id.contains_key(client_id) {
            return Ok(());
        }
        if self.memory_low {
            self.stats.quota_refusals += 1;
        } else if self.sessions.len() < self.config.max_sessions {
            return Ok(());
        }
        Err(refused(reason::QUOTA_EXCEEDED, reason::v3::SERVER_UNAVAILABLE))
    }

    /// While the state store fails, a session that would need it is
    /// refused: one that outlives its connection, or one that resumes or
    /// discards a session on disk (its new will and expiry, or its end,
    /// could not be kept).
    fn store_allows(&mut self, connect: &Connect, client_id: &str) -> Result<(), Refused> {
        if !self.store_failed {
            return Ok(());
        }
        let on_disk =
            self.by_client_id.get(client_id).and_then(|key| self.sessions.get(key)).is_some_and(|s| s.persisted);
        if self.session_expiry(connect) > 0 || on_disk {
            self.stats.quota_refusals += 1;
            return Err(refused(reason::SERVER_UNAVAILABLE, reason::v3::SERVER_UNAVAILABLE));
        }
        Ok(())
    }

    /// The client identifier, and whether the server assigned it (v5 says so
    /// in the CONNACK).
    fn client_id(&mut self, connect: &Connect) -> Result<(String, bool), Refused> {
        if !connect.client_id.is_empty() {
            return Ok((connect.client_id.clone(), false));
        }
        if connect.version != Version::V5 && !connect.clean_start {
            // 3.1.1 3.1.3-8: a zero-length id needs a clean session.
            return Err(refused(reason::CLIENT_IDENTIFIER_NOT_VALID, reason::v3::IDENTIFIER_REJECTED));
        }
        let id = format!("mqvisor-{}", self.next_assigned_id);
        self.next_assigned_id += 1;
        Ok((id, connect.version == Version::V5))
    }

    /// Ends the connection that holds `client_id`'s session (MQTT 5 3.1.4-3),
    /// then resumes that session or starts a new one. Returns the session and
    /// whether it was resumed. A session past its expiry is not resumed,
    /// even if no tick has ended it yet (after a restart, say).
    fn take_session(&mut self, connect: &Connect, client_id: &str, now: u64) -> (SessionKey, bool) {
        let existing = self.by_client_id.get(client_id).copied();
        if let Some(old) = existing.and_then(|k| self.sessions.get(&k)).and_then(|s| s.conn) {
            self.end_connection(old, super::refuse(reason::SESSION_TAKEN_OVER, "session taken over"), now);
        }
        let live = |key| self.sessions.get(&key).is_some_and(|s| s.end().is_none_or(|t| now < t));
        match existing {
            Some(key) if !connect.clean_start && live(key) => (key, true),
            Some(key) => {
                self.fire_will(key, now);
                self.remove_session(key);
                (self.new_session(client_id, connect.version), false)
            }
            None => (self.new_session(client_id, connect.version), false),
        }
    }

    /// Seconds the session outlives the connection: v5 asks, 3.x has clean
    /// session; both are capped by the configuration.
    fn session_expiry(&self, connect: &Connect) -> u32 {
        if connect.version == Version::V5 {
            connect.properties.session_expiry_interval.unwrap_or(0).min(self.config.max_session_expiry)
        } else if connect.clean_start {
            0
        } else {
            self.config.max_session_expiry
        }
    }

    /// What a v5 CONNACK tells the client about the server's limits and decisions.
    fn connack_properties(
        &self,
        connect: &Connect,
        client_id: &str,
        assigned: bool,
        server_keep_alive: Option<u16>,
        expiry: u32,
    ) -> Properties {
        let mut props = Properties {
            assigned_client_identifier: assigned.then(|| String::from(client_id)),
            receive_maximum: Some(self.config.receive_maximum),
            maximum_packet_size: u32::try_from(self.config.max_packet_size).ok(),
            topic_alias_maximum: Some(self.config.topic_alias_maximum),
            server_keep_alive,
            ..Properties::default()
        };
        if !self.config.retain_available {
            props.retain_available = Some(0);
        }
        if self.config.max_qos < QoS::ExactlyOnce {
            props.maximum_qos = Some(self.config.max_qos as u8);
        }
        if connect.properties.session_expiry_interval.is_some_and(|e| e > expiry) {
            props.session_expiry_interval = Some(expiry);
        }
        if connect.properties.request_response_information == Some(1) {
            // A per-client prefix for response topics (MQTT 5 4.10).
            props.response_information = Some(format!("response/{client_id}/"));
        }
        props
    }
}

pub(super) fn connack(session_present: bool, code: u8, properties: Properties) -> Packet {
    Packet::Connack(Connack { session_present, code, properties })
}
