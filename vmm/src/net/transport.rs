//! The client-transport seam: how the proxy reads and writes one client.
//!
//! The proxy moves bytes between a client and its stream in the guest; it
//! never touches a socket itself. Everything it does to a client goes
//! through [`ClientTransport`]: plain TCP ([`TcpClient`]), TLS
//! ([`tls::TlsClient`]) or WebSockets over either ([`ws::WsClient`], which
//! unframes in `try_read` and frames in `try_write`): other
//! implementations of the trait, not other paths through the proxy.
//!
//! # The contract
//!
//! All calls come from the net thread; none may block.
//!
//! - **Readiness.** `poll_read_ready` and `poll_write_ready` work as
//!   tokio's do: `Ready` once a `try_read` (`try_write`) may make progress,
//!   an error or the peer's close included; `Pending` registers the waker
//!   of the one task that watches this client. A wake-up may be spurious
//!   (the proxy then gets `WouldBlock` and waits again), but a transport
//!   must never say `Pending` while it holds bytes `try_read` could return
//!   (a TLS transport with decrypted bytes buffered is read-ready).
//! - **Reads.** `try_read` fills a prefix of `buf` with the client's next
//!   bytes, in order: `Ok(n)` with `n > 0`; `Ok(0)` when the client has
//!   finished sending (a half-close: it may still be reading, and is
//!   answered); `Err(WouldBlock)` when nothing is there now; any other
//!   error when the client failed. `buf` is the room the stream's window
//!   allows, so a transport never holds a client's bytes the guest has not
//!   made room for; one that must read ahead (a TLS record) bounds that.
//! - **Partial writes.** `try_write` takes a prefix of `buf` and returns its
//!   length; the proxy keeps the rest and offers it again after write
//!   readiness. `Err(WouldBlock)` takes nothing; `Ok(0)` for a non-empty
//!   `buf`, or any other error, means the client failed. Bytes taken are
//!   the transport's to deliver: the guest is credited for them, so what
//!   a transport buffers itself must stay small (about one record).
//! - **Progress.** `bytes_acked` grows as the client takes what was written
//!   (the TCP acknowledgements, whatever rides on them); the proxy only
//!   compares it with itself, to tell a slow client from one that has
//!   stopped reading. 0 where unknown: such a client gets one linger.
//! - **Half-close.** `shutdown_write` ends the sending side once the last
//!   byte was taken (TCP: FIN; TLS: close_notify, then FIN).
//! - **Shutdown.** `reset` makes the coming close abortive (TCP: RST), for a
//!   client dropped by a limit. Dropping the last reference closes the
//!   client: with a FIN unless it was reset.

use std::io;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;

use super::paced::quick_ack;

pub mod tls;
pub mod ws;

#[cfg(test)]
mod tests;

/// A client connection as the proxy sees it (see the module doc for the
/// contract). `Send + Sync` because the task that waits for its readiness
/// holds it too; an implementation keeps what it changes on reads and
/// writes behind a lock, which is never contended (one thread).
pub trait ClientTransport: Send + Sync {
    /// `Ready` once a read may make progress.
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// `Ready` once a write may make progress.
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Reads the client's next bytes into `buf`; `Ok(0)`: it finished sending.
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes a prefix of `buf`; returns its length.
    fn try_write(&self, buf: &[u8]) -> io::Result<usize>;
    /// Bytes the client has taken so far, as far as the transport knows.
    fn bytes_acked(&self) -> u64;
    /// Ends the sending side, after the last byte.
    fn shutdown_write(&self);
    /// Makes the close abortive.
    fn reset(&self);
}

/// A plain TCP client.
pub struct TcpClient(TcpStream);

impl TcpClient {
    /// Wraps `stream`, with Nagle's algorithm off (a PUBACK leaves at once).
    pub fn new(stream: TcpStream) -> TcpClient {
        let _ = stream.set_nodelay(true);
        TcpClient(stream)
    }
}

impl ClientTransport for TcpClient {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.poll_read_ready(cx)
    }

    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.poll_write_ready(cx)
    }

    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut n = 0;
        let read = self.0.try_io(Interest::READABLE, || {
            n = io::Read::read(&mut &*socket2::SockRef::from(&self.0), buf)?;
            // A read shorter than `buf` emptied the socket, and epoll says
            // when more comes (as tokio's own `poll_read` takes it): clearing
            // the readiness now spares the read that would only learn
            // `WouldBlock`, one syscall per wake-up of every client.
            if n > 0 && n < buf.len() { Err(io::ErrorKind::WouldBlock.into()) } else { Ok(()) }
        });
        match read {
            Err(e) if n == 0 => Err(e),
            _ => {
                if n > 0 {
                    quick_ack(&self.0);
                }
                Ok(n)
            }
        }
    }

    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn bytes_acked(&self) -> u64 {
        bytes_acked(&self.0)
    }

    fn shutdown_write(&self) {
        let _ = socket2::SockRef::from(&self.0).shutdown(Shutdown::Write);
    }

    fn reset(&self) {
        // SO_LINGER 0 turns the close into an RST; a zero linger never blocks.
        let _ = socket2::SockRef::from(&self.0).set_linger(Some(Duration::ZERO));
    }
}

/// Bytes of the guest's output the client's TCP has acknowledged
/// (`tcpi_bytes_acked`): once its receive buffer is full, these grow only
/// as the client reads. 0 where the kernel does not say (before 4.1).
fn bytes_acked(socket: &TcpStream) -> u64 {
    // `struct tcp_info` (linux/tcp.h) up to `tcpi_bytes_acked`, at 120.
    const ACKED_AT: usize = 120;
    let mut info = [0u8; ACKED_AT + 8];
    let Ok(mut len) = libc::socklen_t::try_from(info.len()) else { return 0 };
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which is
    // that long, and sets `len` to the number it wrote.
    let rc = unsafe {
        libc::getsockopt(socket.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, info.as_mut_ptr().cast(), &raw mut len)
    };
    if rc != 0 || usize::try_from(len).unwrap_or(0) < info.len() {
        return 0;
    }
    let mut acked = [0u8; 8];
    acked.copy_from_slice(&info[ACKED_AT..]);
    u64::from_ne_bytes(acked)
}
