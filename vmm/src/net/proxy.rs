//! The net thread: carries every client (`net::ingress`) into the guest as
//! a stream over the virtual link (`mqvisor_boot_abi::streams`), doing
//! the I/O that the stream logic (`net::streams`) asks for.
//!
//! Owns the I/O: the client transports (`net::transport`) and the task
//! that waits for each one's readiness, the frame for the guest being
//! built, the device's queue notifications and the load reports. Client
//! bytes are read straight into the frame being built, guest bytes written
//! straight to the client; every bound and every decision about a stream
//! is the stream logic's. An idle stream costs its client, a small struct
//! and one parked task. When the VM stops, every client sees a clean
//! close. With quotas set, it gives the stream logic the time, bounds
//! reads and writes by what it allows, and keeps new clients beyond the
//! connection rate waiting (not taking more from the ingress meanwhile).
//! This thread never touches the vCPU; the device handler wakes a parked
//! guest after giving it frames.

use std::collections::{HashMap, VecDeque};
use std::io::ErrorKind;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use mqvisor_boot_abi::streams::{self, FrameWriter, Record, StreamId};
use tokio::io::unix::AsyncFd;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;
use vmm_sys_util::eventfd::EventFd;

use super::ingress::{Arrival, Clients, Ingress, REPORT_EVERY, REPORT_IDLE_EVERY, watch_fd};
use super::link::FrameLink;
use super::metrics::Counters;
use super::paced::sleep_or_forever;
use super::quota::Quotas;
use super::streams::{Action, Flushed, Limits, Streams, Turn};
use super::transport::ClientTransport;
use super::{GUEST_MAC, HOST_MAC, MAX_FRAME};
use crate::devices::virtio::block::BlockDevice;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::{NetDevice, NetEventHandler};
use crate::devices::virtio::storm::NotifyStorm;
use crate::devices::{GiveUp, StopReason};

/// Guest bytes waiting for slow clients, all streams together, before the
/// client furthest behind is reset.
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

/// Everything the net thread needs from the VM.
pub struct ProxyConfig {
    pub transport: Arc<Mutex<MmioTransport<NetDevice>>>,
    /// Written after frames are handed to the guest, to end a WAIT.
    pub wake_guest: Arc<EventFd>,
    /// Where clients come from.
    pub ingress: Ingress,
    /// Most client connections carried at once; more are reset.
    pub max_connections: usize,
    /// The vCPU's exits, counted as they happen (for the load report).
    pub vm_exits: Arc<AtomicU64>,
    /// The state disk once it is made, whose failures the load report carries.
    pub disk: Arc<OnceLock<Arc<Mutex<MmioTransport<BlockDevice>>>>>,
    /// Where the proxy says why the VM must stop (see `vcpu::VcpuContext`).
    pub stop_reason: GiveUp,
    /// The tenant's rate quotas (none set: nothing is limited).
    pub quotas: Quotas,
}

/// Stops the net thread (closing every client cleanly) and waits for it.
pub struct NetThread {
    stop: Option<oneshot::Sender<()>>,
    handle: Option<std::thread::JoinHandle<Counters>>,
}

impl NetThread {
    /// Closes all client connections, ends the thread and returns what it
    /// counted.
    pub fn stop(mut self) -> Counters {
        self.shutdown().unwrap_or_default()
    }

    fn shutdown(&mut self) -> Option<Counters> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.handle.take()?.join().ok()
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
    config.ingress.set_nonblocking()?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let handle = std::thread::Builder::new().name("net".into()).spawn(move || {
        if let Err(e) = crate::seccomp::install(crate::seccomp::Thread::Net) {
            eprintln!("mqvisor: network disabled: {e}");
            return Counters::default();
        }
        runtime.block_on(async move {
            match Proxy::new(config) {
                Ok(proxy) => proxy.run(stop_rx).await,
                Err(e) => {
                    eprintln!("mqvisor: network disabled: {e}");
                    Counters::default()
                }
            }
        })
    })?;
    Ok(NetThread { stop: Some(stop_tx), handle: Some(handle) })
}

const READ: u8 = 1;
const WRITE: u8 = 2;

/// The readiness a client's watcher task waits for, set by the net loop.
#[derive(Default)]
struct Watch {
    interest: AtomicU8,
    changed: Notify,
}

/// A watcher saw readiness (`READ` and/or `WRITE` bits) on a client.
struct Woken(StreamId, u8);

/// A client and the task that waits for its readiness.
struct Client {
    transport: Arc<dyn ClientTransport>,
    watch: Arc<Watch>,
    watcher: JoinHandle<()>,
}

impl Client {
    fn arm(&self, bits: u8) {
        self.watch.interest.fetch_or(bits, Ordering::AcqRel);
        self.watch.changed.notify_one();
    }
}

/// The frame for the guest being built.
struct Building {
    /// One frame's room, allocated once: a frame leaves as a copy of what
    /// was written, so a 4-byte PUBACK costs 4 bytes, not 64 KiB.
    buf: Vec<u8>,
    /// Bytes of `buf` written; 0 when no frame is started.
    len: usize,
}

impl Building {
    /// Runs `write` on the frame being built (starting one if needed);
    /// when it writes nothing into a frame with records, queues that frame
    /// and retries on a fresh one. False when the link has no room.
    fn with_frame(&mut self, link: &mut FrameLink, mut write: impl FnMut(&mut FrameWriter<'_>) -> usize) -> bool {
        for _ in 0..2 {
            if self.len == 0 {
                if !link.has_room_for_guest() {
                    return false;
                }
                self.len = FrameWriter::new(&mut self.buf, GUEST_MAC, HOST_MAC).len();
            }
            let mut frame = FrameWriter::resume(&mut self.buf, self.len);
            let written = write(&mut frame);
            let empty = frame.is_empty();
            self.len = frame.len();
            if written > 0 || empty {
                return true;
            }
            self.finish(link);
        }
        false
    }

    /// Queues the frame being built for the guest, if it has records.
    fn finish(&mut self, link: &mut FrameLink) {
        if self.len > streams::ETHERNET_HEADER_LEN {
            link.to_guest.push_back(self.buf[..self.len].to_vec());
            self.len = 0;
        }
    }
}

struct Proxy {
    device: NetEventHandler,
    /// Clients connected at `connected_at`, and the sum of their connected
    /// time so far, in microseconds (see [`Proxy::count_connected_time`]).
    connected: (u64, Instant, u128),
    /// The most clients connected at once.
    peak_connections: u64,
    net: Arc<Mutex<MmioTransport<NetDevice>>>,
    disk: Arc<OnceLock<Arc<Mutex<MmioTransport<BlockDevice>>>>>,
    clients_in: Clients,
    rx_event: AsyncFd<EventFd>,
    tx_event: AsyncFd<EventFd>,
    link: FrameLink,
    building: Building,
    streams: Streams,
    clients: HashMap<StreamId, Client>,
    woken_tx: mpsc::UnboundedSender<Woken>,
    woken_rx: mpsc::UnboundedReceiver<Woken>,
    vm_exits: Arc<AtomicU64>,
    /// The counters last gathered (the disk's stand when its lock is busy).
    last: Counters,
    stop_reason: GiveUp,
    /// Notifications against frames moved (a guest in a loop is stopped).
    storm: NotifyStorm,
    /// A users and ACL change from `mqvisor serve` for the guest, not yet
    /// in a frame (only the latest: each carries every table it changes).
    auth_change: Option<Vec<u8>>,
    /// The last one sent, sent again should the guest reset (it boots
    /// from its configuration blob, which predates it).
    auth_sent: Option<Vec<u8>>,
    /// Clients that arrived beyond the connection rate, waiting for its
    /// tokens (nothing more is taken from the ingress meanwhile).
    pending: VecDeque<Arrival>,
    /// When the first of `pending` may be taken.
    pending_until: Option<Instant>,
    /// The fence deadline passed (see `net::fence`): no client is served.
    fenced: bool,
}

impl Proxy {
    fn new(config: ProxyConfig) -> std::io::Result<Proxy> {
        let device = NetEventHandler::new(config.transport.clone(), config.wake_guest);
        let (rx_event, tx_event) = device.queue_events()?;
        let (woken_tx, woken_rx) = mpsc::unbounded_channel();
        let limits = Limits { max_connections: config.max_connections, out_budget: out_budget(), linger: CLOSE_LINGER };
        let mut streams = Streams::new(limits);
        streams.set_quotas(config.quotas, Instant::now());
        Ok(Proxy {
            device,
            connected: (0, Instant::now(), 0),
            peak_connections: 0,
            net: config.transport,
            disk: config.disk,
            clients_in: Clients::new(config.ingress)?,
            rx_event: watch_fd(rx_event)?,
            tx_event: watch_fd(tx_event)?,
            link: FrameLink::default(),
            building: Building { buf: vec![0u8; MAX_FRAME], len: 0 },
            streams,
            clients: HashMap::new(),
            woken_tx,
            woken_rx,
            vm_exits: config.vm_exits,
            last: Counters::default(),
            stop_reason: config.stop_reason,
            storm: NotifyStorm::new("network", "frames"),
            auth_change: None,
            auth_sent: None,
            pending: VecDeque::new(),
            pending_until: None,
            fenced: false,
        })
    }

    /// Counts `count` queue notifications; a storm stops the VM.
    fn notified(&mut self, count: u64) {
        self.device.add_notifications(count);
        self.storm.notified(count, self.device.frames_moved(), &self.stop_reason);
    }

    /// Serves until `stop`; returns what it counted.
    async fn run(mut self, mut stop: oneshot::Receiver<()>) -> Counters {
        // A report is due REPORT_EVERY after the last one when anything
        // happened since, and only every REPORT_IDLE_EVERY when nothing did:
        // an idle tenant does not wake up every second for it.
        let mut reported_at = Instant::now();
        let mut active = true;
        let report_timer = tokio::time::sleep(REPORT_EVERY);
        tokio::pin!(report_timer);
        loop {
            if self.fenced() {
                // Nothing more reaches any client: what waits for them is
                // dropped with them, unsent, and no report goes out.
                self.clients.clear();
                return self.counters();
            }
            self.pump();
            let due = self.streams.poll_timeout().into_iter().chain(self.pending_until).chain(self.clients_in.fence());
            let due = due.min();
            let linger = due.map(|end| end.saturating_duration_since(Instant::now()));
            // One timer, moved only when the due time moves: the loop turns
            // once per event, and a fresh timer each turn cost the hot path.
            let every = if active { REPORT_EVERY } else { REPORT_IDLE_EVERY };
            let report_due = tokio::time::Instant::from_std(reported_at + every);
            if report_timer.deadline() != report_due {
                report_timer.as_mut().reset(report_due);
            }
            tokio::select! {
                _ = &mut stop => break,
                () = &mut report_timer, if self.clients_in.reports() => {
                    self.report_load();
                    reported_at = Instant::now();
                    active = false;
                    continue;
                }
                arrived = self.clients_in.arrived(), if self.pending.is_empty() => {
                    self.tick();
                    for arrival in arrived {
                        if !self.pending.is_empty() {
                            self.streams.connection_waits();
                            self.pending.push_back(arrival);
                        } else if self.streams.take_connection().is_ok() {
                            self.accept(arrival);
                        } else {
                            self.streams.connection_waits();
                            self.pending.push_back(arrival);
                        }
                    }
                    self.accept_pending();
                    if let Some(change) = self.clients_in.take_auth_change() {
                        self.auth_change = Some(change);
                    }
                    if let Some(socket) = self.clients_in.take_standby_offer() {
                        self.offer_standby(socket);
                    }
                }
                Some(woken) = self.woken_rx.recv() => {
                    self.tick();
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
                () = sleep_or_forever(linger) => {
                    let clients = &self.clients;
                    self.streams.handle_timeout(Instant::now(), |id| {
                        clients.get(&id).map_or(0, |c| c.transport.bytes_acked())
                    });
                    self.act();
                    self.accept_pending();
                }
            }
            active = true;
        }
        self.streams.close_all();
        self.act();
        // A last report: what the tenant did since the one before counts
        // for billing when it is stopped (serve waits for it).
        self.report_load();
        self.counters()
    }

    /// Hands a connection to a new standby to the state disk and wakes its
    /// thread, which sends the file's data before the next request.
    fn offer_standby(&self, socket: std::fs::File) {
        let Some(disk) = self.disk.get() else { return };
        let Ok(mut disk) = disk.lock() else { return };
        disk.device_mut().offer_standby(socket);
        if let Some(wake) = disk.queue_event(0) {
            let _ = wake.write(1);
        }
    }

    /// Gives the quotas the time, when any are set.
    fn tick(&mut self) {
        if self.streams.limited() {
            self.streams.tick(Instant::now());
        }
    }

    /// Takes the clients that waited for the connection rate, as its
    /// tokens allow; says when the next may be taken.
    fn accept_pending(&mut self) {
        self.pending_until = None;
        if self.pending.is_empty() {
            return;
        }
        self.tick();
        while !self.pending.is_empty() {
            match self.streams.take_connection() {
                Ok(()) => {
                    if let Some(arrival) = self.pending.pop_front() {
                        self.accept(arrival);
                    }
                }
                Err(at) => {
                    self.pending_until = Some(at);
                    return;
                }
            }
        }
    }

    fn accept(&mut self, (transport, first_bytes): Arrival) {
        let Some(id) = self.streams.accept(first_bytes) else {
            // Over the limit, every client answered: the new client sees a
            // reset, nobody else anything.
            transport.reset();
            return;
        };
        let watch = Arc::new(Watch::default());
        let watcher = tokio::spawn(watch_client(id, transport.clone(), watch.clone(), self.woken_tx.clone()));
        self.clients.insert(id, Client { transport, watch, watcher });
        self.act();
    }

    fn on_woken(&mut self, Woken(id, bits): Woken) {
        if bits & READ != 0 {
            self.streams.client_readable(id);
        }
        if bits & WRITE != 0 {
            self.streams.client_writable(id);
            self.act();
        }
    }

    /// Does what the stream logic asks, until it asks nothing more.
    fn act(&mut self) {
        while let Some(action) = self.streams.poll_action() {
            match action {
                Action::Flush(id) => self.flush(id),
                Action::WatchRead(id) => self.with_client(id, |c| c.arm(READ)),
                Action::WatchWrite(id) => self.with_client(id, |c| c.arm(WRITE)),
                Action::Reset(id) => self.with_client(id, |c| c.transport.reset()),
                Action::Finish(id) => self.with_client(id, |c| c.transport.shutdown_write()),
                Action::Forget(id) => {
                    if let Some(client) = self.clients.remove(&id) {
                        client.watcher.abort();
                    }
                }
            }
        }
    }

    fn with_client(&self, id: StreamId, act: impl FnOnce(&Client)) {
        if let Some(client) = self.clients.get(&id) {
            act(client);
        }
    }

    /// True once the fence deadline `mqvisor serve` sent has passed; the
    /// first time, asks for the VM to stop. Checked before every write to
    /// a client, so that a process that was stopped past its deadline
    /// (and so may have been replaced on another node) answers no one.
    fn fenced(&mut self) -> bool {
        if !self.fenced && self.clients_in.fence().is_some_and(|at| Instant::now() >= at) {
            self.fenced = true;
            self.stop_reason.give_up(StopReason::Fenced);
        }
        self.fenced
    }

    /// Writes what the client takes of what waits for it.
    fn flush(&mut self, id: StreamId) {
        if self.fenced() {
            return;
        }
        let Some(client) = self.clients.get(&id) else { return };
        let out = self.streams.out_allowed(id);
        if out.is_empty() && !self.streams.out(id).is_empty() {
            // The egress quota's tokens ran out: the guest's bytes wait.
            self.streams.write_throttled(id);
            return;
        }
        let mut written = 0;
        let mut how = Flushed::All;
        while written < out.len() {
            match client.transport.try_write(&out[written..]) {
                Ok(0) => {
                    how = Flushed::Failed;
                    break;
                }
                Ok(n) => written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    how = Flushed::Blocked;
                    break;
                }
                Err(_) => {
                    how = Flushed::Failed;
                    break;
                }
            }
        }
        self.streams.flushed(id, written, how, || (Instant::now(), client.transport.bytes_acked()));
    }

    /// Does all the work there is, until nothing moves.
    fn pump(&mut self) {
        loop {
            self.tick();
            let visit = self.device.process(&mut self.link);
            if visit.reset {
                // A reset guest has lost its streams: so have their clients.
                self.streams.reset_all();
                self.building.len = 0;
                if self.auth_change.is_none() {
                    self.auth_change = self.auth_sent.clone();
                }
                self.act();
            }
            if visit.active && !self.streams.link_up() {
                // The guest's link is up: tell the daemon at once (it times boots by it).
                self.streams.set_link_up(true);
                self.report_load();
            }
            self.streams.set_link_up(visit.active);
            let mut progress = visit.moved;
            progress |= self.streams.open_waiting();
            progress |= self.take_guest_frames();
            progress |= self.fill_frames();
            self.streams.shed();
            self.act();
            if !progress {
                break;
            }
        }
        self.count_connected_time();
    }

    /// Adds the time since the last call times the clients connected then:
    /// the count changes only while the loop works (and this runs at the end
    /// of each turn), so between two calls it held, and the sum is exact
    /// within a turn of the loop, where a count sampled once a report
    /// charged a whole quiet gap at the newest count.
    fn count_connected_time(&mut self) {
        let now = Instant::now();
        let (count, since, total) = self.connected;
        let total = total + u128::from(count) * now.saturating_duration_since(since).as_micros();
        let count = self.streams.connections();
        self.peak_connections = self.peak_connections.max(count);
        self.connected = (count, now, total);
    }

    /// Acts on every record the guest sent. True if there were frames.
    fn take_guest_frames(&mut self) -> bool {
        let mut any = false;
        while let Some(frame) = self.link.from_guest.pop_front() {
            any = true;
            self.streams.guest_frame(&frame);
            self.act();
        }
        any
    }

    /// Builds frames for the guest: control records first, then client bytes
    /// from streams in turn, while the link has room. True if any was built.
    fn fill_frames(&mut self) -> bool {
        let mut built = false;
        if let Some(change) = self.auth_change.take() {
            // At most MAX_AUTH_LEN bytes: a fresh frame always has room.
            if !self.building.with_frame(&mut self.link, |frame| usize::from(frame.control(Record::Auth(&change)))) {
                self.auth_change = Some(change);
                return built;
            }
            self.auth_sent = Some(change);
            built = true;
        }
        while let Some(record) = self.streams.next_control() {
            if !self.building.with_frame(&mut self.link, |frame| usize::from(frame.control(record))) {
                return built;
            }
            self.streams.control_sent();
            built = true;
        }
        let mut turns = self.streams.read_turns();
        while turns > 0 {
            turns -= 1;
            let Some(turn) = self.streams.next_turn() else { break };
            match self.take_turn(turn) {
                Some(moved) => built |= moved,
                None => break,
            }
            self.act();
        }
        self.building.finish(&mut self.link);
        built
    }

    /// Puts one turn's bytes into the frame being built. `Some(true)`:
    /// bytes or an end went to the guest; `None`: the link has no room
    /// (the stream keeps its turn).
    fn take_turn(&mut self, turn: Turn) -> Option<bool> {
        match turn {
            Turn::Skip => Some(false),
            Turn::First { id, len } => {
                let first = &self.streams.first_bytes(id)[..len];
                let mut sent = 0;
                if !self.building.with_frame(&mut self.link, |frame| {
                    sent = frame.data(id, first);
                    sent
                }) {
                    self.streams.no_room(id);
                    return None;
                }
                self.streams.first_sent(id, sent);
                Some(sent > 0)
            }
            Turn::Client { id, max } => {
                let Some(client) = self.clients.get(&id) else {
                    self.streams.client_failed(id);
                    return Some(true);
                };
                let transport = &client.transport;
                let streams = &mut self.streams;
                let limited = streams.limited();
                let mut outcome = Ok(0);
                let mut admitted = 0;
                let room = self.building.with_frame(&mut self.link, |frame| {
                    if frame.data_room() == 0 {
                        return 0; // A full frame: take a fresh one.
                    }
                    let slot = frame.data_slot(max);
                    outcome = transport.try_read(slot);
                    let read = *outcome.as_ref().unwrap_or(&0);
                    // With quotas, what has no token yet waits in the stream.
                    admitted = if limited { streams.admit_read(id, &slot[..read]) } else { read };
                    frame.commit_data(id, admitted);
                    1
                });
                if !room {
                    self.streams.no_room(id);
                    return None;
                }
                match outcome {
                    Ok(n) if n > 0 => self.streams.client_read(id, admitted),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        self.streams.client_blocked(id);
                        return Some(false);
                    }
                    Ok(_) => self.streams.client_ended(Instant::now(), id, transport.bytes_acked()),
                    Err(_) => self.streams.client_failed(id),
                }
                Some(true)
            }
        }
    }

    /// The VM's counters now: the streams', the devices', the vCPU's.
    fn counters(&mut self) -> Counters {
        self.count_connected_time();
        let mut counters = self.streams.counters();
        counters.peak_connections = self.peak_connections;
        counters.connection_ms = u64::try_from(self.connected.2 / 1000).unwrap_or(u64::MAX);
        counters.vm_exits = self.vm_exits.load(Ordering::Relaxed);
        counters.refused_handshakes = self.clients_in.refused_handshakes();
        if let Ok(net) = self.net.lock() {
            counters.set_net_device(net.device().metrics());
        }
        // The block thread holds its lock across a flush: never wait for it.
        match self.disk.get().map(|disk| disk.try_lock()) {
            Some(Ok(disk)) => counters.set_block_device(disk.device().metrics()),
            _ => counters.set_block_from(&self.last),
        }
        self.last = counters;
        counters
    }

    /// Tells `mqvisor serve` this VM's load, once its guest's link is up.
    fn report_load(&mut self) {
        if self.clients_in.reports() && self.streams.link_up() {
            let counters = self.counters();
            self.clients_in.report(&counters);
        }
    }
}

/// Waits for the readiness the net loop asks for on one client and reports
/// it. Parked (no readiness asked) it costs a task and nothing else.
async fn watch_client(
    id: StreamId,
    client: Arc<dyn ClientTransport>,
    watch: Arc<Watch>,
    woken: mpsc::UnboundedSender<Woken>,
) {
    loop {
        let bits = watch.interest.load(Ordering::Acquire);
        if bits == 0 {
            watch.changed.notified().await;
            continue;
        }
        tokio::select! {
            fired = std::future::poll_fn(|cx| readiness(&*client, cx, bits)) => {
                watch.interest.fetch_and(!fired, Ordering::AcqRel);
                if woken.send(Woken(id, fired)).is_err() {
                    return;
                }
            }
            () = watch.changed.notified() => {}
        }
    }
}

/// Which of `bits` the client is ready for; an error counts as ready (the
/// net loop's next read or write finds it).
fn readiness(client: &dyn ClientTransport, cx: &mut Context<'_>, bits: u8) -> Poll<u8> {
    let mut fired = 0;
    if bits & READ != 0 && client.poll_read_ready(cx).is_ready() {
        fired |= READ;
    }
    if bits & WRITE != 0 && client.poll_write_ready(cx).is_ready() {
        fired |= WRITE;
    }
    if fired == 0 { Poll::Pending } else { Poll::Ready(fired) }
}
