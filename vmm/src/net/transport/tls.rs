//! A TLS client: [`ClientTransport`] over a TCP stream and a rustls
//! [`ServerConnection`], the handshake driven by the same readiness as
//! the bytes after it.
//!
//! Owns: reading TLS records from the socket only when no decrypted byte
//! is waiting (so what it holds is at most one read of records, rustls
//! caps that), sealing what the proxy writes in records and sending them
//! (at most [`SEND_BUFFER`] bytes of records waiting for the socket), and
//! sending the handshake's own messages as the client's reads drive it.
//! A client that is not speaking TLS (plain MQTT on the TLS port, say)
//! fails its first read: it is sent an alert and dropped, and nothing
//! reaches the guest.
//!
//! Records the socket could not take yet go out on the next call, or when
//! the socket becomes writable: while any wait, the client is read-ready
//! as soon as its socket is writable (the proxy's next read sends them).
//!
//! A client may come with bytes already read from its socket (its
//! ClientHello, read by `mqvisor serve` to pick the tenant): they are fed
//! to rustls before any read of the socket. Also owns the bound on
//! handshakes in flight ([`Handshakes`]): each client holds a slot until
//! its handshake completes or it goes; one beyond the bound is never made.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::server::ServerConnection;
use tokio::net::TcpStream;

use super::{ClientTransport, bytes_acked};
use crate::net::paced::quick_ack;

/// Sealed records waiting for the socket, at most: a little more than one
/// full record (16 KiB and its overhead).
pub const SEND_BUFFER: usize = 18 * 1024;

/// TLS handshakes in flight in one process, at most. A handshake costs
/// the server a signature and some 30 KiB of state before the client has
/// proven anything, and lasts up to the broker's connect timeout: without
/// a bound, a flood of ClientHellos (each a few hundred bytes to send)
/// buys a tenant's process unbounded CPU and memory. Honest clients
/// finish in a round trip or two, so 512 at once is far above any real
/// burst of one tenant; past it new TLS clients are refused at once.
pub const MAX_HANDSHAKES_IN_FLIGHT: usize = 512;

/// The handshakes in flight of one process, against their bound.
#[derive(Clone, Debug)]
pub struct Handshakes {
    in_flight: Arc<AtomicUsize>,
    max: usize,
}

impl Handshakes {
    /// At most `max` at once.
    pub fn new(max: usize) -> Handshakes {
        Handshakes { in_flight: Arc::new(AtomicUsize::new(0)), max }
    }

    /// A slot for one more handshake; `None` when `max` are in flight.
    pub fn start(&self) -> Option<HandshakeSlot> {
        let taken =
            self.in_flight.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.max).then_some(n + 1));
        taken.ok().map(|_| HandshakeSlot(self.in_flight.clone()))
    }

    /// Handshakes in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }
}

impl Default for Handshakes {
    fn default() -> Handshakes {
        Handshakes::new(MAX_HANDSHAKES_IN_FLIGHT)
    }
}

/// One handshake in flight: given back when dropped.
#[derive(Debug)]
pub struct HandshakeSlot(Arc<AtomicUsize>);

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A TLS client (see the module doc).
pub struct TlsClient {
    socket: TcpStream,
    tls: Mutex<Inner>,
}

struct Inner {
    conn: ServerConnection,
    identity: Identity,
    /// Held until the handshake completes (or the client goes).
    handshake: Option<HandshakeSlot>,
}

impl Inner {
    /// Gives the handshake's slot back once it has completed.
    fn settle(&mut self) {
        if self.handshake.is_some() && !self.conn.is_handshaking() {
            self.handshake = None;
        }
    }
}

/// The CONNECT's user name made the client certificate's common name
/// (`--tls-identity-as-user`): the first packet is read whole, rewritten,
/// and handed on before any other byte.
enum Identity {
    /// Not asked for, or done.
    Off,
    /// The first packet so far, and the most it may be.
    Reading { bytes: Vec<u8>, max: usize },
    /// The rewritten CONNECT (and what followed it), from `at` on.
    Rewritten { bytes: Vec<u8>, at: usize },
}

impl TlsClient {
    /// Wraps `socket` with `tls` (a new server connection), with Nagle's
    /// algorithm off, holding `handshake` until the handshake completes.
    /// `received` are bytes already read from the socket (empty for a
    /// client accepted here): they are taken before any socket read, and
    /// the answers they call for are sent as far as the socket takes them.
    /// With `identity_max`, the CONNECT (at most that many bytes) gets the
    /// client certificate's common name as its user name, and no password.
    /// An error (the bytes are no TLS, or more than rustls buffers before
    /// the handshake answers) means the client is to be dropped.
    pub fn new(
        socket: TcpStream,
        mut tls: ServerConnection,
        identity_max: Option<usize>,
        handshake: Option<HandshakeSlot>,
        received: &[u8],
    ) -> io::Result<TlsClient> {
        let _ = socket.set_nodelay(true);
        tls.set_buffer_limit(Some(SEND_BUFFER));
        let identity = identity_max.map_or(Identity::Off, |max| Identity::Reading { bytes: Vec::new(), max });
        let client = TlsClient { socket, tls: Mutex::new(Inner { conn: tls, identity, handshake }) };
        client.take_received(received)?;
        Ok(client)
    }

    /// Feeds `received` to rustls, every byte of it.
    fn take_received(&self, mut received: &[u8]) -> io::Result<()> {
        let mut inner = self.tls();
        while !received.is_empty() {
            let tls = &mut inner.conn;
            // rustls takes what fits in its buffers; processing makes room.
            let taken = tls.read_tls(&mut received)?;
            let processed = tls.process_new_packets();
            // The answers (or the alert) go out if the socket takes them;
            // the rest on the first read.
            let _ = self.send_records(tls);
            if let Err(error) = processed {
                // The alert (no_application_protocol, say) straight to the
                // socket: the reactor has not yet said it is writable, so
                // the write above was not even tried.
                let mut alert = Vec::new();
                while tls.wants_write() && tls.write_tls(&mut alert).is_ok_and(|n| n > 0) {}
                let _ = socket2::SockRef::from(&self.socket).send(&alert);
                return Err(io::Error::new(io::ErrorKind::InvalidData, error));
            }
            if taken == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "more bytes before the handshake than TLS buffers",
                ));
            }
        }
        inner.settle();
        Ok(())
    }

    fn tls(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.tls.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Plaintext for the proxy: the rewritten CONNECT first, when asked for.
    fn read_plain(&self, inner: &mut Inner, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match &mut inner.identity {
                Identity::Off => return read_conn(&mut inner.conn, buf),
                Identity::Rewritten { bytes, at } => {
                    let n = (bytes.len() - *at).min(buf.len());
                    buf[..n].copy_from_slice(&bytes[*at..*at + n]);
                    *at += n;
                    if *at == bytes.len() {
                        inner.identity = Identity::Off;
                    }
                    return Ok(n);
                }
                Identity::Reading { bytes, max } => {
                    let mut chunk = [0u8; 4096];
                    let n = read_conn(&mut inner.conn, &mut chunk)?;
                    if n == 0 {
                        return Ok(0);
                    }
                    bytes.extend_from_slice(&chunk[..n]);
                    let Some(rewritten) = rewrite_connect(&inner.conn, bytes, *max)? else {
                        continue;
                    };
                    inner.identity = Identity::Rewritten { bytes: rewritten, at: 0 };
                }
            }
        }
    }

    /// Sends what records wait, as far as the socket takes them. Ok when
    /// none is left; `WouldBlock` when some are.
    fn send_records(&self, tls: &mut ServerConnection) -> io::Result<()> {
        while tls.wants_write() {
            match tls.write_tls(&mut SocketIo(&self.socket)) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Decrypted bytes of `conn`; `Ok(0)` once the client finished sending.
fn read_conn(conn: &mut ServerConnection, buf: &mut [u8]) -> io::Result<usize> {
    match conn.reader().read(buf) {
        // The client closed its socket without close_notify: it has
        // finished sending all the same.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
        other => other,
    }
}

/// Once `bytes` hold the first packet whole: it, a CONNECT, with the
/// client certificate's common name as user name and no password, and
/// what followed it. `None` while more is needed; an error for a first
/// packet that is no CONNECT, too large, or a certificate without a usable
/// name (the client is dropped).
fn rewrite_connect(conn: &ServerConnection, bytes: &[u8], max: usize) -> io::Result<Option<Vec<u8>>> {
    use mqvisor_broker::packet::{self, Packet, Version};
    let refused = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
    let frame = match packet::frame(bytes, max) {
        Ok(Some(frame)) => frame,
        Ok(None) if bytes.len() < max => return Ok(None),
        _ => return Err(refused("the first packet is malformed or too large".into())),
    };
    let len = frame.len;
    let Ok(Packet::Connect(mut connect)) = packet::decode(frame, bytes, Version::V3_1_1) else {
        return Err(refused("the first packet is no CONNECT".into()));
    };
    let name = crate::net::tls::identity::identity_user_name(conn).map_err(|e| refused(e.to_string()))?;
    connect.username = Some(name);
    connect.password = None;
    let version = connect.version;
    let mut out = Vec::with_capacity(bytes.len() + 64);
    packet::encode(&Packet::Connect(connect), version, &mut out);
    out.extend_from_slice(&bytes[len..]);
    Ok(Some(out))
}

/// `Read`/`Write` over the non-blocking socket, for rustls.
struct SocketIo<'a>(&'a TcpStream);

impl Read for SocketIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl Write for SocketIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ClientTransport for TlsClient {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        {
            let mut inner = self.tls();
            if matches!(inner.identity, Identity::Rewritten { .. }) {
                return Poll::Ready(Ok(()));
            }
            let processed = inner
                .conn
                .process_new_packets()
                .map(|state| state.plaintext_bytes_to_read() > 0 || state.peer_has_closed());
            inner.settle();
            match processed {
                Ok(true) => return Poll::Ready(Ok(())),
                Ok(false) => {}
                // The next read reports it.
                Err(_) => return Poll::Ready(Ok(())),
            }
            let tls = &inner.conn;
            if tls.wants_write() && self.socket.poll_write_ready(cx).is_ready() {
                // Records wait and the socket takes them: the read sends them.
                return Poll::Ready(Ok(()));
            }
        }
        self.socket.poll_read_ready(cx)
    }

    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.socket.poll_write_ready(cx)
    }

    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut inner = self.tls();
        loop {
            match self.read_plain(&mut inner, buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                other => return other,
            }
            let tls = &mut inner.conn;
            // Nothing decrypted waits: read records (none while records of
            // ours wait for a socket that does not take them: the client
            // is not reading).
            match self.send_records(tls) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(e),
                Err(e) => return Err(e),
            }
            let read = tls.read_tls(&mut SocketIo(&self.socket))?;
            if read > 0 {
                quick_ack(&self.socket);
            }
            if let Err(error) = tls.process_new_packets() {
                // Not TLS, or a handshake that failed: the alert rustls
                // queued goes out if the socket takes it.
                let _ = self.send_records(tls);
                return Err(io::Error::new(io::ErrorKind::InvalidData, error));
            }
            inner.settle();
            let tls = &mut inner.conn;
            match self.send_records(tls) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        let mut inner = self.tls();
        let tls = &mut inner.conn;
        // Earlier records first; none are taken while they wait.
        self.send_records(tls)?;
        if buf.is_empty() {
            return Ok(0);
        }
        let taken = tls.writer().write(buf)?;
        if taken == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        match self.send_records(tls) {
            Ok(()) => Ok(taken),
            // Taken and sealed: they go out on the next call or read.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(taken),
            Err(e) => Err(e),
        }
    }

    fn bytes_acked(&self) -> u64 {
        bytes_acked(&self.socket)
    }

    fn shutdown_write(&self) {
        let mut inner = self.tls();
        inner.conn.send_close_notify();
        let _ = self.send_records(&mut inner.conn);
        let _ = socket2::SockRef::from(&self.socket).shutdown(Shutdown::Write);
    }

    fn reset(&self) {
        let _ = socket2::SockRef::from(&self.socket).set_linger(Some(Duration::ZERO));
    }
}
