//! Reading host TCP clients at the pace their consumer sets, for tokio loops
//! (the network proxy here, and the `mqvisor broker` runner).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
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
/// connection, so a client that floods is held back by TCP itself. Ends after
/// EOF or an error, or when `deliver` returns false.
pub async fn read_paced(
    mut stream: OwnedReadHalf,
    chunk: usize,
    go: Arc<Notify>,
    mut deliver: impl FnMut(Read) -> bool,
) {
    loop {
        let mut buf = vec![0u8; chunk];
        let read = match stream.read(&mut buf).await {
            Ok(0) => Read::Eof,
            Ok(n) => {
                buf.truncate(n);
                Read::Data(buf)
            }
            Err(_) => Read::Failed,
        };
        let more = matches!(read, Read::Data(_));
        if !deliver(read) || !more {
            return;
        }
        go.notified().await;
    }
}
