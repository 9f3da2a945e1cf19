//! `mqvisor broker`: the broker core run natively on the host over tokio.
//!
//! For development, conformance tests and side-by-side benchmarks; the
//! product path is the VM. Owns the sockets and the clock; the core owns
//! everything MQTT. One task drives the core; each client has a reader task
//! (one chunk in flight, so a flooding client is held back by TCP) and a
//! writer task (a bounded channel, so a slow reader leaves output in the
//! core, which then queues or drops per its limits).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mqvisor_broker::broker::{Broker, Config, ConnId, Event};

use crate::runtime::{Read, read_paced, sleep_or_forever};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

/// Bytes per read from a client.
const READ_CHUNK: usize = 64 * 1024;
/// Output chunks queued towards one client's socket.
const WRITER_QUEUE: usize = 8;

enum ClientEvent {
    Accepted(TcpStream),
    Data(ConnId, Vec<u8>),
    /// The client's side is gone (EOF or error).
    Gone(ConnId),
    /// A writer has room again.
    Drained(ConnId),
}

struct Client {
    to_socket: Option<mpsc::Sender<Vec<u8>>>,
    reader: JoinHandle<()>,
    reader_go: Arc<Notify>,
    closing: bool,
}

/// Serves MQTT on `listener` until the process ends.
pub async fn serve(listener: TcpListener, config: Config) -> std::io::Result<()> {
    let started = Instant::now();
    let now = move || u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let mut broker = Broker::new(config);
    let (events_tx, mut events_rx) = mpsc::unbounded_channel();
    let mut clients: HashMap<ConnId, Client> = HashMap::new();
    let mut next_id: ConnId = 1;
    let mut waiting_output: HashSet<ConnId> = HashSet::new();
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
                flush(&mut broker, &mut clients, &mut waiting_output, now());
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
                            Read::Eof | Read::Failed => ClientEvent::Gone(id),
                        };
                        events.send(event).is_ok()
                    }));
                    let (to_socket, from_core) = mpsc::channel(WRITER_QUEUE);
                    tokio::spawn(write_client(id, write_half, from_core, events_tx.clone()));
                    clients.insert(id, Client { to_socket: Some(to_socket), reader, reader_go, closing: false });
                    broker.open(id, now());
                }
                ClientEvent::Data(id, bytes) => {
                    broker.receive(id, &bytes, now());
                    if let Some(client) = clients.get(&id) {
                        client.reader_go.notify_one();
                    }
                }
                ClientEvent::Gone(id) => {
                    if let Some(client) = clients.remove(&id) {
                        client.reader.abort();
                    }
                    waiting_output.remove(&id);
                    broker.closed(id, now());
                }
                ClientEvent::Drained(id) => {
                    waiting_output.insert(id);
                }
            }
        }
        flush(&mut broker, &mut clients, &mut waiting_output, now());
    }
}

/// Moves the core's output into writer channels and carries out its events.
fn flush(broker: &mut Broker, clients: &mut HashMap<ConnId, Client>, waiting: &mut HashSet<ConnId>, now: u64) {
    while let Some(Event::Close(id)) = broker.poll_event() {
        if let Some(client) = clients.get_mut(&id) {
            client.closing = true;
        }
        waiting.insert(id);
    }
    waiting.extend(broker.take_dirty());
    let ids: Vec<ConnId> = waiting.drain().collect();
    for id in ids {
        let Some(client) = clients.get_mut(&id) else { continue };
        while !broker.output(id).is_empty() {
            let Some(permit) = client.to_socket.as_ref().and_then(|tx| tx.try_reserve().ok()) else {
                // The writer is full: it reports Drained when it has room.
                break;
            };
            let chunk = broker.output(id).to_vec();
            let sent = chunk.len();
            permit.send(chunk);
            broker.consume_output(id, sent, now);
        }
        waiting.extend(broker.take_dirty());
        waiting.remove(&id);
        if client.closing && broker.output(id).is_empty() {
            // Dropping the channel makes the writer flush and send FIN; the
            // reader ends when the client closes too.
            client.to_socket = None;
            client.reader.abort();
            clients.remove(&id);
            broker.closed(id, now);
        }
    }
}

async fn write_client(
    id: ConnId,
    mut stream: OwnedWriteHalf,
    mut from_core: mpsc::Receiver<Vec<u8>>,
    events: mpsc::UnboundedSender<ClientEvent>,
) {
    while let Some(chunk) = from_core.recv().await {
        if stream.write_all(&chunk).await.is_err() {
            let _ = events.send(ClientEvent::Gone(id));
            return;
        }
        let _ = events.send(ClientEvent::Drained(id));
    }
    let _ = stream.shutdown().await;
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
