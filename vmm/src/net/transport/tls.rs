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

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::{Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::server::ServerConnection;
use tokio::net::TcpStream;

use super::{ClientTransport, bytes_acked};
use crate::net::paced::quick_ack;

/// Sealed records waiting for the socket, at most: a little more than one
/// full record (16 KiB and its overhead).
pub const SEND_BUFFER: usize = 18 * 1024;

/// A TLS client (see the module doc).
pub struct TlsClient {
    socket: TcpStream,
    tls: Mutex<ServerConnection>,
}

impl TlsClient {
    /// Wraps `socket` with `tls` (a new server connection, no byte read
    /// yet), with Nagle's algorithm off.
    pub fn new(socket: TcpStream, mut tls: ServerConnection) -> TlsClient {
        let _ = socket.set_nodelay(true);
        tls.set_buffer_limit(Some(SEND_BUFFER));
        TlsClient { socket, tls: Mutex::new(tls) }
    }

    fn tls(&self) -> std::sync::MutexGuard<'_, ServerConnection> {
        self.tls.lock().unwrap_or_else(PoisonError::into_inner)
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
            let mut tls = self.tls();
            match tls.process_new_packets() {
                Ok(state) if state.plaintext_bytes_to_read() > 0 || state.peer_has_closed() => {
                    return Poll::Ready(Ok(()));
                }
                Ok(_) => {}
                // The next read reports it.
                Err(_) => return Poll::Ready(Ok(())),
            }
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
        let mut tls = self.tls();
        loop {
            match tls.reader().read(buf) {
                Ok(n) => return Ok(n),
                // The client closed its socket without close_notify: it
                // has finished sending all the same.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            // Nothing decrypted waits: read records (none while records of
            // ours wait for a socket that does not take them: the client
            // is not reading).
            match self.send_records(&mut tls) {
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
                let _ = self.send_records(&mut tls);
                return Err(io::Error::new(io::ErrorKind::InvalidData, error));
            }
            match self.send_records(&mut tls) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        let mut tls = self.tls();
        // Earlier records first; none are taken while they wait.
        self.send_records(&mut tls)?;
        if buf.is_empty() {
            return Ok(0);
        }
        let taken = tls.writer().write(buf)?;
        if taken == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        match self.send_records(&mut tls) {
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
        let mut tls = self.tls();
        tls.send_close_notify();
        let _ = self.send_records(&mut tls);
        let _ = socket2::SockRef::from(&self.socket).shutdown(Shutdown::Write);
    }

    fn reset(&self) {
        let _ = socket2::SockRef::from(&self.socket).set_linger(Some(Duration::ZERO));
    }
}
