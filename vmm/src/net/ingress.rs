//! Where a VM's clients come from, and what it tells `mqvisor serve` back.
//!
//! Owns the two ways in: listeners bound before boot (`mqvisor run`:
//! plain MQTT, and MQTT over TLS with the settings of a [`ServerTls`]), or
//! the handoff socket of `mqvisor serve`, on which each client arrives as
//! one datagram carrying its socket (SCM_RIGHTS) and the bytes the daemon
//! already read from it (its CONNECT, possibly rewritten). On the same
//! socket the VM sends its load report: its [`Counters`] as
//! [`Counters::to_report`] encodes them, every [`REPORT_EVERY`] and once
//! when its guest's link is up (the daemon times boots by that). Never
//! trusts a datagram: one without a socket is no client.

use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::net::{TcpListener, TcpStream};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::metrics::Counters;
use super::tls::ServerTls;
use super::transport::tls::TlsClient;
use super::transport::ws::WsClient;
use super::transport::{ClientTransport, TcpClient};
use super::websocket::WsLimits;

/// Largest datagram of bytes handed over with a client.
pub const MAX_HANDOFF_BYTES: usize = 256 * 1024;

/// How often a VM fed by `mqvisor serve` reports its load back on the
/// handoff socket.
pub const REPORT_EVERY: Duration = Duration::from_secs(1);

/// A client as it arrives: its transport and the bytes read from it before.
pub type Arrival = (Arc<dyn ClientTransport>, Vec<u8>);

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

    /// The transport of a client accepted here.
    fn client(&self, socket: TcpStream) -> Option<Arc<dyn ClientTransport>> {
        let inner: Box<dyn ClientTransport> = match &self.tls {
            None => Box::new(TcpClient::new(socket)),
            // Settings in force now; a reload changes later clients'.
            Some(tls) => Box::new(TlsClient::new(socket, tls.new_connection().ok()?, self.identity_max)),
        };
        Some(match self.ws {
            None => Arc::from(inner),
            Some(limits) => Arc::new(WsClient::new(inner, limits)),
        })
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
    /// Accepted by `mqvisor serve` and handed over on this socket.
    Handoff(UnixDatagram),
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
            Ingress::Handoff(socket) => socket.set_nonblocking(true),
        }
    }
}

/// The ingress inside the net thread's reactor.
pub enum Clients {
    Listen(Vec<(TcpListener, ListenOn)>),
    Handoff(AsyncFd<UnixDatagram>),
    /// The handoff socket failed: no more clients come.
    Closed,
}

impl Clients {
    /// Registers `ingress` with the current reactor.
    pub fn new(ingress: Ingress) -> std::io::Result<Clients> {
        Ok(match ingress {
            Ingress::Listen(listeners) => Clients::Listen(
                listeners
                    .into_iter()
                    .map(|l| Ok((TcpListener::from_std(l.socket)?, l.on)))
                    .collect::<std::io::Result<_>>()?,
            ),
            Ingress::Handoff(socket) => Clients::Handoff(watch_fd(socket)?),
        })
    }

    /// The clients that arrived, when some did: waits for them (forever
    /// once closed). A failed handoff socket is said once and closed.
    pub async fn arrived(&mut self) -> Vec<Arrival> {
        match self {
            Clients::Listen(listeners) => {
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
                let arrived = on.client(socket).map(|client| (client, Vec::new())).into_iter().collect();
                // The next accept looks at another listener first: a flood
                // on one port does not starve the others.
                listeners.rotate_left(1);
                arrived
            }
            Clients::Handoff(socket) => match handed_over(socket).await {
                Ok(clients) => clients,
                Err(e) => {
                    eprintln!("mqvisor: handoff socket: {e}");
                    *self = Clients::Closed;
                    Vec::new()
                }
            },
            Clients::Closed => std::future::pending().await,
        }
    }

    /// True when the clients come from `mqvisor serve`, which wants reports.
    pub fn reports(&self) -> bool {
        matches!(self, Clients::Handoff(_))
    }

    /// Tells `mqvisor serve` this VM's load (best effort: a full socket
    /// skips a report).
    pub fn report(&self, counters: &Counters) {
        if let Clients::Handoff(socket) = self {
            let _ = socket.get_ref().send(&counters.to_report());
        }
    }
}

fn tcp(socket: TcpStream) -> Arc<dyn ClientTransport> {
    Arc::new(TcpClient::new(socket))
}

/// Every client waiting on the handoff socket, with the bytes read before
/// the handoff.
async fn handed_over(handoff: &AsyncFd<UnixDatagram>) -> std::io::Result<Vec<Arrival>> {
    let mut guard = handoff.readable().await?;
    let mut clients = Vec::new();
    let mut buf = vec![0u8; MAX_HANDOFF_BYTES];
    loop {
        let received = guard.try_io(|inner| {
            inner.get_ref().recv_with_fd(&mut buf).map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
        });
        match received {
            Ok(Ok((len, Some(file)))) => {
                let socket = std::net::TcpStream::from(std::os::fd::OwnedFd::from(file));
                socket.set_nonblocking(true)?;
                clients.push((tcp(TcpStream::from_std(socket)?), buf[..len].to_vec()));
            }
            // A datagram without a socket is not a client.
            Ok(Ok((_, None))) => {}
            Ok(Err(e)) => return Err(e),
            // Would block: every waiting client is taken.
            Err(_) => return Ok(clients),
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
