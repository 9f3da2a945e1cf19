//! Where a VM's clients come from, and what it tells `mqvisor serve` back.
//!
//! Owns the two ways in: listeners bound before boot (`mqvisor run`:
//! plain MQTT, and MQTT over TLS with the settings of a [`ServerTls`]), or
//! the handoff socket of `mqvisor serve`, on which each client arrives as
//! one datagram carrying its socket (SCM_RIGHTS) and the bytes the daemon
//! already read from it. On the same socket the VM sends its load report:
//! its [`Counters`] as [`Counters::to_report`] encodes them, every
//! [`REPORT_EVERY`] while anything happens, every [`REPORT_IDLE_EVERY`]
//! while nothing does, and once when its guest's link is up (the daemon
//! times boots by that). Never trusts a datagram: one without a socket is no
//! client.
//!
//! # The handoff datagram
//!
//! Byte 0 is what the client speaks, a [`Handed`]; the rest are the bytes
//! the daemon already read from it:
//!
//! | byte 0 | kind                  | the rest                                   |
//! |--------|-----------------------|--------------------------------------------|
//! | 0      | MQTT                  | MQTT bytes (the CONNECT, possibly rewritten) |
//! | 1      | MQTT over TLS         | raw TLS bytes, from its ClientHello on     |
//! | 2      | MQTT over WebSockets  | raw bytes, from its HTTP upgrade request on |
//! | 3      | MQTT over secure WebSockets | raw TLS bytes, from its ClientHello on |
//! | 0x80   | no client: a change of the tenant's users and ACL ([`AUTH_CHANGE`]), sent without a socket | `config_blob::write_auth` bytes, at most `config_blob::MAX_AUTH_LEN` |
//! | 0x81   | no client: the fence deadline ([`fence::FENCE`](super::fence::FENCE)), sent without a socket | the deadline, `CLOCK_MONOTONIC` nanoseconds, 8 bytes little-endian |
//! | 0x82   | no client: a connection to a new standby for the state ([`STANDBY_OFFER`]), its PROXY header sent | nothing |
//! | 0x83   | no client: the tenant a spare process is to run ([`ASSIGN_TENANT`]), the first datagram a spare is sent and read before its VM exists | the path of the tenant's settings file |
//!
//! A users and ACL change carries every table the daemon manages for the
//! tenant, whole, so only the latest one matters: the proxy keeps the
//! latest ([`Clients::take_auth_change`]) and sends it to the guest as an
//! `Auth` record, which the guest checks as it checks its boot
//! configuration.
//!
//! TLS ends here, in the tenant's own process, with the tenant's own
//! certificate and key ([`HandoffEdge`]): the daemon only read the
//! ClientHello (or the upgrade request) to pick the tenant. A datagram of
//! another kind, or of a kind this process has no settings for, is no
//! client: its socket is closed (said once).
//!
//! Also owns the bound on TLS handshakes in flight in this process
//! ([`Handshakes`], listeners and handoff alike): a TLS client beyond it
//! is sent a fatal alert and closed at once, and counted
//! ([`Clients::refused_handshakes`]).

use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use tokio::net::{TcpListener, TcpStream};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::fence;
use super::metrics::Counters;
use super::tls::ServerTls;
use super::tls::hello::alert_record;
use super::transport::tls::{Handshakes, TlsClient};
use super::transport::ws::WsClient;
use super::transport::{ClientTransport, TcpClient};
use super::websocket::WsLimits;

/// Byte 0 of a datagram that carries a change of the tenant's users and
/// ACL rather than a client (see the module doc).
pub const AUTH_CHANGE: u8 = 0x80;

/// Byte 0 of a datagram whose socket is no client but a connection to a
/// new standby node for the tenant's state (`crate::replica`), for the
/// state disk.
pub const STANDBY_OFFER: u8 = 0x82;

/// Byte 0 of the first datagram a spare process (`mqvisor run
/// --tenant-settings-from-handoff`) is sent: the path of the settings file
/// of the tenant it is to run. Read before the VM exists, never after.
pub const ASSIGN_TENANT: u8 = 0x83;

/// Largest datagram of bytes handed over with a client.
pub const MAX_HANDOFF_BYTES: usize = 256 * 1024;

/// How often a VM fed by `mqvisor serve` reports its load back on the
/// handoff socket while anything happens in it.
pub const REPORT_EVERY: Duration = Duration::from_secs(1);

/// How often it reports while nothing happens (no client, guest or timer
/// event since the last report): the daemon's figures stay current (and
/// connection-seconds are counted) within this, and an idle tenant wakes up
/// once in it instead of every second.
pub const REPORT_IDLE_EVERY: Duration = Duration::from_secs(10);

/// A client as it arrives: its transport and the bytes read from it before.
pub type Arrival = (Arc<dyn ClientTransport>, Vec<u8>);

/// What a client handed over by `mqvisor serve` speaks: byte 0 of its
/// datagram (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Handed {
    /// Plain MQTT; the bytes are MQTT (the CONNECT, possibly rewritten).
    Mqtt = 0,
    /// MQTT over TLS; the bytes are TLS, from the ClientHello on.
    Tls = 1,
    /// MQTT over WebSockets; the bytes are the HTTP upgrade request on.
    Ws = 2,
    /// MQTT over secure WebSockets; the bytes are TLS, from the ClientHello on.
    Wss = 3,
}

impl Handed {
    /// Its byte in the datagram.
    pub fn to_byte(self) -> u8 {
        self as u8
    }

    /// The kind of `byte`; `None` for no kind.
    pub fn from_byte(byte: u8) -> Option<Handed> {
        match byte {
            0 => Some(Handed::Mqtt),
            1 => Some(Handed::Tls),
            2 => Some(Handed::Ws),
            3 => Some(Handed::Wss),
            _ => None,
        }
    }
}

/// How this process serves the clients `mqvisor serve` hands over beyond
/// plain MQTT: the tenant's TLS and WebSocket settings. A kind whose
/// settings are missing is refused.
#[derive(Clone, Debug, Default)]
pub struct HandoffEdge {
    /// For [`Handed::Tls`] (ALPN `mqtt`).
    pub tls: Option<Arc<ServerTls>>,
    /// For [`Handed::Wss`] (ALPN `http/1.1`): the same files as `tls`.
    pub wss_tls: Option<Arc<ServerTls>>,
    /// For [`Handed::Ws`] and [`Handed::Wss`].
    pub ws: Option<WsLimits>,
    /// For [`Handed::Tls`] only: the CONNECT (at most this many bytes)
    /// gets the client certificate's common name as its user name.
    pub identity_max: Option<usize>,
}

impl HandoffEdge {
    /// How a client of `kind` is served: TLS settings, WebSocket limits,
    /// identity bound. `None`: this process has no settings for it.
    fn serve(&self, kind: Handed) -> Option<Serve<'_>> {
        match kind {
            Handed::Mqtt => Some((None, None, None)),
            Handed::Tls => Some((Some(self.tls.as_ref()?), None, self.identity_max)),
            Handed::Ws => Some((None, Some(self.ws?), None)),
            Handed::Wss => Some((Some(self.wss_tls.as_ref()?), Some(self.ws?), None)),
        }
    }

    /// Every TLS setting here, for SIGHUP to read again.
    pub fn tls_settings(&self) -> impl Iterator<Item = Arc<ServerTls>> + '_ {
        self.tls.iter().chain(&self.wss_tls).cloned()
    }
}

/// How a client is served: its TLS settings, its WebSocket limits, the
/// bound of its CONNECT when it gets its certificate's name.
type Serve<'a> = (Option<&'a Arc<ServerTls>>, Option<WsLimits>, Option<usize>);

/// What became of one client's socket.
enum Made {
    Client(Arc<dyn ClientTransport>),
    /// Too many TLS handshakes in flight: refused.
    Refused,
    /// Its bytes were bad or its settings failed: dropped.
    Dropped,
}

/// A client's transport: `socket` with TLS (`tls`), WebSockets (`ws`,
/// over TLS with `tls`) or neither, `received` the bytes already read from
/// it (fed to the outermost layer that reads the socket). A TLS client
/// takes a slot of `handshakes`; with none left it is sent a fatal alert.
fn transport(socket: TcpStream, (tls, ws, identity_max): Serve<'_>, received: &[u8], handshakes: &Handshakes) -> Made {
    let (inner, received): (Box<dyn ClientTransport>, &[u8]) = match tls {
        None => (Box::new(TcpClient::new(socket)), received),
        Some(tls) => {
            let Some(slot) = handshakes.start() else {
                // Best effort: the client learns why, if its socket takes
                // it (straight to the socket: the reactor has not yet said
                // it is writable).
                let _ = socket2::SockRef::from(&socket).send(&alert_record(rustls::AlertDescription::InternalError));
                return Made::Refused;
            };
            // Settings in force now; a reload changes later clients'.
            let Ok(conn) = tls.new_connection() else { return Made::Dropped };
            match TlsClient::new(socket, conn, identity_max, Some(slot), received) {
                Ok(client) => (Box::new(client), &[]),
                Err(_) => return Made::Dropped,
            }
        }
    };
    Made::Client(match ws {
        None => Arc::from(inner),
        Some(limits) => match WsClient::with_received(inner, limits, received) {
            Ok(client) => Arc::new(client),
            Err(_) => return Made::Dropped,
        },
    })
}

/// One address clients connect to.
#[derive(Clone, Debug)]
pub struct ListenOn {
    pub addr: SocketAddr,
    /// TLS settings: clients here speak MQTT over TLS. `None`: plain MQTT.
    pub tls: Option<Arc<ServerTls>>,
    /// Clients here speak MQTT over WebSockets (over TLS with `tls`), held
    /// to these limits.
    pub ws: Option<WsLimits>,
    /// With TLS and no WebSockets: the CONNECT (at most this many bytes)
    /// gets the client certificate's common name as its user name.
    pub identity_max: Option<usize>,
}

impl ListenOn {
    /// What its clients speak, in words.
    fn protocol(&self) -> &'static str {
        match (&self.tls, &self.ws) {
            (None, None) => "MQTT",
            (Some(_), None) => "MQTT over TLS",
            (None, Some(_)) => "MQTT over WebSockets",
            (Some(_), Some(_)) => "MQTT over secure WebSockets",
        }
    }

    /// How its clients are served: TLS settings, WebSocket limits, identity bound.
    fn serve(&self) -> Serve<'_> {
        (self.tls.as_ref(), self.ws, self.identity_max)
    }
}

/// A bound listener and what its clients speak.
pub struct Listener {
    socket: std::net::TcpListener,
    on: ListenOn,
}

/// Where a VM's clients come from.
pub enum Ingress {
    /// Accepted here. Bound before boot, so a busy port is reported before
    /// anything starts.
    Listen(Vec<Listener>),
    /// Accepted by `mqvisor serve` and handed over on this socket, served
    /// with these settings.
    Handoff(UnixDatagram, HandoffEdge),
}

impl Ingress {
    /// Clients accepted on every one of `addrs`, bound now (so a busy
    /// address is reported before anything starts); the error names the
    /// address that failed.
    pub fn listen(addrs: &[ListenOn]) -> Result<Ingress, (SocketAddr, std::io::Error)> {
        let mut listeners = Vec::new();
        for on in addrs {
            let bound = std::net::TcpListener::bind(on.addr).and_then(|socket| Ok((socket.local_addr()?, socket)));
            let (local, socket) = bound.map_err(|e| (on.addr, e))?;
            match on.protocol() {
                "MQTT" => eprintln!("mqvisor: tenant VM listening on {local}"),
                what => eprintln!("mqvisor: tenant VM listening for {what} on {local}"),
            }
            listeners.push(Listener { socket, on: on.clone() });
        }
        Ok(Ingress::Listen(listeners))
    }

    /// Makes the sockets non-blocking (before the net thread takes them).
    pub fn set_nonblocking(&self) -> std::io::Result<()> {
        match self {
            Ingress::Listen(listeners) => listeners.iter().try_for_each(|l| l.socket.set_nonblocking(true)),
            Ingress::Handoff(socket, _) => socket.set_nonblocking(true),
        }
    }
}

/// The ingress inside the net thread's reactor, and the handshakes in
/// flight of its TLS clients.
pub struct Clients {
    from: From,
    handshakes: Handshakes,
    refused_handshakes: u64,
    /// A handed-over client of a kind without settings was said.
    said_unserved: bool,
    /// The latest users and ACL change from `mqvisor serve`, not yet taken.
    auth_change: Option<Vec<u8>>,
    /// The latest fence deadline from `mqvisor serve` (see `fence`).
    fence: Option<Instant>,
    /// The latest connection to a new standby, not yet taken.
    standby_offer: Option<std::fs::File>,
}

enum From {
    Listen(Vec<(TcpListener, ListenOn)>),
    /// The buffer datagrams are read into is kept: a fresh one per read
    /// zeroed its 256 KiB for every client handed over.
    Handoff(AsyncFd<UnixDatagram>, HandoffEdge, Box<[u8]>),
    /// The handoff socket failed: no more clients come.
    Closed,
}

impl Clients {
    /// Registers `ingress` with the current reactor, TLS handshakes in
    /// flight bounded by [`MAX_HANDSHAKES_IN_FLIGHT`](super::transport::tls::MAX_HANDSHAKES_IN_FLIGHT).
    pub fn new(ingress: Ingress) -> std::io::Result<Clients> {
        Clients::bounded(ingress, Handshakes::default())
    }

    /// Registers `ingress` with the current reactor, TLS handshakes in
    /// flight bounded by `handshakes`.
    pub fn bounded(ingress: Ingress, handshakes: Handshakes) -> std::io::Result<Clients> {
        let from = match ingress {
            Ingress::Listen(listeners) => From::Listen(
                listeners
                    .into_iter()
                    .map(|l| Ok((TcpListener::from_std(l.socket)?, l.on)))
                    .collect::<std::io::Result<_>>()?,
            ),
            // Pages of it are only made when a datagram is that long.
            Ingress::Handoff(socket, edge) => {
                From::Handoff(watch_fd(socket)?, edge, vec![0u8; 1 + MAX_HANDOFF_BYTES].into_boxed_slice())
            }
        };
        Ok(Clients {
            from,
            handshakes,
            refused_handshakes: 0,
            said_unserved: false,
            auth_change: None,
            fence: None,
            standby_offer: None,
        })
    }

    /// TLS clients refused so far: too many handshakes were in flight.
    pub fn refused_handshakes(&self) -> u64 {
        self.refused_handshakes
    }

    /// The arrival of `socket`, served so, or `None` (refused or dropped).
    fn make(&mut self, socket: TcpStream, serve: Serve<'_>, received: Vec<u8>) -> Option<Arrival> {
        // Plain MQTT's bytes go to the guest with the client; the others'
        // are the transport's to unwrap.
        let (made, first) = if serve.0.is_some() || serve.1.is_some() {
            (transport(socket, serve, &received, &self.handshakes), Vec::new())
        } else {
            (transport(socket, serve, &[], &self.handshakes), received)
        };
        match made {
            Made::Client(client) => Some((client, first)),
            Made::Refused => {
                self.refused_handshakes += 1;
                None
            }
            Made::Dropped => None,
        }
    }

    /// The clients that arrived, when some did: waits for them (forever
    /// once closed). A failed handoff socket is said once and closed.
    pub async fn arrived(&mut self) -> Vec<Arrival> {
        match &mut self.from {
            From::Listen(listeners) => {
                let (accepted, on) = std::future::poll_fn(|cx| {
                    for (listener, on) in listeners.iter() {
                        if let Poll::Ready(accepted) = listener.poll_accept(cx) {
                            return Poll::Ready((accepted, on));
                        }
                    }
                    Poll::Pending
                })
                .await;
                let Ok((socket, _)) = accepted else { return Vec::new() };
                let on = on.clone();
                // The next accept looks at another listener first: a flood
                // on one port does not starve the others.
                listeners.rotate_left(1);
                self.make(socket, on.serve(), Vec::new()).into_iter().collect()
            }
            From::Handoff(socket, edge, buf) => match handed_over(socket, buf).await {
                Ok(Received { clients: handed, auth, fence, standby }) => {
                    if auth.is_some() {
                        self.auth_change = auth;
                    }
                    if fence.is_some() {
                        self.fence = fence;
                    }
                    if standby.is_some() {
                        self.standby_offer = standby;
                    }
                    let edge = edge.clone();
                    let mut arrived = Vec::with_capacity(handed.len());
                    for (socket, kind, bytes) in handed {
                        match kind.and_then(|kind| edge.serve(kind)) {
                            Some(serve) => arrived.extend(self.make(socket, serve, bytes)),
                            None => self.unserved(kind),
                        }
                    }
                    arrived
                }
                Err(e) => {
                    eprintln!("mqvisor: handoff socket: {e}");
                    self.from = From::Closed;
                    Vec::new()
                }
            },
            From::Closed => std::future::pending().await,
        }
    }

    /// A handed-over client this process cannot serve (its socket is
    /// dropped): said once, for a daemon and a process that disagree.
    fn unserved(&mut self, kind: Option<Handed>) {
        if !std::mem::replace(&mut self.said_unserved, true) {
            match kind {
                Some(kind) => eprintln!("mqvisor: handoff: a client of kind {kind:?} without its settings is closed"),
                None => eprintln!("mqvisor: handoff: a client of no known kind is closed"),
            }
        }
    }

    /// The latest users and ACL change `mqvisor serve` sent, once (earlier
    /// ones are superseded: each carries every table it manages).
    pub fn take_auth_change(&mut self) -> Option<Vec<u8>> {
        self.auth_change.take()
    }

    /// The connection to a new standby `mqvisor serve` sent, once.
    pub fn take_standby_offer(&mut self) -> Option<std::fs::File> {
        self.standby_offer.take()
    }

    /// The moment past which no client may be served (see `fence`): the
    /// latest deadline `mqvisor serve` sent, if it sent one.
    pub fn fence(&self) -> Option<Instant> {
        self.fence
    }

    /// True when the clients come from `mqvisor serve`, which wants reports.
    pub fn reports(&self) -> bool {
        matches!(self.from, From::Handoff(..))
    }

    /// Tells `mqvisor serve` this VM's load (best effort: a full socket
    /// skips a report).
    pub fn report(&self, counters: &Counters) {
        if let From::Handoff(socket, ..) = &self.from {
            let _ = socket.get_ref().send(&counters.to_report());
        }
    }
}

/// A client handed over: its socket, its kind (`None`: no known kind, or
/// no byte at all) and the bytes read before the handoff.
type HandedOver = (TcpStream, Option<Handed>, Vec<u8>);

/// What the datagrams waiting on the handoff socket carried.
#[derive(Default)]
struct Received {
    clients: Vec<HandedOver>,
    /// The latest users and ACL change among them.
    auth: Option<Vec<u8>>,
    /// The latest fence deadline among them.
    fence: Option<Instant>,
    /// The latest connection to a new standby among them.
    standby: Option<std::fs::File>,
}

/// Every client waiting on the handoff socket, and the latest users and
/// ACL change and fence deadline among the datagrams.
/// `buf` holds a datagram: the kind byte, then the bytes.
async fn handed_over(handoff: &AsyncFd<UnixDatagram>, buf: &mut [u8]) -> std::io::Result<Received> {
    let mut guard = handoff.readable().await?;
    let mut received = Received::default();
    loop {
        let datagram = guard.try_io(|inner| {
            inner.get_ref().recv_with_fd(buf).map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
        });
        match datagram {
            Ok(Ok((1, Some(file)))) if buf[0] == STANDBY_OFFER => received.standby = Some(file),
            Ok(Ok((len, Some(file)))) => {
                let socket = std::net::TcpStream::from(std::os::fd::OwnedFd::from(file));
                socket.set_nonblocking(true)?;
                let kind = buf.first().filter(|_| len > 0).and_then(|&byte| Handed::from_byte(byte));
                let bytes = buf.get(1..len).unwrap_or_default().to_vec();
                received.clients.push((TcpStream::from_std(socket)?, kind, bytes));
            }
            // A datagram without a socket is not a client: a users and ACL
            // change (bounded, as the guest will check again), a fence
            // deadline, or nothing.
            Ok(Ok((len, None))) => {
                if len > 1 && buf[0] == AUTH_CHANGE && len - 1 <= mqvisor_boot_abi::config_blob::MAX_AUTH_LEN {
                    received.auth = Some(buf[1..len].to_vec());
                } else if let Some(at) = fence::deadline(&buf[..len]) {
                    received.fence = Some(at);
                }
            }
            Ok(Err(e)) => return Err(e),
            // Would block: every waiting client is taken.
            Err(_) => return Ok(received),
        }
    }
}

/// Registers an eventfd or a unix socket, which the reactor then owns.
pub fn watch_fd<T: std::os::fd::AsRawFd>(owner: T) -> std::io::Result<AsyncFd<T>> {
    // SAFETY: the callers pass `EventFd` and `UnixDatagram`, which own their
    // descriptor, keep it open until dropped and always return the same one
    // from `as_raw_fd`; the AsyncFd owns the value.
    unsafe { AsyncFd::register(owner) }.map_err(std::io::Error::from)
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::fd::AsRawFd;

    use super::*;
    use crate::net::tls::{Alpn, TlsFiles};

    /// TLS settings from fresh files in `dir`.
    fn server_tls(dir: &std::path::Path, alpn: Alpn) -> Arc<ServerTls> {
        std::fs::create_dir_all(dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["acme.example".to_string()]).unwrap().self_signed(&key).unwrap();
        let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        Arc::new(
            ServerTls::load(TlsFiles { cert: cert_path, key: key_path, client_ca: None, alpn, named: None }).unwrap(),
        )
    }

    /// Hands a new loopback client over as `datagram`; returns its peer end.
    fn hand_over(daemon: &UnixDatagram, datagram: &[u8]) -> std::net::TcpStream {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let (socket, _) = listener.accept().unwrap();
        daemon.send_with_fd(datagram, socket.as_raw_fd()).unwrap();
        peer
    }

    /// The clients that arrive next.
    async fn next(clients: &mut Clients) -> Vec<Arrival> {
        tokio::time::timeout(Duration::from_secs(10), clients.arrived()).await.unwrap()
    }

    #[test]
    fn the_kind_byte_round_trips_and_nothing_else_is_a_kind() {
        for kind in [Handed::Mqtt, Handed::Tls, Handed::Ws, Handed::Wss] {
            assert_eq!(Handed::from_byte(kind.to_byte()), Some(kind));
        }
        assert_eq!((Handed::Mqtt.to_byte(), Handed::Wss.to_byte()), (0, 3));
        assert!((4..=u8::MAX).all(|byte| Handed::from_byte(byte).is_none()));
        assert!(Handed::from_byte(AUTH_CHANGE).is_none());
    }

    #[test]
    fn a_users_change_without_a_socket_is_kept_latest_first_and_never_a_client() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let (daemon, process) = UnixDatagram::pair().unwrap();
            process.set_nonblocking(true).unwrap();
            let mut clients = Clients::new(Ingress::Handoff(process, HandoffEdge::default())).unwrap();
            daemon.send(&[AUTH_CHANGE, 1, b'a']).unwrap();
            daemon.send(&[AUTH_CHANGE, 1, b'b']).unwrap();
            // Too large to be one: ignored.
            let mut huge = vec![AUTH_CHANGE; 2 + mqvisor_boot_abi::config_blob::MAX_AUTH_LEN];
            huge[1] = 1;
            daemon.send(&huge).unwrap();
            let _plain = hand_over(&daemon, &[Handed::Mqtt.to_byte()]);
            assert_eq!(next(&mut clients).await.len(), 1);
            assert_eq!(clients.take_auth_change(), Some(vec![1, b'b']));
            assert_eq!(clients.take_auth_change(), None);
            // With a socket it is no change and no client: the socket is closed.
            let mut sent_with_socket = hand_over(&daemon, &[AUTH_CHANGE, 1]);
            assert!(next(&mut clients).await.is_empty());
            assert_eq!(clients.take_auth_change(), None);
            assert_eq!(sent_with_socket.read(&mut [0u8; 8]).unwrap(), 0);
        });
    }

    #[test]
    fn a_fence_deadline_is_kept_latest_first_and_never_a_client() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let (daemon, process) = UnixDatagram::pair().unwrap();
            process.set_nonblocking(true).unwrap();
            let mut clients = Clients::new(Ingress::Handoff(process, HandoffEdge::default())).unwrap();
            assert_eq!(clients.fence(), None, "no deadline before serve sends one");
            let later = Instant::now() + Duration::from_secs(4);
            daemon.send(&fence::datagram(Instant::now() + Duration::from_secs(2))).unwrap();
            daemon.send(&fence::datagram(later)).unwrap();
            // Cut short: no deadline, and not the one before it undone.
            daemon.send(&fence::datagram(Instant::now())[..5]).unwrap();
            let _plain = hand_over(&daemon, &[Handed::Mqtt.to_byte()]);
            assert_eq!(next(&mut clients).await.len(), 1);
            let kept = clients.fence().unwrap();
            assert!(kept.max(later) - kept.min(later) < Duration::from_millis(5), "{kept:?} vs {later:?}");
            assert_eq!(clients.take_auth_change(), None);
        });
    }

    #[test]
    fn each_kind_is_served_by_its_settings_and_tls_past_the_bound_is_refused() {
        let dir = std::env::temp_dir().join(format!("mqvisor-ingress-handoff-{}", std::process::id()));
        let edge = HandoffEdge { tls: Some(server_tls(&dir, Alpn::Mqtt)), wss_tls: None, ws: None, identity_max: None };
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let (daemon, process) = UnixDatagram::pair().unwrap();
            process.set_nonblocking(true).unwrap();
            let mut clients = Clients::bounded(Ingress::Handoff(process, edge), Handshakes::new(1)).unwrap();
            // Plain MQTT: the bytes go to the guest with the client.
            let _plain = hand_over(&daemon, &[&[Handed::Mqtt.to_byte()][..], b"CONNECT"].concat());
            let arrivals = next(&mut clients).await;
            assert_eq!(arrivals.len(), 1);
            assert_eq!(arrivals[0].1, b"CONNECT");

            // TLS: the transport takes the bytes (a ClientHello would be
            // answered); the one slot is taken while it lives.
            // The start of a record: rustls waits for the rest.
            let hello = [Handed::Tls.to_byte(), 0x16, 0x03, 0x01, 0x00, 0x05, 0x01, 0x00];
            let _tls = hand_over(&daemon, &hello);
            let tls = next(&mut clients).await;
            assert_eq!(tls.len(), 1);
            assert!(tls[0].1.is_empty());

            // Past the bound: refused at once with a fatal alert, counted.
            let mut refused = hand_over(&daemon, &hello);
            // No settings for ws, and no kind at all: closed, not counted.
            let mut no_ws = hand_over(&daemon, &[Handed::Ws.to_byte()]);
            let mut no_kind = hand_over(&daemon, &[9, 1, 2]);
            let none = next(&mut clients).await;
            assert!(none.is_empty());
            assert_eq!(clients.refused_handshakes(), 1);
            let mut alert = Vec::new();
            refused.read_to_end(&mut alert).unwrap();
            assert_eq!(alert, alert_record(rustls::AlertDescription::InternalError));
            for closed in [&mut no_ws, &mut no_kind] {
                assert_eq!(closed.read(&mut [0u8; 8]).unwrap(), 0);
            }

            // The TLS client goes: its slot comes back.
            drop(tls);
            let _again = hand_over(&daemon, &hello);
            let again = next(&mut clients).await;
            assert_eq!((again.len(), clients.refused_handshakes()), (1, 1));
        });
        let _ = std::fs::remove_dir_all(&dir);
    }
}
