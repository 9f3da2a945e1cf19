//! `mqvisor broker`: the broker core run natively on the host over tokio.
//!
//! For development, conformance tests and side-by-side benchmarks; the
//! product path is the VM. Owns the sockets and the clock; the core owns
//! everything MQTT. One task drives the core; each client has a reader task
//! (one chunk in flight, so a flooding client is held back by TCP). Output
//! is written straight from the core to the socket; what the socket does not
//! take stays in the core (which then queues or drops per its limits) until
//! a short-lived task sees the socket writable again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mqvisor_broker::broker::{Broker, Config, ConnId, Transmit};

use mqvisor::net::paced::{Read, read_paced, sleep_or_forever};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

/// Bytes per read from a client.
const READ_CHUNK: usize = 64 * 1024;

enum ClientEvent {
    Accepted(TcpStream),
    Data(ConnId, Vec<u8>),
    /// The client sends nothing more (EOF): it is answered, then closed.
    Ended(ConnId),
    /// The client's socket failed: nothing more reaches it.
    Gone(ConnId),
    /// A full socket has room again.
    Writable(ConnId),
}

struct Client {
    /// Dropping it sends FIN.
    writer: Arc<OwnedWriteHalf>,
    /// A task waits for the socket to take more.
    awaiting_room: bool,
    reader: JoinHandle<()>,
    reader_go: Arc<Notify>,
}

/// Serves MQTT on `listener` until the process ends.
pub async fn serve(listener: TcpListener, config: Config) -> std::io::Result<()> {
    let started = Instant::now();
    let now = move || u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let mut broker = Broker::new(config);
    let (events_tx, mut events_rx) = mpsc::unbounded_channel();
    let mut clients: HashMap<ConnId, Client> = HashMap::new();
    let mut next_id: ConnId = 1;
    loop {
        let sleep = broker.next_deadline().map(|at| Duration::from_millis(at.saturating_sub(now())));
        let event = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => ClientEvent::Accepted(stream),
                Err(_) => continue,
            },
            Some(event) = events_rx.recv() => event,
            () = sleep_or_forever(sleep) => {
                broker.tick(now());
                flush(&mut broker, &mut clients, &events_tx, now());
                continue;
            }
        };
        let mut pending = vec![event];
        while let Ok(more) = events_rx.try_recv() {
            pending.push(more);
        }
        for event in pending {
            match event {
                ClientEvent::Accepted(stream) => {
                    let _ = stream.set_nodelay(true);
                    let id = next_id;
                    next_id += 1;
                    let (read_half, write_half) = stream.into_split();
                    let reader_go = Arc::new(Notify::new());
                    let events = events_tx.clone();
                    let reader = tokio::spawn(read_paced(read_half, READ_CHUNK, reader_go.clone(), move |read| {
                        let event = match read {
                            Read::Data(data) => ClientEvent::Data(id, data),
                            Read::Eof => ClientEvent::Ended(id),
                            Read::Failed => ClientEvent::Gone(id),
                        };
                        events.send(event).is_ok()
                    }));
                    let writer = Arc::new(write_half);
                    clients.insert(id, Client { writer, awaiting_room: false, reader, reader_go });
                    broker.open(id, now());
                }
                ClientEvent::Data(id, bytes) => {
                    broker.receive(id, &bytes, now());
                    if let Some(client) = clients.get(&id) {
                        client.reader_go.notify_one();
                    }
                }
                ClientEvent::Ended(id) => {
                    // Its reader has ended; the client stays until the
                    // core asks for the close (its answers go out first).
                    if !broker.input_ended(id, now()) {
                        clients.remove(&id);
                    }
                }
                ClientEvent::Gone(id) => {
                    if let Some(client) = clients.remove(&id) {
                        client.reader.abort();
                    }
                    broker.closed(id, now());
                }
                // The next flush offers the socket its output again.
                ClientEvent::Writable(id) => {
                    if let Some(client) = clients.get_mut(&id) {
                        client.awaiting_room = false;
                    }
                }
            }
        }
        flush(&mut broker, &mut clients, &events_tx, now());
    }
}

/// Writes the core's output to client sockets, and closes what it ended.
fn flush(
    broker: &mut Broker,
    clients: &mut HashMap<ConnId, Client>,
    events: &mpsc::UnboundedSender<ClientEvent>,
    now: u64,
) {
    broker.poll_transmit(now, |id, transmit| {
        let Some(client) = clients.get_mut(&id) else { return 0 };
        match transmit {
            Transmit::Bytes(bytes) => {
                if client.awaiting_room {
                    return 0;
                }
                match client.writer.try_write(bytes) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        client.awaiting_room = true;
                        let (writer, events) = (client.writer.clone(), events.clone());
                        tokio::spawn(async move {
                            let event = match writer.writable().await {
                                Ok(()) => ClientEvent::Writable(id),
                                Err(_) => ClientEvent::Gone(id),
                            };
                            let _ = events.send(event);
                        });
                        0
                    }
                    Err(_) => {
                        let _ = events.send(ClientEvent::Gone(id));
                        0
                    }
                }
            }
            Transmit::Close => {
                // Dropping the write half sends FIN once the socket has
                // everything; the reader ends when the client closes too.
                if let Some(client) = clients.remove(&id) {
                    client.reader.abort();
                }
                0
            }
        }
    });
}

/// Binds `addr` and serves forever on a single-threaded runtime.
pub fn run(addr: std::net::SocketAddr, config: Config) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(addr).await?;
        eprintln!("mqvisor: broker listening on {}", listener.local_addr()?);
        serve(listener, config).await
    })
}
