//! Reading host TCP clients at the pace their consumer sets, for tokio loops
//! (the `mqvisor broker` runner), and the socket settings every client
//! socket of the host gets (the proxy's too).

use std::sync::Arc;
use std::time::Duration;

use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::Notify;

/// Sleeps for `delay`, or forever without one (a branch of `select!` that
/// only a deadline should wake).
pub async fn sleep_or_forever(delay: Option<Duration>) {
    match delay {
        Some(delay) => tokio::time::sleep(delay).await,
        None => std::future::pending().await,
    }
}

/// What a paced reader saw.
pub enum Read {
    Data(Vec<u8>),
    /// The peer closed its sending side.
    Eof,
    /// The connection failed (reset or I/O error).
    Failed,
}

/// Reads `stream` in chunks of at most `chunk` bytes and hands each to
/// `deliver`, then waits for `go` before reading on: one chunk in flight per
/// connection, so a client that floods is held back by TCP itself. A buffer
/// exists only while bytes wait, so an idle connection holds none. Ends
/// after EOF or an error, or when `deliver` returns false.
pub async fn read_paced(stream: OwnedReadHalf, chunk: usize, go: Arc<Notify>, mut deliver: impl FnMut(Read) -> bool) {
    loop {
        if stream.readable().await.is_err() {
            deliver(Read::Failed);
            return;
        }
        // Capacity, not zeroed bytes: the read fills what it needs.
        let mut buf = Vec::with_capacity(chunk);
        let read = match stream.try_read_buf(&mut buf) {
            Ok(0) => Read::Eof,
            Ok(_) => {
                quick_ack(stream.as_ref());
                Read::Data(buf)
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => Read::Failed,
        };
        let more = matches!(read, Read::Data(_));
        if !deliver(read) || !more {
            return;
        }
        go.notified().await;
    }
}

/// Asks the kernel to ACK what it just received from `stream` at once.
///
/// Linux delays the ACK of received bytes, hoping to carry it on a reply.
/// When the broker has no reply to a client's packet (a PUBACK the client
/// sent), a client with Nagle's algorithm on holds its next small packet
/// back until that ACK: ~40 ms per request/response round trip. The flag
/// lasts until the kernel's next change of mode, so it is set after every read.
pub fn quick_ack(stream: &impl std::os::fd::AsFd) {
    let _ = socket2::SockRef::from(stream).set_tcp_quickack(true);
}
