//! `mqvisor broker`: the broker core run natively on the host over tokio.
//!
//! For development, conformance tests and side-by-side benchmarks; the
//! product path is the VM. Owns the sockets and the clock; the core owns
//! everything MQTT. One task drives the core; each client has a reader task
//! (one chunk in flight, so a flooding client is held back by TCP) and a
//! writer task (a bounded channel, so a slow reader leaves output in the
//! core, which then queues or drops per its limits).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mqvisor_broker::broker::{Broker, Config, ConnId, Transmit};

use mqvisor::net::paced::{Read, read_paced, sleep_or_forever};
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
    Drained,
}

struct Client {
    to_socket: mpsc::Sender<Vec<u8>>,
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
                flush(&mut broker, &mut clients, now());
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
                    clients.insert(id, Client { to_socket, reader, reader_go });
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
                    broker.closed(id, now());
                }
                // The next flush offers the writer its output again.
                ClientEvent::Drained => {}
            }
        }
        flush(&mut broker, &mut clients, now());
    }
}

/// Moves the core's output into writer channels, and closes what it ended.
fn flush(broker: &mut Broker, clients: &mut HashMap<ConnId, Client>, now: u64) {
    broker.poll_transmit(now, |id, transmit| {
        let Some(client) = clients.get_mut(&id) else { return 0 };
        match transmit {
            Transmit::Bytes(bytes) => {
                // A full writer takes nothing; it reports Drained when it has room.
                let Ok(permit) = client.to_socket.try_reserve() else { return 0 };
                permit.send(bytes.to_vec());
                bytes.len()
            }
            Transmit::Close => {
                // Dropping the channel makes the writer flush and send FIN;
                // the reader ends when the client closes too.
                if let Some(client) = clients.remove(&id) {
                    client.reader.abort();
                }
                0
            }
        }
    });
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
        let _ = events.send(ClientEvent::Drained);
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
