//! The shared port's front: reads a client's first packet (with a deadline
//! and a size bound), picks the tenant from the CONNECT user name
//! `TENANT:USER` (RabbitMQ's convention for virtual hosts), and rewrites the
//! CONNECT so the tenant's broker sees `USER` (an empty `USER` is an
//! anonymous client of that tenant).
//!
//! Owns that decision, the bytes it read to make it ([`FirstBytes`],
//! charged to one budget for the whole host until the tenant's process has
//! them) and the clients still sending them ([`Pending`]): it never boots a
//! VM and never keeps a byte of the client's traffic beyond those.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use mqvisor_broker::broker::reason;
use mqvisor_broker::packet::{self, Connack, Connect, Packet, Version};
use mqvisor_broker::properties::Properties;
use mqvisor_broker::wire::DecodeError;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// How long a client may take to send its CONNECT.
pub const FIRST_PACKET_DEADLINE: Duration = Duration::from_secs(10);
/// Bytes read while waiting for a CONNECT, at most (a CONNECT with a will and
/// properties fits; the tenant's own limits apply after the handoff).
pub const MAX_FIRST_BYTES: usize = 64 * 1024;

/// Bytes of first packets held at once, host-wide: read by the front or
/// waiting in the tenants' handoff queues. A CONNECT is rarely over 1 KiB,
/// so this holds 500 of the largest at once, or tens of thousands of usual
/// ones; past it the client whose bytes do not fit is dropped, so a flood of
/// large half-sent CONNECTs costs the daemon this much at most.
pub const MAX_PENDING_BYTES: usize = 32 << 20;
/// What a read asks for at a time: memory follows what clients send, not
/// the length they announce.
const READ_CHUNK: usize = 4096;

static PENDING_BYTES: AtomicUsize = AtomicUsize::new(0);
static PENDING_CLIENTS: AtomicUsize = AtomicUsize::new(0);
static DROPPED_OVER_BUDGET: AtomicU64 = AtomicU64::new(0);
static DROPPED_OLDEST: AtomicU64 = AtomicU64::new(0);

/// What the front holds and what it dropped, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrontStats {
    /// Clients still sending their first packet.
    pub pending_clients: u64,
    /// Bytes of first packets held (see [`MAX_PENDING_BYTES`]).
    pub pending_bytes: u64,
    /// Clients dropped because their first bytes did not fit the budget.
    pub dropped_over_budget: u64,
    /// Clients dropped, the oldest still silent, to make room for a new one.
    pub dropped_oldest: u64,
}

/// The front's figures now.
pub fn stats() -> FrontStats {
    let as_u64 = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
    FrontStats {
        pending_clients: as_u64(PENDING_CLIENTS.load(Ordering::Relaxed)),
        pending_bytes: as_u64(PENDING_BYTES.load(Ordering::Relaxed)),
        dropped_over_budget: DROPPED_OVER_BUDGET.load(Ordering::Relaxed),
        dropped_oldest: DROPPED_OLDEST.load(Ordering::Relaxed),
    }
}

/// Clients still sending their first packet, at most, host-wide.
pub const MAX_PENDING_CLIENTS: usize = 16_384;

/// The clients still sending their first packet, oldest first. At the cap a
/// new client drops the oldest one: sockets that never speak cannot lock the
/// ports, since a real client's CONNECT comes within milliseconds.
#[derive(Clone)]
pub struct Pending(std::sync::Arc<std::sync::Mutex<PendingClients>>);

struct PendingClients {
    cap: usize,
    next: u64,
    tasks: std::collections::BTreeMap<u64, tokio::task::AbortHandle>,
}

impl Pending {
    pub fn new(cap: usize) -> Pending {
        Pending(std::sync::Arc::new(std::sync::Mutex::new(PendingClients {
            cap,
            next: 0,
            tasks: std::collections::BTreeMap::new(),
        })))
    }

    /// Makes room for one more (dropping the oldest at the cap); returns its number.
    pub fn admit(&self) -> u64 {
        let Ok(mut p) = self.0.lock() else { return 0 };
        while p.tasks.len() >= p.cap {
            let Some((_, oldest)) = p.tasks.pop_first() else { break };
            oldest.abort();
            DROPPED_OLDEST.fetch_add(1, Ordering::Relaxed);
        }
        p.next += 1;
        PENDING_CLIENTS.store(p.tasks.len() + 1, Ordering::Relaxed);
        p.next
    }

    pub fn started(&self, id: u64, task: tokio::task::AbortHandle) {
        if let Ok(mut p) = self.0.lock() {
            p.tasks.insert(id, task);
        }
    }

    pub fn done(&self, id: u64) {
        if let Ok(mut p) = self.0.lock() {
            p.tasks.remove(&id);
            PENDING_CLIENTS.store(p.tasks.len(), Ordering::Relaxed);
        }
    }
}

/// A client's first bytes, charged to [`MAX_PENDING_BYTES`] until dropped.
#[derive(Debug, Default)]
pub struct FirstBytes(Vec<u8>);

impl FirstBytes {
    /// Appends `more` if the host-wide budget has room for it.
    fn extend(&mut self, more: &[u8]) -> bool {
        let before = PENDING_BYTES.fetch_add(more.len(), Ordering::Relaxed);
        if before + more.len() > MAX_PENDING_BYTES {
            PENDING_BYTES.fetch_sub(more.len(), Ordering::Relaxed);
            return false;
        }
        self.0.extend_from_slice(more);
        true
    }

    /// Takes `bytes` (the CONNECT rewritten, about as long) in place of these.
    pub fn replace(&mut self, bytes: Vec<u8>) {
        PENDING_BYTES.fetch_add(bytes.len(), Ordering::Relaxed);
        PENDING_BYTES.fetch_sub(self.0.len(), Ordering::Relaxed);
        self.0 = bytes;
    }
}

impl std::ops::Deref for FirstBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for FirstBytes {
    fn drop(&mut self) {
        PENDING_BYTES.fetch_sub(self.0.len(), Ordering::Relaxed);
    }
}

/// What to do with a client.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// Hand it to `tenant` with `first_bytes`: its CONNECT as the tenant's
    /// broker must see it, then whatever else it already sent.
    Tenant { tenant: String, first_bytes: Vec<u8> },
    /// Answer with `reply` (a refusing CONNACK) and close.
    Refuse { reply: Vec<u8> },
    /// Not MQTT, or no CONNECT in time: close without a word.
    Drop,
}

fn connack(version: Version, v5_code: u8, v3_code: u8) -> Vec<u8> {
    let code = if version == Version::V5 { v5_code } else { v3_code };
    let mut reply = Vec::new();
    let connack = Connack { session_present: false, code, properties: Properties::default() };
    packet::encode(&Packet::Connack(connack), version, &mut reply);
    reply
}

/// Decides where `bytes` (a client's first bytes, holding one complete
/// packet at least) go. `tenant` names the tenant of a dedicated port
/// (no prefix then); on the shared port it is `None` and `known` says which
/// tenants exist.
pub fn route(bytes: &[u8], tenant: Option<&str>, known: impl Fn(&str) -> bool) -> Route {
    let Ok(Some(frame)) = packet::frame(bytes, MAX_FIRST_BYTES) else { return Route::Drop };
    let connect = match packet::decode(frame, bytes, Version::V3_1_1) {
        Ok(Packet::Connect(connect)) => connect,
        // A CONNECT at a protocol level no tenant speaks (3 named "MQTT",
        // 6, ...): refused as a tenant's broker would (MQTT-3.1.2-2), in
        // 3.1.1 form, which every client version reads; no VM is booted.
        Err(DecodeError::UnsupportedProtocol) => {
            let code = reason::v3::UNACCEPTABLE_PROTOCOL_VERSION;
            return Route::Refuse { reply: connack(Version::V3_1_1, code, code) };
        }
        _ => return Route::Drop,
    };
    let rest = &bytes[frame.len..];
    let prefixed = connect.username.as_deref().and_then(|u| u.split_once(':'));
    if let Some(own) = tenant {
        // Its own prefix is taken (and stripped) here too.
        if prefixed.is_none_or(|(t, _)| t != own) {
            return Route::Tenant { tenant: own.to_string(), first_bytes: bytes.to_vec() };
        }
    }
    let refuse = || Route::Refuse {
        reply: connack(connect.version, reason::BAD_USER_NAME_OR_PASSWORD, reason::v3::BAD_USER_NAME_OR_PASSWORD),
    };
    let Some((tenant, user)) = prefixed else { return refuse() };
    if !known(tenant) {
        return refuse();
    }
    let tenant = tenant.to_string();
    let user = user.to_string();
    let version = connect.version;
    let mut rewritten: Connect = *connect;
    if user.is_empty() {
        // Anonymous in the tenant: no user name, and so no password.
        rewritten.username = None;
        rewritten.password = None;
    } else {
        rewritten.username = Some(user);
    }
    let mut first_bytes = Vec::with_capacity(bytes.len());
    packet::encode(&Packet::Connect(Box::new(rewritten)), version, &mut first_bytes);
    first_bytes.extend_from_slice(rest);
    Route::Tenant { tenant, first_bytes }
}

/// Reads until one whole packet is in, within the deadline, the size bound
/// and the host-wide budget; returns everything read (`None`: nothing
/// usable came, or it did not fit).
pub async fn read_first_packet(stream: &mut TcpStream) -> Option<FirstBytes> {
    let mut buf = FirstBytes::default();
    let read = async {
        let mut chunk = [0u8; READ_CHUNK];
        loop {
            match packet::frame(&buf, MAX_FIRST_BYTES) {
                Ok(Some(_)) => return true,
                Err(_) => return false,
                Ok(None) => {}
            }
            if buf.len() >= MAX_FIRST_BYTES {
                return false;
            }
            // No further than the packet's end: what follows is the tenant's.
            let want = packet::announced_len(&buf).unwrap_or(buf.len() + 1).clamp(buf.len() + 1, MAX_FIRST_BYTES);
            let room = (want - buf.len()).min(READ_CHUNK);
            match stream.read(&mut chunk[..room]).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => {
                    if !buf.extend(&chunk[..n]) {
                        DROPPED_OVER_BUDGET.fetch_add(1, Ordering::Relaxed);
                        return false;
                    }
                }
            }
        }
    };
    match tokio::time::timeout(FIRST_PACKET_DEADLINE, read).await {
        Ok(true) => Some(buf),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(version: Version, username: Option<&str>, password: Option<&[u8]>) -> Vec<u8> {
        let c = Connect {
            version,
            clean_start: true,
            keep_alive: 30,
            properties: Properties::default(),
            client_id: "c1".into(),
            will: None,
            username: username.map(Into::into),
            password: password.map(<[u8]>::to_vec),
        };
        let mut bytes = Vec::new();
        packet::encode(&Packet::Connect(Box::new(c)), version, &mut bytes);
        bytes
    }

    fn known(t: &str) -> bool {
        t == "acme"
    }

    #[test]
    fn the_prefix_picks_the_tenant_and_is_stripped() {
        let mut bytes = connect(Version::V5, Some("acme:alice"), Some(b"pw"));
        bytes.extend_from_slice(&[0xc0, 0]); // a PINGREQ sent right behind
        let Route::Tenant { tenant, first_bytes } = route(&bytes, None, known) else { panic!("not routed") };
        assert_eq!(tenant, "acme");
        let mut expected = connect(Version::V5, Some("alice"), Some(b"pw"));
        expected.extend_from_slice(&[0xc0, 0]);
        assert_eq!(first_bytes, expected);
        // An empty user is an anonymous client of the tenant.
        let bytes = connect(Version::V3_1_1, Some("acme:"), Some(b"pw"));
        let Route::Tenant { first_bytes, .. } = route(&bytes, None, known) else { panic!("not routed") };
        assert_eq!(first_bytes, connect(Version::V3_1_1, None, None));
    }

    #[test]
    fn unknown_tenants_and_missing_prefixes_are_refused_in_the_clients_version() {
        let v3_refusal = vec![0x20, 2, 0, reason::v3::BAD_USER_NAME_OR_PASSWORD];
        for user in [None, Some("alice"), Some("globex:alice")] {
            assert_eq!(
                route(&connect(Version::V3_1_1, user, None), None, known),
                Route::Refuse { reply: v3_refusal.clone() }
            );
        }
        let Route::Refuse { reply } = route(&connect(Version::V5, Some("nope:x"), None), None, known) else {
            panic!("not refused")
        };
        assert_eq!(reply[3], reason::BAD_USER_NAME_OR_PASSWORD);
    }

    #[test]
    fn first_bytes_are_charged_until_dropped_and_refused_past_the_budget() {
        let pending = || PENDING_BYTES.load(Ordering::Relaxed);
        let before = pending();
        let mut bytes = FirstBytes::default();
        assert!(bytes.extend(&[1; 100]));
        assert!(pending() >= before + 100);
        bytes.replace(vec![2; 40]);
        assert!(!bytes.extend(&vec![0; MAX_PENDING_BYTES]), "past the budget");
        assert_eq!(&bytes[..], &[2; 40][..], "a refused extension changes nothing");
        drop(bytes);
        assert_eq!(pending(), before);
    }

    #[test]
    fn unsupported_protocol_levels_get_return_code_1_on_every_port() {
        for (name, level) in [(&b"MQTT"[..], 3u8), (b"MQTT", 6), (b"MQIsdp", 4), (b"MQTT", 0x84)] {
            let mut connect = connect(Version::V3_1_1, Some("acme:alice"), None);
            // Name and level follow the fixed header (two bytes here).
            connect.splice(4..9, name.iter().copied().chain([level]));
            connect[3] = u8::try_from(name.len()).unwrap();
            connect[1] = u8::try_from(connect.len() - 2).unwrap();
            for port in [None, Some("acme")] {
                assert_eq!(
                    route(&connect, port, known),
                    Route::Refuse { reply: vec![0x20, 2, 0, reason::v3::UNACCEPTABLE_PROTOCOL_VERSION] },
                    "{name:?} level {level} on {port:?}"
                );
            }
        }
    }

    #[test]
    fn a_dedicated_port_passes_the_bytes_unchanged_and_garbage_is_dropped() {
        let bytes = connect(Version::V3_1_1, Some("alice"), None);
        assert_eq!(
            route(&bytes, Some("globex"), known),
            Route::Tenant { tenant: "globex".into(), first_bytes: bytes.clone() }
        );
        assert_eq!(route(&[0xc0, 0], None, known), Route::Drop);
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n", None, known), Route::Drop);
    }
}
