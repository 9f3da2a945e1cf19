//! The net thread: accepts tenant TCP connections on the host and carries
//! each one into the guest as a stream over the virtual link
//! (`mqvisor_boot_abi::streams`).
//!
//! Owns the client sockets, the records in and out of frames, and every
//! host-side buffer of a stream, each bounded:
//! - client to guest: bytes are read from the socket straight into the frame
//!   being built, only within the stream's window and while the link has room
//!   for frames, so a flooding client is held back by TCP itself;
//! - guest to client: bytes go straight to the socket; what it does not take
//!   waits in the stream's buffer (at most one window, freed when written);
//!   past [`OUT_BUDGET`] for all streams together, the client furthest behind
//!   is reset (holding the guest back instead would let a few clients that
//!   never read stop every other client of the tenant).
//!
//! An idle stream costs its socket, a small struct and one parked task.
//! FIN propagates both ways as `Close` records; a client reset ends the
//! stream. When the VM stops, every client sees a clean close. This thread
//! never touches the vCPU; the device handler wakes a parked guest after
//! giving it frames. Nothing a guest writes is trusted: records are checked,
//! and what breaks the protocol is counted in [`LinkCounters`].

use std::collections::{HashMap, VecDeque};
use std::io::ErrorKind;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mqvisor_boot_abi::streams::{self, FrameWriter, Record, ServiceStats, StreamId, WINDOW};
use tokio::io::unix::AsyncFd;
use tokio::io::{Interest, Ready};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::link::FrameLink;
use super::paced::{quick_ack, sleep_or_forever};
use super::{GUEST_MAC, HOST_MAC, MAX_FRAME};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::{NetDevice, NetEventHandler};
use crate::devices::virtio::storm::NotifyStorm;

/// Guest bytes waiting for slow clients, all streams together, before the
/// guest's frames are left in its TX queue.
const OUT_BUDGET: usize = 32 << 20;

/// [`OUT_BUDGET`], unless `MQVISOR_OUT_BUDGET_KIB` says otherwise: the
/// tests shed slow clients under a small budget, which 32 MiB of them
/// would take too long to fill.
fn out_budget() -> usize {
    std::env::var("MQVISOR_OUT_BUDGET_KIB")
        .ok()
        .and_then(|kib| kib.parse::<usize>().ok())
        .map_or(OUT_BUDGET, |kib| kib.saturating_mul(1024))
}
/// How long a stream the guest closed may wait for its client to take
/// more of the last bytes before the client is dropped; likewise a client
/// that has finished sending (FIN), for the guest's answers. A client that
/// took some meanwhile (its TCP acknowledged more) waits again.
const CLOSE_LINGER: Duration = Duration::from_secs(5);
/// A stream's window in bytes.
const WINDOW_BYTES: usize = WINDOW as usize;

/// Everything the net thread needs from the VM.
pub struct ProxyConfig {
    pub transport: Arc<Mutex<MmioTransport<NetDevice>>>,
    /// Written after frames are handed to the guest, to end a WAIT.
    pub wake_guest: Arc<EventFd>,
    /// Where clients come from.
    pub ingress: Ingress,
    /// Most client connections carried at once; more are reset.
    pub max_connections: usize,
    /// Where the link's counters go.
    pub counters: Arc<LinkCounters>,
    /// The vCPU's exits, counted as they happen (for the load report).
    pub vm_exits: Arc<AtomicU64>,
    /// Where the proxy says why the VM must stop (see `vcpu::VcpuContext`).
    pub stop_reason: crate::devices::GiveUp,
}

/// Where a VM's clients come from.
pub enum Ingress {
    /// Accepted here. Bound before boot, so a busy port is reported before
    /// anything starts.
    Listen(std::net::TcpListener),
    /// Accepted by `mqvisor serve` and handed over on this socket, each as
    /// one datagram carrying the client's socket (SCM_RIGHTS) and the bytes
    /// the daemon already read from it (its CONNECT, possibly rewritten).
    Handoff(std::os::unix::net::UnixDatagram),
}

/// Largest datagram of bytes handed over with a client.
pub const MAX_HANDOFF_BYTES: usize = 256 * 1024;

/// What the link counted: what the guest did wrong (a hostile or broken
/// guest costs itself its streams, never the host anything more), and the
/// clients shed to keep the VMM's buffers bounded.
#[derive(Debug, Default)]
pub struct LinkCounters {
    /// Frames that were not stream frames or held a malformed record.
    pub bad_frames: AtomicU64,
    /// Records the guest may not send (`Open`), or `Data` beyond the window.
    pub bad_records: AtomicU64,
    /// Clients reset because the guest's bytes waiting for slow clients
    /// passed the VMM's budget.
    pub shed_clients: AtomicU64,
    /// Clients the guest had not answered yet (no CONNACK), reset at the
    /// connection limit to make room for a new one.
    pub silent_clients_dropped: AtomicU64,
    /// Bytes read from clients and written to them.
    pub client_bytes_in: AtomicU64,
    pub client_bytes_out: AtomicU64,
    /// The guest service's last report of its counters.
    pub service: Mutex<ServiceStats>,
}

/// How often a VM fed by `mqvisor serve` reports its load back on the
/// handoff socket.
pub const REPORT_EVERY: Duration = Duration::from_secs(1);

/// What a VM fed by `mqvisor serve` reports on the handoff socket: clients
/// connected, bytes from and to clients, as three u64 LE.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LoadReport {
    pub clients: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// What the guest's broker last reported counting.
    pub service: ServiceStats,
    /// Exits of the vCPU to the VMM so far.
    pub vm_exits: u64,
    /// What the guest did wrong so far: refused descriptor chains, ring
    /// faults, bad stream frames and records.
    pub guest_faults: u64,
}

impl LoadReport {
    pub const LEN: usize = 40 + ServiceStats::LEN;

    pub fn to_bytes(self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..8].copy_from_slice(&self.clients.to_le_bytes());
        out[8..16].copy_from_slice(&self.bytes_in.to_le_bytes());
        out[16..24].copy_from_slice(&self.bytes_out.to_le_bytes());
        out[24..32].copy_from_slice(&self.vm_exits.to_le_bytes());
        out[32..40].copy_from_slice(&self.guest_faults.to_le_bytes());
        out[40..].copy_from_slice(&self.service.to_bytes());
        out
    }

    /// `None` unless `bytes` is exactly one report.
    pub fn from_bytes(bytes: &[u8]) -> Option<LoadReport> {
        if bytes.len() != Self::LEN {
            return None;
        }
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[i..i + 8]);
            u64::from_le_bytes(w)
        };
        let service = ServiceStats::from_bytes(&bytes[40..])?;
        Some(LoadReport {
            clients: word(0),
            bytes_in: word(8),
            bytes_out: word(16),
            vm_exits: word(24),
            guest_faults: word(32),
            service,
        })
    }
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
    match &config.ingress {
        Ingress::Listen(listener) => listener.set_nonblocking(true)?,
        Ingress::Handoff(socket) => socket.set_nonblocking(true)?,
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let handle = std::thread::Builder::new().name("net".into()).spawn(move || {
        if let Err(e) = crate::seccomp::install(crate::seccomp::Thread::Net) {
            eprintln!("mqvisor: network disabled: {e}");
            return;
        }
        runtime.block_on(async move {
            match Proxy::new(config) {
                Ok(proxy) => proxy.run(stop_rx).await,
                Err(e) => eprintln!("mqvisor: network disabled: {e}"),
            }
        });
    })?;
    Ok(NetThread { stop: Some(stop_tx), handle: Some(handle) })
}

const READ: u8 = 1;
const WRITE: u8 = 2;

/// The readiness a stream's watcher task waits for, set by the net loop.
#[derive(Default)]
struct Watch {
    interest: AtomicU8,
    changed: Notify,
}

/// A watcher saw readiness (`READ` and/or `WRITE` bits) on a stream.
struct Woken(StreamId, u8);

/// Where a stream's client-to-guest side stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reading {
    /// The watcher waits for the socket to become readable.
    Armed,
    /// In the read queue: the socket may have bytes.
    Queued,
    /// Readable, but the guest's window is shut.
    Stalled,
    /// The client finished or failed; nothing more goes to the guest.
    Done,
}

struct Stream {
    socket: Arc<TcpStream>,
    watch: Arc<Watch>,
    watcher: JoinHandle<()>,
    reading: Reading,
    /// Client bytes the guest will still take.
    window: usize,
    /// Guest bytes the client socket has not taken yet.
    out: Vec<u8>,
    /// Bytes read from the client before it was handed over: they go to the
    /// guest before anything read here.
    first_bytes: Vec<u8>,
    /// Guest bytes the guest may still send (its window, as seen here).
    guest_window: usize,
    /// Bytes written to the client and not yet credited to the guest.
    owed: usize,
    /// The client socket failed: nothing more can reach it.
    failed: bool,
    /// The guest sent `Close`: FIN follows the last of `out`.
    guest_closed: bool,
    /// The guest has sent bytes on it (it is no longer in `Proxy::unanswered`).
    answered: bool,
    /// Reset at the connection limit, and still counted in `Proxy::dropping`
    /// until the guest has closed it too.
    dropped: bool,
    /// The guest closed with bytes still in `out` (the stream is in
    /// `Proxy::lingering`).
    lingering: bool,
    /// When the client finished sending, while the guest has not closed
    /// (its key in `Proxy::ending`).
    ended: Option<Instant>,
}

impl Stream {
    fn arm(&mut self, bits: u8) {
        self.watch.interest.fetch_or(bits, Ordering::AcqRel);
        self.watch.changed.notify_one();
    }
}

struct Proxy {
    device: NetEventHandler,
    listener: Option<TcpListener>,
    handoff: Option<AsyncFd<std::os::unix::net::UnixDatagram>>,
    rx_event: AsyncFd<EventFd>,
    tx_event: AsyncFd<EventFd>,
    link: FrameLink,
    streams: HashMap<StreamId, Stream>,
    /// Streams whose sockets may have bytes for the guest, in turn.
    read_queue: VecDeque<StreamId>,
    /// Records without bytes waiting for a frame, in order.
    control: VecDeque<(StreamId, Control)>,
    /// The frame for the guest being built, and its length so far.
    building: Vec<u8>,
    /// Bytes of `building` written; 0 when no frame is started.
    building_len: usize,
    /// Bytes in every stream's `out`.
    out_total: usize,
    /// Streams the guest closed while their clients still had bytes to
    /// take, with the bytes their clients had acknowledged when the wait
    /// began, oldest first (so the first is the next to time out).
    lingering: VecDeque<(Instant, StreamId, u64)>,
    /// Streams whose clients finished sending (FIN) while the guest still
    /// answers, by when the wait began, with the bytes their clients had
    /// acknowledged then. A stream leaves when it ends, so a client that
    /// sends DISCONNECT and goes holds no place here past its stream.
    ending: std::collections::BTreeMap<(Instant, StreamId), u64>,
    /// Clients accepted before the guest's device was up.
    waiting: VecDeque<(TcpStream, Vec<u8>)>,
    /// Streams the guest has sent nothing on yet (clients before their
    /// CONNACK), oldest first: at the connection limit the oldest of them
    /// makes room for a new client, so sockets that never speak cannot
    /// lock the port until the CONNECT timeout closes them.
    unanswered: std::collections::BTreeSet<StreamId>,
    /// Streams dropped for a new client that the guest has not closed yet:
    /// they no longer count against the connection limit.
    dropping: usize,
    device_active: bool,
    max_connections: usize,
    next_id: StreamId,
    woken_tx: mpsc::UnboundedSender<Woken>,
    woken_rx: mpsc::UnboundedReceiver<Woken>,
    counters: Arc<LinkCounters>,
    vm_exits: Arc<AtomicU64>,
    stop_reason: crate::devices::GiveUp,
    /// Bytes for slow clients held at most (see [`OUT_BUDGET`]).
    out_budget: usize,
    /// Notifications against frames moved (a guest in a loop is stopped).
    storm: NotifyStorm,
}

#[derive(Debug, Clone, Copy)]
enum Control {
    Open,
    Close,
    Credit(u32),
}

impl Proxy {
    fn new(config: ProxyConfig) -> std::io::Result<Proxy> {
        let device = NetEventHandler::new(config.transport, config.wake_guest);
        let (rx_event, tx_event) = device.queue_events()?;
        let (woken_tx, woken_rx) = mpsc::unbounded_channel();
        let (listener, handoff) = match config.ingress {
            Ingress::Listen(listener) => (Some(TcpListener::from_std(listener)?), None),
            Ingress::Handoff(socket) => (None, Some(watch_fd(socket)?)),
        };
        Ok(Proxy {
            device,
            listener,
            handoff,
            rx_event: watch_fd(rx_event)?,
            tx_event: watch_fd(tx_event)?,
            link: FrameLink::default(),
            streams: HashMap::new(),
            read_queue: VecDeque::new(),
            control: VecDeque::new(),
            // One frame's room, allocated once: a frame leaves as a copy of
            // what was written, so a 4-byte PUBACK costs 4 bytes, not 64 KiB.
            building: vec![0u8; MAX_FRAME],
            building_len: 0,
            out_total: 0,
            lingering: VecDeque::new(),
            ending: std::collections::BTreeMap::new(),
            waiting: VecDeque::new(),
            unanswered: std::collections::BTreeSet::new(),
            dropping: 0,
            device_active: false,
            max_connections: config.max_connections,
            next_id: 1,
            woken_tx,
            woken_rx,
            counters: config.counters,
            vm_exits: config.vm_exits,
            stop_reason: config.stop_reason,
            out_budget: out_budget(),
            storm: NotifyStorm::new("network", "frames"),
        })
    }

    /// Counts `count` queue notifications; a storm stops the VM.
    fn notified(&mut self, count: u64) {
        self.device.add_notifications(count);
        self.storm.notified(count, self.device.frames_moved(), &self.stop_reason);
    }

    async fn run(mut self, mut stop: oneshot::Receiver<()>) {
        let mut report = tokio::time::interval(REPORT_EVERY);
        loop {
            self.pump();
            let linger = self.next_linger_end().map(|end| end.saturating_duration_since(Instant::now()));
            tokio::select! {
                _ = &mut stop => break,
                _ = report.tick(), if self.handoff.is_some() => self.report_load(),
                accepted = accept(self.listener.as_ref()) => {
                    if let Ok((socket, _)) = accepted {
                        self.accept(socket, Vec::new());
                    }
                }
                handed = handed_over(self.handoff.as_ref()) => {
                    match handed {
                        Ok(clients) => {
                            for (socket, first_bytes) in clients {
                                self.accept(socket, first_bytes);
                            }
                        }
                        Err(e) => {
                            // No more clients will come this way.
                            eprintln!("mqvisor: handoff socket: {e}");
                            self.handoff = None;
                        }
                    }
                }
                Some(woken) = self.woken_rx.recv() => {
                    self.on_woken(woken);
                    while let Ok(woken) = self.woken_rx.try_recv() {
                        self.on_woken(woken);
                    }
                }
                ready = self.tx_event.readable() => {
                    if let Ok(mut guard) = ready {
                        let count = guard.get_inner().read().unwrap_or(0);
                        guard.clear_ready();
                        self.notified(count);
                    }
                }
                ready = self.rx_event.readable() => {
                    if let Ok(mut guard) = ready {
                        let count = guard.get_inner().read().unwrap_or(0);
                        guard.clear_ready();
                        self.notified(count);
                    }
                }
                () = sleep_or_forever(linger) => self.end_lingering(),
            }
        }
        self.close_all();
    }

    fn accept(&mut self, socket: TcpStream, first_bytes: Vec<u8>) {
        if self.streams.len() - self.dropping + self.waiting.len() >= self.max_connections
            && !self.drop_oldest_unanswered()
        {
            // Over the limit, every client answered: the new client sees a
            // reset, nobody else anything.
            reset(&socket);
            return;
        }
        let _ = socket.set_nodelay(true);
        if self.device_active {
            self.open(socket, first_bytes);
        } else {
            self.waiting.push_back((socket, first_bytes));
        }
    }

    fn open(&mut self, socket: TcpStream, first_bytes: Vec<u8>) {
        let id = self.next_id;
        self.next_id += 1;
        let socket = Arc::new(socket);
        let watch = Arc::new(Watch::default());
        let watcher = tokio::spawn(watch_stream(id, socket.clone(), watch.clone(), self.woken_tx.clone()));
        // Clients usually speak first: look at once rather than after a wake-up.
        let stream = Stream {
            socket,
            watch,
            watcher,
            reading: Reading::Queued,
            window: WINDOW_BYTES,
            out: Vec::new(),
            guest_window: WINDOW_BYTES,
            first_bytes,
            owed: 0,
            failed: false,
            guest_closed: false,
            answered: false,
            dropped: false,
            lingering: false,
            ended: None,
        };
        self.streams.insert(id, stream);
        self.unanswered.insert(id);
        self.control.push_back((id, Control::Open));
        self.read_queue.push_back(id);
    }

    fn on_woken(&mut self, Woken(id, bits): Woken) {
        let Some(stream) = self.streams.get_mut(&id) else { return };
        if bits & READ != 0 && stream.reading == Reading::Armed {
            stream.reading = Reading::Queued;
            self.read_queue.push_back(id);
        }
        if bits & WRITE != 0 {
            self.write_out(id);
        }
    }

    /// Does all the work there is, until nothing moves.
    fn pump(&mut self) {
        loop {
            let visit = self.device.process(&mut self.link);
            if visit.reset {
                // A reset guest has lost its streams: so have their clients.
                self.reset_all();
            }
            if visit.active && !self.device_active {
                // The guest's link is up: tell the daemon at once (it times boots by it).
                self.device_active = true;
                self.report_load();
            }
            self.device_active = visit.active;
            let mut progress = visit.moved;
            if self.device_active {
                while let Some((socket, first_bytes)) = self.waiting.pop_front() {
                    self.open(socket, first_bytes);
                    progress = true;
                }
            }
            progress |= self.take_guest_frames();
            progress |= self.fill_frames();
            while self.out_total > self.out_budget {
                self.shed_slowest();
            }
            if !progress {
                break;
            }
        }
    }

    /// Acts on every record the guest sent. True if there were frames.
    fn take_guest_frames(&mut self) -> bool {
        let mut any = false;
        while let Some(frame) = self.link.from_guest.pop_front() {
            any = true;
            let Ok(records) = streams::records(&frame) else {
                self.counters.bad_frames.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            for record in records {
                match record {
                    Ok(Record::Data(id, bytes)) => self.on_guest_data(id, bytes),
                    Ok(Record::Close(id)) => self.on_guest_close(id),
                    Ok(Record::Credit(id, n)) => {
                        if let Some(stream) = self.streams.get_mut(&id) {
                            stream.window = stream.window.saturating_add(n as usize).min(WINDOW_BYTES);
                            if stream.reading == Reading::Stalled && stream.window > 0 {
                                stream.reading = Reading::Queued;
                                self.read_queue.push_back(id);
                            }
                        }
                    }
                    Ok(Record::Stats(bytes)) => match (ServiceStats::from_bytes(bytes), self.counters.service.lock()) {
                        (Some(stats), Ok(mut service)) => *service = stats,
                        _ => {
                            self.counters.bad_records.fetch_add(1, Ordering::Relaxed);
                        }
                    },
                    Ok(Record::Open(_)) => {
                        self.counters.bad_records.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        self.counters.bad_frames.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
        }
        any
    }

    fn on_guest_data(&mut self, id: StreamId, bytes: &[u8]) {
        // Bytes for a stream that ended here are the guest's to lose.
        let Some(stream) = self.streams.get_mut(&id) else { return };
        if !stream.answered {
            // Once per stream, not on every record of the hot path.
            stream.answered = true;
            self.unanswered.remove(&id);
        }
        if stream.guest_closed {
            self.counters.bad_records.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let allowed = bytes.len().min(stream.guest_window);
        if allowed < bytes.len() {
            self.counters.bad_records.fetch_add(1, Ordering::Relaxed);
        }
        let bytes = &bytes[..allowed];
        stream.guest_window -= allowed;
        if stream.failed {
            // The client is gone: what the guest sends now goes nowhere,
            // and the window it used comes straight back.
            stream.owed += allowed;
        } else {
            stream.out.extend_from_slice(bytes);
            self.out_total += bytes.len();
        }
        self.write_out(id);
    }

    fn on_guest_close(&mut self, id: StreamId) {
        let Some(stream) = self.streams.get_mut(&id) else { return };
        if stream.guest_closed {
            self.counters.bad_records.fetch_add(1, Ordering::Relaxed);
            return;
        }
        stream.guest_closed = true;
        if let Some(since) = stream.ended.take() {
            // Its answers are all there: `lingering` takes over if needed.
            self.ending.remove(&(since, id));
        }
        // Whatever the client still sends goes nowhere.
        self.stop_reading(id);
        self.write_out(id);
    }

    /// Writes what the client socket takes of the stream's `out`, credits
    /// the guest, and ends the stream once both sides are done.
    fn write_out(&mut self, id: StreamId) {
        let Some(stream) = self.streams.get_mut(&id) else { return };
        let mut failed = false;
        let mut written = 0;
        while written < stream.out.len() {
            match stream.socket.try_write(&stream.out[written..]) {
                Ok(0) => {
                    failed = true;
                    break;
                }
                Ok(n) => written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    stream.arm(WRITE);
                    break;
                }
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        stream.out.drain(..written);
        self.out_total -= written;
        self.counters.client_bytes_out.fetch_add(written as u64, Ordering::Relaxed);
        stream.owed += written;
        if stream.out.is_empty() && stream.out.capacity() > 0 {
            // An idle stream keeps no buffer.
            stream.out = Vec::new();
        }
        if failed {
            self.client_failed(id);
        }
        let Some(stream) = self.streams.get_mut(&id) else { return };
        if stream.owed >= WINDOW_BYTES / 2 && !stream.guest_closed {
            let credit = std::mem::take(&mut stream.owed);
            stream.guest_window += credit;
            // At most one window: it fits.
            self.control.push_back((id, Control::Credit(u32::try_from(credit).unwrap_or(WINDOW))));
        }
        if stream.guest_closed && stream.reading == Reading::Done {
            if stream.out.is_empty() {
                // Both sides are done and the client has every byte: FIN.
                let _ = socket2::SockRef::from(&*stream.socket).shutdown(Shutdown::Write);
                self.forget(id);
            } else if !stream.lingering {
                stream.lingering = true;
                self.lingering.push_back((Instant::now(), id, bytes_acked(&stream.socket)));
            }
        }
    }

    /// Builds frames for the guest: control records first, then client bytes
    /// from streams in turn, while the link has room. True if any was built.
    fn fill_frames(&mut self) -> bool {
        let mut built = false;
        while let Some(&(id, control)) = self.control.front() {
            let record = match control {
                Control::Open => Record::Open(id),
                Control::Close => Record::Close(id),
                Control::Credit(n) => Record::Credit(id, n),
            };
            if !self.with_frame(|frame| usize::from(frame.control(record))) {
                return built;
            }
            self.control.pop_front();
            built = true;
        }
        let mut turns = self.read_queue.len();
        while turns > 0 {
            turns -= 1;
            let Some(id) = self.read_queue.pop_front() else { break };
            match self.read_client(id) {
                Some(true) => built = true,
                Some(false) => {}
                None => {
                    // No room for frames: this stream keeps its turn.
                    self.read_queue.push_front(id);
                    break;
                }
            }
        }
        self.finish_frame();
        built
    }

    /// Reads one chunk of stream `id`'s client into the frame being built.
    /// `Some(true)`: bytes or an end went to the guest; `None`: the link
    /// has no room.
    fn read_client(&mut self, id: StreamId) -> Option<bool> {
        let Some(stream) = self.streams.get_mut(&id) else { return Some(false) };
        if stream.reading != Reading::Queued {
            return Some(false);
        }
        if stream.window == 0 {
            stream.reading = Reading::Stalled;
            return Some(false);
        }
        if !stream.first_bytes.is_empty() {
            // What the daemon read before the handoff goes first.
            let take = stream.first_bytes.len().min(stream.window);
            let bytes = stream.first_bytes[..take].to_vec();
            let mut sent = 0;
            if !self.with_frame(|frame| {
                sent = frame.data(id, &bytes);
                sent
            }) {
                return None;
            }
            self.counters.client_bytes_in.fetch_add(sent as u64, Ordering::Relaxed);
            let stream = self.streams.get_mut(&id)?;
            stream.first_bytes.drain(..sent);
            if stream.first_bytes.is_empty() {
                stream.first_bytes = Vec::new();
            }
            stream.window -= sent;
            self.read_queue.push_back(id);
            return Some(sent > 0);
        }
        let socket = stream.socket.clone();
        let window = stream.window;
        let mut outcome = Ok(0);
        let room = self.with_frame(|frame| {
            if frame.data_room() == 0 {
                return 0; // A full frame: take a fresh one.
            }
            outcome = socket.try_read(frame.data_slot(window));
            frame.commit_data(id, *outcome.as_ref().unwrap_or(&0));
            1
        });
        if !room {
            return None;
        }
        let stream = self.streams.get_mut(&id)?;
        match outcome {
            Ok(n) if n > 0 => {
                quick_ack(&*stream.socket);
                self.counters.client_bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                stream.window -= n;
                self.read_queue.push_back(id);
                Some(true)
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                stream.reading = Reading::Armed;
                stream.arm(READ);
                Some(false)
            }
            Ok(_) => {
                // EOF: the guest hears the client is done sending, answers
                // what it sent and closes; a client that does not take the
                // answers in time is dropped (see `end_lingering`).
                let now = Instant::now();
                stream.ended = Some(now);
                self.ending.insert((now, id), bytes_acked(&stream.socket));
                self.stop_reading(id);
                self.write_out(id);
                Some(true)
            }
            Err(_) => {
                // A failed socket: the same, and nothing more reaches it.
                self.client_failed(id);
                self.write_out(id);
                Some(true)
            }
        }
    }

    /// Tells `mqvisor serve` this VM's load (best effort: a full socket
    /// skips a report).
    fn report_load(&self) {
        let Some(handoff) = &self.handoff else { return };
        if !self.device_active {
            return; // Not up yet: the first report says the guest is.
        }
        let load = LoadReport {
            clients: self.streams.len() as u64,
            bytes_in: self.counters.client_bytes_in.load(Ordering::Relaxed),
            bytes_out: self.counters.client_bytes_out.load(Ordering::Relaxed),
            service: self.counters.service.lock().map(|s| *s).unwrap_or_default(),
            vm_exits: self.vm_exits.load(Ordering::Relaxed),
            guest_faults: self.device.driver_faults()
                + self.counters.bad_frames.load(Ordering::Relaxed)
                + self.counters.bad_records.load(Ordering::Relaxed),
        };
        let _ = handoff.get_ref().send(&load.to_bytes());
    }

    /// Resets the oldest client the guest has not answered (one that has
    /// not completed its CONNECT); the guest hears it has gone. False when
    /// every client has been answered, or too many dropped are still open.
    fn drop_oldest_unanswered(&mut self) -> bool {
        // A guest that never closes what it is told has gone must not let
        // the streams held here grow without end.
        if self.dropping >= self.max_connections {
            return false;
        }
        let Some(id) = self.unanswered.pop_first() else { return false };
        let Some(stream) = self.streams.get_mut(&id) else { return false };
        reset(&stream.socket);
        stream.dropped = true;
        self.dropping += 1;
        self.counters.silent_clients_dropped.fetch_add(1, Ordering::Relaxed);
        self.client_failed(id);
        self.write_out(id);
        true
    }

    /// Resets the client with the most guest bytes waiting for it; the guest
    /// hears it has gone.
    fn shed_slowest(&mut self) {
        let Some((&id, stream)) = self.streams.iter().max_by_key(|(_, s)| s.out.len()) else { return };
        reset(&stream.socket);
        self.counters.shed_clients.fetch_add(1, Ordering::Relaxed);
        self.client_failed(id);
        self.write_out(id);
    }

    /// Nothing more of the client's goes to the guest, which hears `Close`
    /// (once).
    fn stop_reading(&mut self, id: StreamId) {
        if let Some(stream) = self.streams.get_mut(&id)
            && stream.reading != Reading::Done
        {
            stream.reading = Reading::Done;
            self.control.push_back((id, Control::Close));
        }
    }

    /// The client is gone: the guest hears so, and what the client will
    /// never read is discarded.
    fn client_failed(&mut self, id: StreamId) {
        self.stop_reading(id);
        self.drop_out(id);
    }

    /// Discards what a failed client will never read.
    fn drop_out(&mut self, id: StreamId) {
        if let Some(stream) = self.streams.get_mut(&id) {
            stream.failed = true;
            self.out_total -= stream.out.len();
            stream.owed += stream.out.len();
            stream.out = Vec::new();
        }
    }

    /// Runs `write` on the frame being built (starting one if needed);
    /// when it writes nothing into a frame with records, queues that frame
    /// and retries on a fresh one. False when the link has no room.
    fn with_frame(&mut self, mut write: impl FnMut(&mut FrameWriter<'_>) -> usize) -> bool {
        for _ in 0..2 {
            if self.building_len == 0 {
                if !self.link.has_room_for_guest() {
                    return false;
                }
                self.building_len = FrameWriter::new(&mut self.building, GUEST_MAC, HOST_MAC).len();
            }
            let mut frame = FrameWriter::resume(&mut self.building, self.building_len);
            let written = write(&mut frame);
            let empty = frame.is_empty();
            self.building_len = frame.len();
            if written > 0 || empty {
                return true;
            }
            self.finish_frame();
        }
        false
    }

    /// Queues the frame being built for the guest, if it has records.
    fn finish_frame(&mut self) {
        if self.building_len > streams::ETHERNET_HEADER_LEN {
            self.link.to_guest.push_back(self.building[..self.building_len].to_vec());
            self.building_len = 0;
        }
    }

    fn next_linger_end(&self) -> Option<Instant> {
        let lingering = self.lingering.front().map(|&(since, _, _)| since);
        let ending = self.ending.first_key_value().map(|(&(since, _), _)| since);
        lingering.into_iter().chain(ending).min().map(|since| since + CLOSE_LINGER)
    }

    /// Drops clients that took none of the guest's last bytes in time.
    fn end_lingering(&mut self) {
        let now = Instant::now();
        while let Some(&(since, id, acked)) = self.lingering.front() {
            if now < since + CLOSE_LINGER {
                break;
            }
            self.lingering.pop_front();
            // The stream may have finished meanwhile (then it is gone).
            let Some(stream) = self.streams.get(&id) else { continue };
            let acked_now = bytes_acked(&stream.socket);
            if acked_now > acked {
                // Slow, but it reads: it waits again.
                self.lingering.push_back((now, id, acked_now));
                continue;
            }
            reset(&stream.socket);
            self.drop_out(id);
            self.forget(id);
        }
        while let Some((&(since, id), &acked)) = self.ending.first_key_value() {
            if now < since + CLOSE_LINGER {
                break;
            }
            self.ending.remove(&(since, id));
            let Some(stream) = self.streams.get_mut(&id) else { continue };
            let acked_now = bytes_acked(&stream.socket);
            if acked_now > acked {
                stream.ended = Some(now);
                self.ending.insert((now, id), acked_now);
                continue;
            }
            // A client that finished sending and takes none of its answers:
            // what the guest still sends goes nowhere and its window comes
            // back, so the guest closes the stream too (which ends it).
            stream.ended = None;
            reset(&stream.socket);
            self.client_failed(id);
            self.write_out(id);
        }
    }

    fn forget(&mut self, id: StreamId) {
        if let Some(stream) = self.streams.remove(&id) {
            if let Some(since) = stream.ended {
                self.ending.remove(&(since, id));
            }
            if !stream.answered {
                self.unanswered.remove(&id);
            }
            stream.watcher.abort();
            self.out_total -= stream.out.len();
            self.dropping -= usize::from(stream.dropped);
        }
    }

    /// The guest lost every stream (device reset): reset every client.
    fn reset_all(&mut self) {
        let ids: Vec<StreamId> = self.streams.keys().copied().collect();
        for id in ids {
            if let Some(stream) = self.streams.get(&id) {
                reset(&stream.socket);
            }
            self.forget(id);
        }
        self.read_queue.clear();
        self.control.clear();
        self.building_len = 0;
    }

    /// The VM is stopping: close every client connection cleanly (FIN).
    fn close_all(&mut self) {
        for stream in self.streams.values() {
            let _ = socket2::SockRef::from(&*stream.socket).shutdown(Shutdown::Write);
        }
        let ids: Vec<StreamId> = self.streams.keys().copied().collect();
        for id in ids {
            self.forget(id);
        }
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
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(socket),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    if rc != 0 || usize::try_from(len).unwrap_or(0) < info.len() {
        return 0;
    }
    let mut acked = [0u8; 8];
    acked.copy_from_slice(&info[ACKED_AT..]);
    u64::from_ne_bytes(acked)
}

/// Makes closing `socket` send RST instead of FIN.
fn reset(socket: &TcpStream) {
    // SO_LINGER 0 turns the close into an RST; a zero linger never blocks.
    let _ = socket2::SockRef::from(socket).set_linger(Some(Duration::ZERO));
}

/// The next client accepted on `listener`; never, without one.
async fn accept(listener: Option<&TcpListener>) -> std::io::Result<(TcpStream, std::net::SocketAddr)> {
    match listener {
        Some(listener) => listener.accept().await,
        None => std::future::pending().await,
    }
}

/// Every client waiting on the handoff socket, with the bytes read before
/// the handoff; never, without a socket.
async fn handed_over(
    handoff: Option<&AsyncFd<std::os::unix::net::UnixDatagram>>,
) -> std::io::Result<Vec<(TcpStream, Vec<u8>)>> {
    let Some(handoff) = handoff else { return std::future::pending().await };
    let mut guard = handoff.readable().await?;
    let mut clients = Vec::new();
    let mut buf = vec![0u8; MAX_HANDOFF_BYTES];
    loop {
        let received = guard.try_io(|inner| {
            inner.get_ref().recv_with_fd(&mut buf).map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
        });
        match received {
            Ok(Ok((len, Some(file)))) => {
                let socket = std::net::TcpStream::from(std::os::fd::OwnedFd::from(file));
                socket.set_nonblocking(true)?;
                clients.push((TcpStream::from_std(socket)?, buf[..len].to_vec()));
            }
            // A datagram without a socket is not a client.
            Ok(Ok((_, None))) => {}
            Ok(Err(e)) => return Err(e),
            // Would block: every waiting client is taken.
            Err(_) => return Ok(clients),
        }
    }
}

/// Registers an eventfd or a unix socket, which the reactor then owns.
fn watch_fd<T: std::os::fd::AsRawFd>(owner: T) -> std::io::Result<AsyncFd<T>> {
    // SAFETY: the callers pass `EventFd` and `UnixDatagram`, which own their
    // descriptor, keep it open until dropped and always return the same one
    // from `as_raw_fd`; the AsyncFd owns the value.
    unsafe { AsyncFd::register(owner) }.map_err(std::io::Error::from)
}

/// Waits for the readiness the net loop asks for on one stream and reports
/// it. Parked (no readiness asked) it costs a task and nothing else.
async fn watch_stream(id: StreamId, socket: Arc<TcpStream>, watch: Arc<Watch>, woken: mpsc::UnboundedSender<Woken>) {
    loop {
        let bits = watch.interest.load(Ordering::Acquire);
        let interest = match bits {
            READ => Interest::READABLE,
            WRITE => Interest::WRITABLE,
            0 => {
                watch.changed.notified().await;
                continue;
            }
            _ => Interest::READABLE | Interest::WRITABLE,
        };
        tokio::select! {
            ready = socket.ready(interest) => {
                // An error is reported as readiness: the net loop's next
                // read or write finds it.
                let ready = ready.unwrap_or(Ready::ALL);
                let mut fired = 0;
                if ready.is_readable() || ready.is_read_closed() || ready.is_error() {
                    fired |= READ;
                }
                if ready.is_writable() || ready.is_write_closed() || ready.is_error() {
                    fired |= WRITE;
                }
                let fired = fired & bits;
                if fired == 0 {
                    continue;
                }
                watch.interest.fetch_and(!fired, Ordering::AcqRel);
                if woken.send(Woken(id, fired)).is_err() {
                    return;
                }
            }
            () = watch.changed.notified() => {}
        }
    }
}
