//! The net thread: accepts tenant TCP connections on the host and carries each
//! one into the guest over the virtual link.
//!
//! Owns the host-side smoltcp interface, one smoltcp socket per accepted
//! client, and the loop that moves frames between smoltcp and the virtio-net
//! device. Backpressure both ways, every buffer bounded:
//! - client to guest: a client's reader task holds at most one chunk in
//!   flight and reads the next only once the chunk is in the smoltcp socket;
//! - guest to client: data leaves a smoltcp socket only when the client's
//!   writer channel has room, otherwise the guest's window closes.
//!
//! FIN and RST propagate both ways. When the VM stops, every client sees a
//! clean close. This thread never touches the vCPU; it wakes a parked guest
//! through the wake eventfd after giving it frames.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as NetInstant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, Ipv4Address};
use tokio::io::AsyncWriteExt;
use tokio::io::unix::AsyncFd;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;
use vmm_sys_util::eventfd::EventFd;

use super::link::FrameLink;
use super::paced::{Read, read_paced, sleep_or_forever};
use super::{GUEST_IP, HOST_IP, HOST_MAC, MAX_FRAME, PREFIX_LEN};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::{NetDevice, NetEventHandler};

/// Bytes a client reader moves per chunk, and per writer message.
const CHUNK: usize = 64 * 1024;
/// Size of each smoltcp socket buffer on the host side.
const SOCKET_BUFFER: usize = 256 * 1024;
/// Chunks waiting for a slow client, at most, before the guest is held back.
const WRITER_QUEUE: usize = 4;
/// Most client connections carried at once; more are refused (closed).
pub const MAX_CONNECTIONS: usize = 4096;
/// Handshakes in flight towards the guest at once. smoltcp has no listen
/// backlog, so the guest keeps this many listening sockets
/// (`mqvisor_boot_abi::LISTEN_BACKLOG`); more SYNs at once would meet RSTs.
const MAX_HANDSHAKES: usize = mqvisor_boot_abi::LISTEN_BACKLOG;
/// Ephemeral ports for the host side of carried connections.
const LOCAL_PORTS: std::ops::Range<u16> = 1024..u16::MAX;

/// Everything the net thread needs from the VM.
pub struct ProxyConfig {
    pub transport: Arc<Mutex<MmioTransport<NetDevice>>>,
    /// Written after frames are handed to the guest, to end a WAIT.
    pub wake_guest: Arc<EventFd>,
    /// Bound before boot, so a busy port is reported before anything starts.
    pub listener: std::net::TcpListener,
    /// The guest port to carry connections to.
    pub guest_port: u16,
}

/// Stops the net thread (closing every client cleanly) and waits for it.
pub struct NetThread {
    stop: Option<oneshot::Sender<()>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl NetThread {
    /// Closes all client connections and ends the thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

impl Drop for NetThread {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Starts the net thread.
pub fn spawn(config: ProxyConfig) -> std::io::Result<NetThread> {
    let (stop_tx, stop_rx) = oneshot::channel();
    config.listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let handle = std::thread::Builder::new().name("net".into()).spawn(move || {
        runtime.block_on(async move {
            match Proxy::new(config) {
                Ok(proxy) => proxy.run(stop_rx).await,
                Err(e) => eprintln!("mqvisor: network disabled: {e}"),
            }
        });
    })?;
    Ok(NetThread { stop: Some(stop_tx), handle: Some(handle) })
}

type ConnId = u64;

/// What a client's tasks tell the net loop.
enum ClientEvent {
    Accepted(TcpStream),
    Data(ConnId, Vec<u8>),
    /// The client closed its sending side (FIN).
    Eof(ConnId),
    /// The client connection failed (reset or I/O error).
    Failed(ConnId),
    /// A writer finished a chunk: there is room for more guest data.
    Drained,
}

/// What the net loop tells a client's writer task.
enum ToClient {
    Data(Vec<u8>),
    /// The guest reset the connection: reset the client too.
    Reset,
}

struct Conn {
    socket: SocketHandle,
    local_port: u16,
    /// `None` once the guest's FIN has been passed on (the writer then
    /// shuts down the client's receiving side).
    to_client: Option<mpsc::Sender<ToClient>>,
    /// Client bytes not yet accepted by the smoltcp socket.
    pending_in: Option<(Vec<u8>, usize)>,
    /// Lets the reader task read its next chunk.
    reader_go: Arc<Notify>,
    reader: JoinHandle<()>,
    client_eof: bool,
    fin_sent_to_guest: bool,
    guest_fin_seen: bool,
    was_established: bool,
}

struct Proxy {
    device: NetEventHandler,
    listener: TcpListener,
    guest_port: u16,
    rx_event: AsyncFd<EventFd>,
    tx_event: AsyncFd<EventFd>,
    iface: Interface,
    link: FrameLink,
    sockets: SocketSet<'static>,
    conns: HashMap<ConnId, Conn>,
    /// Clients accepted but not yet carried: the guest's device is not up
    /// yet, or enough handshakes are already in flight.
    waiting: VecDeque<TcpStream>,
    /// Whether the device was active at the last visit (clients wait until it is).
    device_active: bool,
    ports_in_use: HashSet<u16>,
    next_port: u16,
    next_id: ConnId,
    events_tx: mpsc::UnboundedSender<ClientEvent>,
    events_rx: mpsc::UnboundedReceiver<ClientEvent>,
    started: std::time::Instant,
}

impl Proxy {
    fn new(config: ProxyConfig) -> std::io::Result<Proxy> {
        let device = NetEventHandler::new(config.transport, config.wake_guest);
        let (rx_event, tx_event) = device.queue_events()?;
        let mut link = FrameLink::new(MAX_FRAME);
        let started = std::time::Instant::now();
        let iface_config = Config::new(HardwareAddress::Ethernet(EthernetAddress(HOST_MAC)));
        let mut iface = Interface::new(iface_config, &mut link, NetInstant::ZERO);
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(Ipv4Address::from_octets(HOST_IP)), PREFIX_LEN));
        });
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        Ok(Proxy {
            device,
            listener: TcpListener::from_std(config.listener)?,
            guest_port: config.guest_port,
            rx_event: watch(rx_event)?,
            tx_event: watch(tx_event)?,
            iface,
            link,
            sockets: SocketSet::new(Vec::new()),
            conns: HashMap::new(),
            waiting: VecDeque::new(),
            device_active: false,
            ports_in_use: HashSet::new(),
            next_port: LOCAL_PORTS.start,
            next_id: 0,
            events_tx,
            events_rx,
            started,
        })
    }

    fn now(&self) -> NetInstant {
        NetInstant::from_micros(i64::try_from(self.started.elapsed().as_micros()).unwrap_or(i64::MAX))
    }

    async fn run(mut self, mut stop: oneshot::Receiver<()>) {
        loop {
            self.pump();
            let delay =
                self.iface.poll_delay(self.now(), &self.sockets).map(|d| Duration::from_micros(d.total_micros()));
            tokio::select! {
                _ = &mut stop => break,
                accepted = self.listener.accept() => {
                    if let Ok((stream, _)) = accepted {
                        self.on_event(ClientEvent::Accepted(stream));
                    }
                }
                Some(event) = self.events_rx.recv() => {
                    self.on_event(event);
                    while let Ok(event) = self.events_rx.try_recv() {
                        self.on_event(event);
                    }
                }
                ready = self.tx_event.readable() => {
                    if let Ok(mut guard) = ready {
                        let count = guard.get_inner().read().unwrap_or(0);
                        guard.clear_ready();
                        self.device.add_notifications(count);
                    }
                }
                ready = self.rx_event.readable() => {
                    if let Ok(mut guard) = ready {
                        let count = guard.get_inner().read().unwrap_or(0);
                        guard.clear_ready();
                        self.device.add_notifications(count);
                    }
                }
                () = sleep_or_forever(delay) => {}
            }
        }
        self.close_all();
    }

    fn on_event(&mut self, event: ClientEvent) {
        match event {
            ClientEvent::Accepted(stream) => {
                // Past the limit the stream is dropped: the client sees a close.
                if self.conns.len() + self.waiting.len() < MAX_CONNECTIONS {
                    self.waiting.push_back(stream);
                }
            }
            ClientEvent::Data(id, data) => {
                if let Some(conn) = self.conns.get_mut(&id) {
                    conn.pending_in = Some((data, 0));
                }
            }
            ClientEvent::Eof(id) => {
                if let Some(conn) = self.conns.get_mut(&id) {
                    conn.client_eof = true;
                }
            }
            ClientEvent::Failed(id) => {
                if let Some(conn) = self.conns.get_mut(&id) {
                    self.sockets.get_mut::<tcp::Socket>(conn.socket).abort();
                    conn.to_client = None;
                    conn.client_eof = true;
                    conn.pending_in = None;
                }
            }
            // Nothing to record: the next pump sees the writer's free room.
            ClientEvent::Drained => {}
        }
    }

    fn allocate_port(&mut self) -> Option<u16> {
        let span = usize::from(LOCAL_PORTS.end - LOCAL_PORTS.start);
        for _ in 0..span {
            let port = self.next_port;
            self.next_port = if port + 1 == LOCAL_PORTS.end { LOCAL_PORTS.start } else { port + 1 };
            if !self.ports_in_use.contains(&port) {
                return Some(port);
            }
        }
        None
    }

    /// Starts carrying waiting clients while the guest can take handshakes.
    fn start_waiting(&mut self) -> bool {
        if !self.device_active {
            return false;
        }
        let mut handshakes = self
            .conns
            .values()
            .filter(|c| self.sockets.get::<tcp::Socket>(c.socket).state() == tcp::State::SynSent)
            .count();
        let mut started = false;
        while handshakes < MAX_HANDSHAKES {
            let Some(stream) = self.waiting.pop_front() else { break };
            self.open(stream);
            handshakes += 1;
            started = true;
        }
        started
    }

    fn open(&mut self, stream: TcpStream) {
        let Some(local_port) = self.allocate_port() else { return };
        let _ = stream.set_nodelay(true);
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; SOCKET_BUFFER]),
            tcp::SocketBuffer::new(vec![0; SOCKET_BUFFER]),
        );
        socket.set_nagle_enabled(false);
        let remote = (IpAddress::Ipv4(Ipv4Address::from_octets(GUEST_IP)), self.guest_port);
        if socket.connect(self.iface.context(), remote, local_port).is_err() {
            return;
        }
        let handle = self.sockets.add(socket);
        self.ports_in_use.insert(local_port);

        let id = self.next_id;
        self.next_id += 1;
        let (read_half, write_half) = stream.into_split();
        let reader_go = Arc::new(Notify::new());
        let events = self.events_tx.clone();
        let reader = tokio::spawn(read_paced(read_half, CHUNK, reader_go.clone(), move |read| {
            let event = match read {
                Read::Data(data) => ClientEvent::Data(id, data),
                Read::Eof => ClientEvent::Eof(id),
                Read::Failed => ClientEvent::Failed(id),
            };
            events.send(event).is_ok()
        }));
        let (to_client, from_net) = mpsc::channel(WRITER_QUEUE);
        tokio::spawn(write_client(id, write_half, from_net, self.events_tx.clone()));
        self.conns.insert(
            id,
            Conn {
                socket: handle,
                local_port,
                to_client: Some(to_client),
                pending_in: None,
                reader_go,
                reader,
                client_eof: false,
                fin_sent_to_guest: false,
                guest_fin_seen: false,
                was_established: false,
            },
        );
    }

    /// Does all the work there is, until nothing moves.
    fn pump(&mut self) {
        loop {
            let visit = self.device.process(&mut self.link);
            self.device_active = visit.active;
            if visit.reset {
                // A reset guest has lost its TCP state: the carried
                // connections are gone (the link dropped the frames in flight).
                self.reset_all();
            }
            let mut progress = visit.moved;
            progress |= self.start_waiting();
            let sent_before = self.link.sent_to_guest;
            let now = self.now();
            self.iface.poll(now, &mut self.link, &mut self.sockets);
            progress |= self.move_data();
            let now = self.now();
            self.iface.poll(now, &mut self.link, &mut self.sockets);
            // New frames for the guest: the next visit hands them over.
            progress |= self.link.sent_to_guest != sent_before;
            if !progress {
                break;
            }
        }
    }

    /// Moves bytes between client connections and smoltcp sockets; propagates
    /// FIN and RST; forgets finished connections. True if anything moved.
    fn move_data(&mut self) -> bool {
        let mut progress = false;
        let mut finished = Vec::new();
        for (&id, conn) in self.conns.iter_mut() {
            let socket = self.sockets.get_mut::<tcp::Socket>(conn.socket);
            conn.was_established |= socket.state() == tcp::State::Established;

            // Client -> guest.
            if let Some((data, offset)) = conn.pending_in.as_mut() {
                if socket.can_send() {
                    let sent = socket.send_slice(&data[*offset..]).unwrap_or(0);
                    *offset += sent;
                    progress |= sent > 0;
                }
                if *offset >= data.len() {
                    conn.pending_in = None;
                    conn.reader_go.notify_one();
                }
            }
            if conn.client_eof && conn.pending_in.is_none() && !conn.fin_sent_to_guest && socket.may_send() {
                socket.close();
                conn.fin_sent_to_guest = true;
                progress = true;
            }

            // Guest -> client.
            if let Some(to_client) = &conn.to_client {
                while socket.can_recv() {
                    let Ok(permit) = to_client.try_reserve() else { break };
                    let mut chunk = vec![0u8; CHUNK.min(socket.recv_queue())];
                    let n = socket.recv_slice(&mut chunk).unwrap_or(0);
                    chunk.truncate(n);
                    permit.send(ToClient::Data(chunk));
                    progress = true;
                }
                if conn.was_established
                    && !socket.may_recv()
                    && socket.recv_queue() == 0
                    && socket.state() != tcp::State::Closed
                {
                    // The guest sent FIN: pass it on once queued data is out.
                    conn.guest_fin_seen = true;
                    conn.to_client = None;
                    progress = true;
                }
            }

            if socket.state() == tcp::State::Closed {
                if let Some(to_client) = conn.to_client.take() {
                    // Closed without a FIN from the guest: it reset the
                    // connection (or never accepted it).
                    if !conn.guest_fin_seen {
                        let _ = to_client.try_send(ToClient::Reset);
                    }
                }
                if conn.client_eof || !conn.guest_fin_seen {
                    finished.push(id);
                }
            }
        }
        for id in finished {
            self.forget(id);
        }
        progress
    }

    fn forget(&mut self, id: ConnId) {
        if let Some(conn) = self.conns.remove(&id) {
            conn.reader.abort();
            self.sockets.remove(conn.socket);
            self.ports_in_use.remove(&conn.local_port);
        }
    }

    /// The guest lost all connections (device reset): reset every client.
    fn reset_all(&mut self) {
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            if let Some(to_client) = self.conns.get_mut(&id).and_then(|conn| conn.to_client.take()) {
                let _ = to_client.try_send(ToClient::Reset);
            }
            self.forget(id);
        }
    }

    /// The VM is stopping: close every client connection cleanly (FIN).
    fn close_all(&mut self) {
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            // Dropping the writer channel makes the writer flush and shut down.
            self.forget(id);
        }
    }
}

/// Registers an owned eventfd with the runtime's reactor.
fn watch(event: EventFd) -> std::io::Result<AsyncFd<EventFd>> {
    // SAFETY: `EventFd` owns its descriptor, keeps it open until dropped and
    // always returns the same one from `as_raw_fd`; the AsyncFd owns it.
    unsafe { AsyncFd::register(event) }.map_err(std::io::Error::from)
}

async fn write_client(
    id: ConnId,
    mut stream: OwnedWriteHalf,
    mut from_net: mpsc::Receiver<ToClient>,
    events: mpsc::UnboundedSender<ClientEvent>,
) {
    while let Some(message) = from_net.recv().await {
        match message {
            ToClient::Data(chunk) => {
                if stream.write_all(&chunk).await.is_err() {
                    let _ = events.send(ClientEvent::Failed(id));
                    return;
                }
                let _ = events.send(ClientEvent::Drained);
            }
            ToClient::Reset => {
                // SO_LINGER 0 turns the close into an RST. Tokio deprecates
                // linger because a non-zero one blocks on close; zero never does.
                #[allow(deprecated)]
                let _ = stream.as_ref().set_linger(Some(Duration::ZERO));
                // No FIN first: the socket closes (with RST) when the read
                // half, which the net loop aborts, is dropped too.
                stream.forget();
                return;
            }
        }
    }
    let _ = stream.shutdown().await;
}
