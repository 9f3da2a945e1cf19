//! A WebSocket client (MQTT over WebSockets, MQTT 5 §6): [`ClientTransport`]
//! over another transport (plain TCP for `ws`, TLS for `wss`), the frames
//! and the upgrade done by the sans-I/O [`WsServer`].
//!
//! Owns: feeding what the inner transport reads to the adapter and handing
//! the MQTT bytes it unframes to the proxy; framing what the proxy writes as
//! one binary frame per call (at most [`MAX_FRAME_OUT`] bytes); and sending
//! the adapter's own bytes (the 101 or the HTTP refusal, pongs, closes).
//! Reads from the inner transport go no further than the room the proxy
//! offers, so the MQTT bytes held here are at most one read. A refused
//! upgrade or a closed WebSocket reads as the client's end (`Ok(0)`), so
//! its last answer (the HTTP error, the close frame) goes out before the
//! FIN rather than being lost to a reset.
//!
//! A client may come with bytes already read from it (its upgrade
//! request, read by `mqvisor serve` to pick the tenant): the adapter takes
//! them first, as if just read; the answer they call for goes out on the
//! first read (the client is read-ready at once).

use std::io;
use std::sync::{Mutex, PoisonError};
use std::task::{Context, Poll};

use super::ClientTransport;
use crate::net::websocket::{WsLimits, WsServer, WsState};

/// Most MQTT bytes framed per write: one frame.
pub const MAX_FRAME_OUT: usize = 16 * 1024;
/// Most bytes read from the inner transport at once.
const READ_CHUNK: usize = 16 * 1024;

/// A WebSocket client (see the module doc).
pub struct WsClient {
    inner: Box<dyn ClientTransport>,
    ws: Mutex<WsServer>,
}

impl WsClient {
    pub fn new(inner: Box<dyn ClientTransport>, limits: WsLimits) -> WsClient {
        WsClient { inner, ws: Mutex::new(WsServer::new(limits)) }
    }

    /// A client over `inner` whose first bytes, `received`, were already
    /// read from it. More than an upgrade request and one read after it is
    /// an error (the client is to be dropped); a refused upgrade is not:
    /// the refusal goes out on the first read, as for any client.
    pub fn with_received(inner: Box<dyn ClientTransport>, limits: WsLimits, received: &[u8]) -> io::Result<WsClient> {
        if received.len() > limits.max_request.saturating_add(READ_CHUNK) {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "more bytes before the upgrade than a request"));
        }
        let client = WsClient::new(inner, limits);
        // An error is in what goes to the client and in the state.
        let _ = client.ws().receive(received);
        Ok(client)
    }

    fn ws(&self) -> std::sync::MutexGuard<'_, WsServer> {
        self.ws.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes what the adapter has for the client, as far as the inner
    /// transport takes it. Ok when all went; `WouldBlock` when some waits.
    fn send_pending(&self, ws: &mut WsServer) -> io::Result<()> {
        while !ws.to_client().is_empty() {
            match self.inner.try_write(ws.to_client()) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => ws.consume_to_client(n),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl ClientTransport for WsClient {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        {
            let ws = self.ws();
            if !ws.to_broker().is_empty() || matches!(ws.state(), WsState::Closed | WsState::Closing) {
                return Poll::Ready(Ok(()));
            }
            if !ws.to_client().is_empty() && self.inner.poll_write_ready(cx).is_ready() {
                // Answers wait and the client takes them: the read sends them.
                return Poll::Ready(Ok(()));
            }
        }
        self.inner.poll_read_ready(cx)
    }

    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner.poll_write_ready(cx)
    }

    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut ws = self.ws();
        let mut chunk = [0u8; READ_CHUNK];
        loop {
            match self.send_pending(&mut ws) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            let ready = ws.to_broker();
            if !ready.is_empty() {
                let n = ready.len().min(buf.len());
                buf[..n].copy_from_slice(&ready[..n]);
                ws.consume_to_broker(n);
                return Ok(n);
            }
            if matches!(ws.state(), WsState::Closed | WsState::Closing) {
                return Ok(0);
            }
            let room = buf.len().clamp(1, READ_CHUNK);
            match self.inner.try_read(&mut chunk[..room]) {
                Ok(0) => {
                    ws.close();
                    return Ok(0);
                }
                // An error is in what goes to the client (the refusal, the
                // close) and in the state: the next turn of the loop ends.
                Ok(n) => {
                    let _ = ws.receive(&chunk[..n]);
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        let mut ws = self.ws();
        // Earlier frames first; nothing is taken while they wait.
        self.send_pending(&mut ws)?;
        if buf.is_empty() {
            return Ok(0);
        }
        let n = buf.len().min(MAX_FRAME_OUT);
        ws.send(&buf[..n]).map_err(|e| io::Error::new(io::ErrorKind::BrokenPipe, e))?;
        match self.send_pending(&mut ws) {
            // Taken and framed: the rest goes on the next call or read.
            Ok(()) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(n),
            Err(e) => Err(e),
        }
    }

    fn bytes_acked(&self) -> u64 {
        self.inner.bytes_acked()
    }

    fn shutdown_write(&self) {
        let mut ws = self.ws();
        ws.close();
        let _ = self.send_pending(&mut ws);
        self.inner.shutdown_write();
    }

    fn reset(&self) {
        self.inner.reset();
    }
}
