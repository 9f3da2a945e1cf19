//! The shared ports' front: reads a client's first bytes (with a deadline
//! and a size bound) and picks its tenant from them.
//!
//! - Plain MQTT: the first packet, a CONNECT with user name `TENANT:USER`
//!   (RabbitMQ's convention for virtual hosts), rewritten so the tenant's
//!   broker sees `USER` (an empty `USER` is an anonymous client of that
//!   tenant).
//! - MQTT over TLS and secure WebSockets: the TLS ClientHello, whose server
//!   name (SNI) picks the tenant ([`Directory`]); the handshake itself is
//!   completed by the tenant's process with the tenant's key, so no key and
//!   no plaintext is ever here. No or an unknown name: a fatal
//!   `unrecognized_name` alert.
//! - MQTT over WebSockets: the HTTP upgrade request, whose `Host` header
//!   picks the tenant; an unknown host is answered 421.
//!
//! Owns that decision, the bytes it read to make it ([`FirstBytes`],
//! charged to one budget for the whole host until the tenant's process has
//! them) and the clients still sending them ([`Pending`], and the bytes of
//! their partial first bytes): it never boots a VM and never keeps a byte
//! of the client's traffic beyond those.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mqvisor::net::ingress::Handed;
use mqvisor::net::tls::hello::{self, HelloPeek};
use mqvisor::net::websocket::{WsLimits, handshake};
use mqvisor_broker::broker::reason;
use mqvisor_broker::packet::{self, Connack, Connect, Packet, Version};
use mqvisor_broker::properties::Properties;
use mqvisor_broker::wire::DecodeError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::directory::{Directory, Over};

/// How long a client may take to send its CONNECT.
pub const FIRST_PACKET_DEADLINE: Duration = Duration::from_secs(10);
/// Bytes read while waiting for a CONNECT, at most (a CONNECT with a will and
/// properties fits; the tenant's own limits apply after the handoff).
pub const MAX_FIRST_BYTES: usize = 64 * 1024;

/// Bytes of first packets held at once, host-wide: read by the front or
/// waiting in the tenants' handoff queues. A CONNECT is rarely over 1 KiB,
/// so this holds 500 of the largest at once, or tens of thousands of usual
/// ones. Past it, the client with the largest partial first packet is
/// dropped to make room (the one reading, when no other holds as much): a
/// flood of large half-sent CONNECTs costs the daemon this much at most,
/// and never keeps out a client whose CONNECT is smaller than theirs.
pub const MAX_PENDING_BYTES: usize = 32 << 20;
/// What a read asks for at a time: memory follows what clients send, not
/// the length they announce.
const READ_CHUNK: usize = 4096;

static PENDING_BYTES: AtomicUsize = AtomicUsize::new(0);
static PENDING_CLIENTS: AtomicUsize = AtomicUsize::new(0);
static DROPPED_OVER_BUDGET: AtomicU64 = AtomicU64::new(0);
static DROPPED_OLDEST: AtomicU64 = AtomicU64::new(0);
static DROPPED_TOO_LARGE: AtomicU64 = AtomicU64::new(0);
static DROPPED_TIMEOUT: AtomicU64 = AtomicU64::new(0);
static DROPPED_NOT_MQTT: AtomicU64 = AtomicU64::new(0);
static REFUSED_NOT_TLS: AtomicU64 = AtomicU64::new(0);
static REFUSED_NO_SERVER_NAME: AtomicU64 = AtomicU64::new(0);
static REFUSED_UNKNOWN_SERVER_NAME: AtomicU64 = AtomicU64::new(0);
static REFUSED_WS_REQUEST: AtomicU64 = AtomicU64::new(0);

/// What the front holds and what it dropped, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrontStats {
    /// Clients still sending their first packet.
    pub pending_clients: u64,
    /// Bytes of first packets held (see [`MAX_PENDING_BYTES`]).
    pub pending_bytes: u64,
    /// Clients dropped to keep the first bytes within the budget: the one
    /// with the largest partial first packet each time.
    pub dropped_over_budget: u64,
    /// Clients dropped, the oldest still silent, to make room for a new one.
    pub dropped_oldest: u64,
    /// Clients dropped for a first packet longer than [`MAX_FIRST_BYTES`].
    pub dropped_too_large: u64,
    /// Clients dropped for sending no whole first packet within
    /// [`FIRST_PACKET_DEADLINE`].
    pub dropped_timeout: u64,
    /// Clients dropped for a first packet that is not an MQTT CONNECT.
    pub dropped_not_mqtt: u64,
    /// TLS ports: clients refused for first bytes that are no ClientHello.
    pub refused_not_tls: u64,
    /// TLS ports: clients refused for a ClientHello without a server name.
    pub refused_no_server_name: u64,
    /// TLS ports: clients refused for a server name no tenant serves.
    pub refused_unknown_server_name: u64,
    /// The WebSocket port: clients refused for a request that is no
    /// WebSocket upgrade, or for a `Host` no tenant has.
    pub refused_ws_request: u64,
}

/// The front's figures now.
pub fn stats() -> FrontStats {
    let as_u64 = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
    FrontStats {
        pending_clients: as_u64(PENDING_CLIENTS.load(Ordering::Relaxed)),
        pending_bytes: as_u64(PENDING_BYTES.load(Ordering::Relaxed)),
        dropped_over_budget: DROPPED_OVER_BUDGET.load(Ordering::Relaxed),
        dropped_oldest: DROPPED_OLDEST.load(Ordering::Relaxed),
        dropped_too_large: DROPPED_TOO_LARGE.load(Ordering::Relaxed),
        dropped_timeout: DROPPED_TIMEOUT.load(Ordering::Relaxed),
        dropped_not_mqtt: DROPPED_NOT_MQTT.load(Ordering::Relaxed),
        refused_not_tls: REFUSED_NOT_TLS.load(Ordering::Relaxed),
        refused_no_server_name: REFUSED_NO_SERVER_NAME.load(Ordering::Relaxed),
        refused_unknown_server_name: REFUSED_UNKNOWN_SERVER_NAME.load(Ordering::Relaxed),
        refused_ws_request: REFUSED_WS_REQUEST.load(Ordering::Relaxed),
    }
}

/// Counts a client dropped because its first packet was no MQTT CONNECT
/// (see [`Route::Drop`]).
pub fn dropped_not_mqtt() {
    DROPPED_NOT_MQTT.fetch_add(1, Ordering::Relaxed);
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

/// What one client's first bytes are charged to [`MAX_PENDING_BYTES`].
#[derive(Debug, Default)]
struct Charge {
    bytes: AtomicUsize,
    /// Dropped to make room for another client: its charge is released and
    /// its read ends (woken by `wake`).
    dropped: AtomicBool,
    wake: tokio::sync::Notify,
}

impl Charge {
    /// Releases the whole charge at once (the bytes themselves go with
    /// their owner).
    fn release(&self) {
        PENDING_BYTES.fetch_sub(self.bytes.swap(0, Ordering::Relaxed), Ordering::Relaxed);
    }
}

/// The clients still reading their first packet, by arrival, with their
/// charges: the candidates to drop when the budget is full.
static PARTIAL: Mutex<BTreeMap<u64, Arc<Charge>>> = Mutex::new(BTreeMap::new());
static NEXT_PARTIAL: AtomicU64 = AtomicU64::new(0);

/// A client's place in [`PARTIAL`] while it reads; leaves it when dropped.
struct Partial(u64);

impl Partial {
    fn enter(charge: &Arc<Charge>) -> Partial {
        let id = NEXT_PARTIAL.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut partial) = PARTIAL.lock() {
            partial.insert(id, charge.clone());
        }
        Partial(id)
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if let Ok(mut partial) = PARTIAL.lock() {
            partial.remove(&self.0);
        }
    }
}

/// Of `partial` (arrival, bytes held), the client to drop so that a client
/// that would hold `wanted` bytes can read on: the one holding the most
/// (the oldest of those), unless it holds less than `wanted` (then the
/// reader itself holds the most and is the one dropped: `None`).
fn largest(partial: impl Iterator<Item = (u64, usize)>, wanted: usize) -> Option<u64> {
    let (id, held) = partial.max_by_key(|&(id, held)| (held, std::cmp::Reverse(id)))?;
    (held > 0 && held >= wanted).then_some(id)
}

/// Makes room in the budget for `more` bytes of the client charged
/// `reader`, by dropping the client with the largest partial first packet.
/// False when none holds as much as the reader would.
fn make_room(reader: &Arc<Charge>, more: usize) -> bool {
    let Ok(mut partial) = PARTIAL.lock() else { return false };
    let wanted = reader.bytes.load(Ordering::Relaxed) + more;
    let others = partial
        .iter()
        .filter(|(_, charge)| !Arc::ptr_eq(charge, reader))
        .map(|(&id, charge)| (id, charge.bytes.load(Ordering::Relaxed)));
    let Some(id) = largest(others, wanted) else { return false };
    let Some(victim) = partial.remove(&id) else { return false };
    victim.dropped.store(true, Ordering::Relaxed);
    victim.release();
    victim.wake.notify_one();
    DROPPED_OVER_BUDGET.fetch_add(1, Ordering::Relaxed);
    true
}

/// Charges `more` bytes of the client charged `charge` to the host-wide
/// budget, making room by dropping the client with the largest partial
/// first packet when that holds as much as this one would; false if none
/// does (or this client was dropped itself).
fn charge_more(charge: &Arc<Charge>, more: usize) -> bool {
    loop {
        if charge.dropped.load(Ordering::Relaxed) {
            return false;
        }
        let before = PENDING_BYTES.fetch_add(more, Ordering::Relaxed);
        if before + more <= MAX_PENDING_BYTES {
            break;
        }
        PENDING_BYTES.fetch_sub(more, Ordering::Relaxed);
        if !make_room(charge, more) {
            return false;
        }
    }
    charge.bytes.fetch_add(more, Ordering::Relaxed);
    true
}

/// A first packet as it arrives, read straight into chunks of
/// [`READ_CHUNK`] bytes, each full before the next is taken: memory follows
/// what the client sends (a silent client holds none, where a read buffer
/// in its task cost it 4 KiB), no buffer grows by doubling past what came,
/// and the chunks of clients dropped under a flood are reused whole.
#[derive(Default)]
struct Chunks {
    chunks: Vec<Vec<u8>>,
    len: usize,
}

impl Chunks {
    /// The packet's start: its fixed header, once that is in.
    fn head(&self) -> &[u8] {
        self.chunks.first().map_or(&[], Vec::as_slice)
    }

    /// Reads at most `most` bytes from `stream` into the last chunk (a new
    /// one when it is full).
    async fn read_from(&mut self, stream: &mut TcpStream, most: usize) -> std::io::Result<usize> {
        if self.chunks.last().is_none_or(|chunk| chunk.len() >= READ_CHUNK) {
            let mut chunk = Vec::new();
            if !self.chunks.is_empty() {
                chunk.reserve_exact(READ_CHUNK);
            }
            self.chunks.push(chunk);
        }
        let Some(chunk) = self.chunks.last_mut() else { return Ok(0) };
        let at = chunk.len();
        chunk.resize(at + most.min(READ_CHUNK - at), 0);
        let read = stream.read(&mut chunk[at..]).await;
        chunk.truncate(at + *read.as_ref().unwrap_or(&0));
        self.len += chunk.len() - at;
        read
    }

    /// Everything read, in one piece (for a ClientHello or a request, which
    /// are parsed whole; a merge per chunk read, at most 16 KiB each).
    fn contiguous(&mut self) -> &[u8] {
        if self.chunks.len() > 1 {
            let mut all = Vec::with_capacity(self.len);
            for chunk in self.chunks.drain(..) {
                all.extend_from_slice(&chunk);
            }
            self.chunks.push(all);
        }
        self.head()
    }

    /// The packet in one piece.
    fn into_bytes(mut self) -> Vec<u8> {
        if self.chunks.len() == 1 {
            return self.chunks.pop().unwrap_or_default();
        }
        let mut bytes = Vec::with_capacity(self.len);
        for chunk in self.chunks {
            bytes.extend_from_slice(&chunk);
        }
        bytes
    }
}

/// A client's first bytes, charged to [`MAX_PENDING_BYTES`] until dropped,
/// and what the client speaks.
#[derive(Debug)]
pub struct FirstBytes {
    bytes: Vec<u8>,
    charge: Arc<Charge>,
    kind: Handed,
}

impl FirstBytes {
    /// What the client speaks: how its process is to take it.
    pub fn kind(&self) -> Handed {
        self.kind
    }

    /// Takes `bytes` (the CONNECT rewritten, about as long) in place of these.
    pub fn replace(&mut self, bytes: Vec<u8>) {
        PENDING_BYTES.fetch_add(bytes.len(), Ordering::Relaxed);
        self.charge.release();
        self.charge.bytes.store(bytes.len(), Ordering::Relaxed);
        self.bytes = bytes;
    }
}

impl std::ops::Deref for FirstBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for FirstBytes {
    fn drop(&mut self) {
        self.charge.release();
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

/// What a port's clients send first, and so what the front reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// A CONNECT: plain MQTT.
    Connect,
    /// A TLS ClientHello: MQTT over TLS, or over secure WebSockets (`ws`).
    ClientHello { ws: bool },
    /// An HTTP upgrade request: MQTT over WebSockets.
    Upgrade,
}

impl Expect {
    /// How the tenant's process takes such a client.
    fn kind(self) -> Handed {
        match self {
            Expect::Connect => Handed::Mqtt,
            Expect::ClientHello { ws: false } => Handed::Tls,
            Expect::ClientHello { ws: true } => Handed::Wss,
            Expect::Upgrade => Handed::Ws,
        }
    }

    /// The most first bytes read.
    fn max(self) -> usize {
        match self {
            Expect::Connect => MAX_FIRST_BYTES,
            Expect::ClientHello { .. } => hello::DEFAULT_MAX_CLIENT_HELLO,
            Expect::Upgrade => WsLimits::default().max_request,
        }
    }

    /// What the first bytes so far call for; `new_from` is where the last
    /// read's bytes begin.
    fn step(self, chunks: &mut Chunks, new_from: usize) -> Step {
        let max = self.max();
        let more = |len: usize| Step::More(READ_CHUNK.min(max.saturating_sub(len)).max(1));
        match self {
            Expect::Connect => {
                // The header is in the first chunk; the body may not be yet.
                match packet::frame(chunks.head(), MAX_FIRST_BYTES) {
                    Err(DecodeError::TooLarge) => return Step::Refuse(&DROPPED_TOO_LARGE, Vec::new()),
                    Err(_) => return Step::Refuse(&DROPPED_NOT_MQTT, Vec::new()),
                    Ok(_) => {}
                }
                let announced = packet::announced_len(chunks.head());
                if announced.is_some_and(|len| chunks.len >= len) {
                    return Step::Done;
                }
                if chunks.len >= MAX_FIRST_BYTES {
                    return Step::Refuse(&DROPPED_TOO_LARGE, Vec::new());
                }
                // No further than the packet's end: what follows is the tenant's.
                let want = announced.unwrap_or(chunks.len + 1).clamp(chunks.len + 1, MAX_FIRST_BYTES);
                Step::More(want - chunks.len)
            }
            Expect::ClientHello { .. } => match hello::peek_client_hello(chunks.contiguous(), max) {
                Ok(HelloPeek::Hello(_)) => Step::Done,
                Ok(HelloPeek::NeedMore) => more(chunks.len),
                // Plain MQTT or HTTP on a TLS port: the alert is what a TLS
                // server answers, and tells a person reading a capture why.
                Ok(HelloPeek::NotTls) => {
                    Step::Refuse(&REFUSED_NOT_TLS, hello::alert_record(rustls::AlertDescription::DecodeError).to_vec())
                }
                Err(error @ hello::HelloError::TooLarge { .. }) => {
                    Step::Refuse(&DROPPED_TOO_LARGE, error.alert().to_vec())
                }
                Err(error) => Step::Refuse(&REFUSED_NOT_TLS, error.alert().to_vec()),
            },
            Expect::Upgrade => {
                // Parsed while short (what is no HTTP is refused at once),
                // then only once a blank line may have come: a request sent
                // a byte at a time costs linear time.
                let bytes = chunks.contiguous();
                let fresh = &bytes[new_from.saturating_sub(3).min(bytes.len())..];
                let blank_line = fresh.windows(2).any(|w| w == b"\n\n") || fresh.windows(3).any(|w| w == b"\n\r\n");
                if new_from >= EAGER_PARSE && bytes.len() < max && !blank_line {
                    return more(bytes.len());
                }
                match handshake::peek(bytes, max) {
                    handshake::Peeked::Incomplete => more(bytes.len()),
                    handshake::Peeked::Upgrade(_) => Step::Done,
                    handshake::Peeked::Refused(response) => Step::Refuse(&REFUSED_WS_REQUEST, response),
                }
            }
        }
    }
}

/// An upgrade request is parsed after every read that starts before this
/// many bytes.
const EAGER_PARSE: usize = 16;

/// What the first bytes so far call for.
enum Step {
    /// They are complete.
    Done,
    /// At most this many more bytes are read next.
    More(usize),
    /// The client is refused, counted there, and sent this (if anything).
    Refuse(&'static AtomicU64, Vec<u8>),
}

/// Reads until the first bytes `expect` names are whole, within the
/// deadline, the size bound and the host-wide budget; returns everything
/// read (`None`: nothing usable came, it did not fit, it was refused with
/// its answer sent, or the client was dropped to make room for another).
pub async fn read_first(stream: &mut TcpStream, expect: Expect) -> Option<FirstBytes> {
    let charge = Arc::new(Charge::default());
    // A candidate to drop while it reads (see `make_room`).
    let _partial = Partial::enter(&charge);
    let mut chunks = Chunks::default();
    let mut over_budget = false;
    let mut new_from = 0;
    // Ends with `Err`: the counter of why the client is dropped (`None`: it
    // went, or the budget counted it) and what it is told.
    let read = async {
        loop {
            let want = match expect.step(&mut chunks, new_from) {
                Step::Done => return Ok(()),
                Step::More(want) => want,
                Step::Refuse(counter, reply) => return Err((Some(counter), reply)),
            };
            new_from = chunks.len;
            let read = tokio::select! {
                read = chunks.read_from(stream, want) => read,
                // Dropped to make room for another client.
                () = charge.wake.notified() => return Err((None, Vec::new())),
            };
            match read {
                Ok(0) | Err(_) => return Err((None, Vec::new())),
                Ok(n) => {
                    if !charge_more(&charge, n) {
                        if !charge.dropped.load(Ordering::Relaxed) {
                            // None held more: this client is the one dropped.
                            DROPPED_OVER_BUDGET.fetch_add(1, Ordering::Relaxed);
                        }
                        over_budget = true;
                        return Err((None, Vec::new()));
                    }
                }
            }
        }
    };
    let (dropped, reply) = match tokio::time::timeout(FIRST_PACKET_DEADLINE, read).await {
        Ok(Ok(())) => return Some(FirstBytes { bytes: chunks.into_bytes(), charge, kind: expect.kind() }),
        Ok(Err(failed)) => failed,
        Err(_elapsed) => (Some(&DROPPED_TIMEOUT), Vec::new()),
    };
    if let Some(dropped) = dropped {
        dropped.fetch_add(1, Ordering::Relaxed);
    }
    charge.release();
    drop(chunks);
    if over_budget || charge.dropped.load(Ordering::Relaxed) {
        // Dropped for the budget: a reset, which frees the socket at once.
        let _ = socket2::SockRef::from(&*stream).set_linger(Some(Duration::ZERO));
    } else if !reply.is_empty() {
        answer(stream, &reply).await;
    }
    None
}

/// Sends `reply` (an alert, an HTTP error, a CONNACK), then closes the
/// sending side; a client that does not take it within a second is left.
pub async fn answer(stream: &mut TcpStream, reply: &[u8]) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(reply).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// The tenant a complete ClientHello (`bytes`) reaches by its server name,
/// or the alert that refuses it: `unrecognized_name` for a name no tenant
/// serves over TLS, and for none at all (the shared port has no default
/// tenant), each counted.
pub fn route_hello(bytes: &[u8], directory: &Directory) -> Result<String, Vec<u8>> {
    let unrecognized = || hello::alert_record(rustls::AlertDescription::UnrecognisedName).to_vec();
    let Ok(HelloPeek::Hello(info)) = hello::peek_client_hello(bytes, hello::DEFAULT_MAX_CLIENT_HELLO) else {
        // Checked whole by `read_first`; not reached.
        return Err(unrecognized());
    };
    let Some(name) = info.server_name else {
        REFUSED_NO_SERVER_NAME.fetch_add(1, Ordering::Relaxed);
        return Err(unrecognized());
    };
    directory.by_host(&name, Over::Tls).ok_or_else(|| {
        REFUSED_UNKNOWN_SERVER_NAME.fetch_add(1, Ordering::Relaxed);
        unrecognized()
    })
}

/// The tenant a complete upgrade request (`bytes`) reaches by its `Host`,
/// or the HTTP response that refuses it (421 for a host no tenant has).
pub fn route_upgrade(bytes: &[u8], directory: &Directory) -> Result<String, Vec<u8>> {
    let handshake::Peeked::Upgrade(upgrade) = handshake::peek(bytes, WsLimits::default().max_request) else {
        // Checked whole by `read_first`; not reached.
        return Err(handshake::misdirected_response());
    };
    directory.by_host(&upgrade.host_name(), Over::Plain).ok_or_else(|| {
        REFUSED_WS_REQUEST.fetch_add(1, Ordering::Relaxed);
        handshake::misdirected_response()
    })
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
        let mut bytes = FirstBytes { bytes: Vec::new(), charge: Arc::default(), kind: Handed::Mqtt };
        assert!(charge_more(&bytes.charge, 100));
        assert!(pending() >= before + 100);
        bytes.replace(vec![2; 40]);
        assert!(!charge_more(&bytes.charge, MAX_PENDING_BYTES), "past the budget");
        assert_eq!(&bytes[..], &[2; 40][..], "a refused charge changes nothing");
        assert_eq!(bytes.charge.bytes.load(Ordering::Relaxed), 40);
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
    fn the_largest_partial_packet_makes_room_unless_the_reader_holds_the_most() {
        let partial = [(1, 60_000), (2, 65_000), (3, 65_000), (4, 10)];
        // A polite CONNECT: the oldest of the largest is dropped for it.
        assert_eq!(largest(partial.into_iter(), 30), Some(2));
        assert_eq!(largest(partial.into_iter(), 65_000), Some(2));
        // The reader would hold more than any other: it is the one dropped.
        assert_eq!(largest(partial.into_iter(), 65_001), None);
        // Clients that hold nothing free nothing.
        assert_eq!(largest([(1, 0), (2, 0)].into_iter(), 0), None);
        assert_eq!(largest(std::iter::empty(), 30), None);
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
