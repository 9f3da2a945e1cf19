//! The host end of the stream link, without I/O: every decision the proxy
//! makes about a client's stream, driven by events and answered with
//! actions, as quinn-proto drives a QUIC connection.
//!
//! Owns, for every stream: its window both ways (`mqvisor_boot_abi::streams::Window`),
//! the guest's bytes its client has not taken, the bytes a client sent
//! before it was handed over, its place in the read turn, and its end. And
//! for all streams together the limits that keep the VMM's memory bounded:
//! - a client's bytes are read only within the stream's window (the
//!   guest's `Credit` reopens it), so a flooding client is held back by
//!   its own TCP;
//! - the guest's bytes a client has not taken wait here, at most one window
//!   per stream; past the budget ([`Limits::out_budget`]) for all streams
//!   together, the client furthest behind is reset (shed) rather than
//!   holding back every other client of the tenant;
//! - at the connection limit, a new client takes the place of the oldest
//!   one the guest has not answered yet (a silent client, before its
//!   CONNACK), so sockets that never speak cannot lock the port;
//! - a stream the guest closed while its client still has bytes to take
//!   lingers ([`Limits::linger`]), and so does a client that has finished
//!   sending (half-closed) while the guest answers; one that takes none of
//!   its bytes in that time is reset, one that takes some waits again.
//!
//! Never does I/O and never reads a clock. Call order, for the I/O around
//! it (`net::proxy`): feed an event (a client was accepted, is readable or
//! writable, its bytes went into a frame; a guest frame arrived; time
//! passed), then take every [`Action`] with [`Streams::poll_action`] and do
//! it before the next event; build frames for the guest from
//! [`Streams::next_control`] and the read turns ([`Streams::next_turn`]);
//! call [`Streams::shed`] once the guest's frames are taken; wake at
//! [`Streams::poll_timeout`] for [`Streams::handle_timeout`]. Nothing a
//! guest writes is trusted: what breaks the protocol is counted.
//!
//! With quotas set ([`Streams::set_quotas`], `net::quota`), a client whose
//! tokens ran out is not read (or not written) until its bucket refills:
//! it waits in a timer queue, in the order it began to wait, and the time
//! is given by [`Streams::tick`] (never read here).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use mqvisor_boot_abi::streams::{self, Record, ServiceStats, StreamId, Window};

use super::metrics::Counters;
use super::quota::{ClientQuota, Limiter, Quotas, Throttled};

/// The bounds a [`Streams`] keeps.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Clients carried at once (those dropped for a new one, until the
    /// guest has closed them, do not count).
    pub max_connections: usize,
    /// The guest's bytes waiting for slow clients, all streams together.
    pub out_budget: usize,
    /// How long a client may take none of its last bytes (see the module doc).
    pub linger: Duration,
}

/// What the I/O around the streams must do, in the order given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Write what [`Streams::out`] holds to the stream's client, then say
    /// how it went with [`Streams::flushed`].
    Flush(StreamId),
    /// Call [`Streams::client_readable`] once the client may have bytes.
    WatchRead(StreamId),
    /// Call [`Streams::client_writable`] once the client can take bytes.
    WatchWrite(StreamId),
    /// The client is dropped: its close is a reset, whenever it comes.
    Reset(StreamId),
    /// The client has every byte: end its sending side (FIN).
    Finish(StreamId),
    /// The stream is over: close the client and forget it.
    Forget(StreamId),
}

/// One read turn (see [`Streams::next_turn`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// Nothing to read on this stream now.
    Skip,
    /// Put the first `len` bytes of [`Streams::first_bytes`] in a `Data`
    /// record, then call [`Streams::first_sent`].
    First { id: StreamId, len: usize },
    /// Read at most `max` bytes of the client into a `Data` record, then
    /// report with [`Streams::client_read`], [`Streams::client_blocked`],
    /// [`Streams::client_ended`] or [`Streams::client_failed`].
    Client { id: StreamId, max: usize },
}

/// How a [`Action::Flush`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flushed {
    /// The client took every byte.
    All,
    /// The client took what it could; the rest waits for it.
    Blocked,
    /// The client failed.
    Failed,
}

/// Where a stream's client-to-guest side stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reading {
    /// Waiting for the client to become readable.
    Armed,
    /// In the read queue: the client may have bytes.
    Queued,
    /// Readable, but the guest's window is shut.
    Stalled,
    /// Waiting for a quota's tokens (in `waits`).
    Throttled,
    /// The client finished or failed; nothing more goes to the guest.
    Done,
}

struct Stream {
    reading: Reading,
    /// Both directions' flow control: what the client may still send the
    /// guest, and what the guest may still send the client.
    flow: Window,
    /// Guest bytes the client has not taken yet.
    out: Vec<u8>,
    /// Bytes read from the client before it was handed over: they go to the
    /// guest before anything read here.
    first_bytes: Vec<u8>,
    /// The client failed: nothing more can reach it.
    failed: bool,
    /// The guest sent `Close`: FIN follows the last of `out`.
    guest_closed: bool,
    /// The guest has sent bytes on it (it is no longer in `unanswered`).
    answered: bool,
    /// Reset at the connection limit, and still counted in `dropping`
    /// until the guest has closed it too.
    dropped: bool,
    /// The guest closed with bytes still in `out` (it is in `lingering`).
    lingering: bool,
    /// When the client finished sending, while the guest has not closed
    /// (its key in `ending`).
    ended: Option<Instant>,
    /// Its part of the quotas, when any are set.
    quota: Option<ClientQuota>,
    /// Since when writing to it waits for the egress bucket (in `waits`).
    write_waits: Option<Instant>,
}

/// What a stream in [`Streams::waits`] waits for tokens to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// Be read, since the time given.
    Read(Instant),
    /// Be written.
    Write,
}

/// Every stream of one VM's link, host side.
pub struct Streams {
    limits: Limits,
    streams: HashMap<StreamId, Stream>,
    /// Clients accepted before the guest's link was up, with their first bytes.
    waiting: VecDeque<(StreamId, Vec<u8>)>,
    link_up: bool,
    /// Streams whose clients may have bytes for the guest, in turn.
    read_queue: VecDeque<StreamId>,
    /// Records without bytes for the guest (`Open`, `Close`, `Credit`), in order.
    control: VecDeque<Record<'static>>,
    actions: VecDeque<Action>,
    /// Bytes in every stream's `out`.
    out_total: usize,
    /// Streams the guest closed while their clients still had bytes to
    /// take, with the bytes their clients had acknowledged when the wait
    /// began, oldest first (so the first is the next to time out).
    lingering: VecDeque<(Instant, StreamId, u64)>,
    /// Streams whose clients finished sending while the guest still
    /// answers, by when the wait began, with the bytes their clients had
    /// acknowledged then. A stream leaves when it ends, so a client that
    /// sends DISCONNECT and goes holds no place here past its stream.
    ending: BTreeMap<(Instant, StreamId), u64>,
    /// Streams the guest has sent nothing on yet (clients before their
    /// CONNACK), oldest first: at the connection limit the oldest of them
    /// makes room for a new client.
    unanswered: BTreeSet<StreamId>,
    /// Streams dropped for a new client that the guest has not closed yet.
    dropping: usize,
    next_id: StreamId,
    counters: Counters,
    /// The tenant's quotas, when any are set.
    limiter: Option<Limiter>,
    /// Streams waiting for tokens, by when they may go on, in the order
    /// they began to wait (the number).
    waits: BTreeMap<(Instant, u64), (StreamId, Wait)>,
    wait_seq: u64,
}

impl Streams {
    pub fn new(limits: Limits) -> Streams {
        Streams {
            limits,
            streams: HashMap::new(),
            waiting: VecDeque::new(),
            link_up: false,
            read_queue: VecDeque::new(),
            control: VecDeque::new(),
            actions: VecDeque::new(),
            out_total: 0,
            lingering: VecDeque::new(),
            ending: BTreeMap::new(),
            unanswered: BTreeSet::new(),
            dropping: 0,
            next_id: 1,
            counters: Counters::default(),
            limiter: None,
            waits: BTreeMap::new(),
            wait_seq: 0,
        }
    }

    /// Enforces `quotas` from `now` on (none: nothing is limited).
    pub fn set_quotas(&mut self, quotas: Quotas, now: Instant) {
        self.limiter = Limiter::new(quotas, now);
    }

    /// True when quotas are set: the I/O around must [`Streams::tick`].
    pub fn limited(&self) -> bool {
        self.limiter.is_some()
    }

    /// The time now, for the quotas' buckets.
    pub fn tick(&mut self, now: Instant) {
        if let Some(limiter) = &mut self.limiter {
            limiter.tick(now);
        }
    }

    /// A new client may be taken now (`Ok`, its token taken), or from the
    /// time given.
    pub fn take_connection(&mut self) -> Result<(), Instant> {
        self.limiter.as_mut().map_or(Ok(()), Limiter::take_connection)
    }

    /// A new client waits for the connection rate (counted).
    pub fn connection_waits(&mut self) {
        self.counters.throttled_connections += 1;
    }

    fn wait(&mut self, at: Instant, id: StreamId, wait: Wait) {
        self.wait_seq += 1;
        self.waits.insert((at, self.wait_seq), (id, wait));
    }

    /// The stream may not be read now: it waits for its tokens.
    fn throttle_read(&mut self, id: StreamId) {
        let (Some(limiter), Some(stream)) = (&self.limiter, self.streams.get_mut(&id)) else { return };
        let Some(quota) = &mut stream.quota else { return };
        stream.reading = Reading::Throttled;
        let at = limiter.read_ready_at(quota);
        let now = limiter.now();
        self.wait(at, id, Wait::Read(now));
    }

    fn count_throttled(&mut self, moved: Throttled, read: bool) {
        if read {
            self.counters.throttled_bytes_in += moved.bytes;
        } else {
            self.counters.throttled_bytes_out += moved.bytes;
        }
        self.counters.throttled_publishes += moved.publishes;
    }

    /// Of the `bytes` a read took from the client, those that may go to
    /// the guest now (their tokens taken); the rest wait here for their
    /// turn, ahead of anything read later. All of them without quotas.
    pub fn admit_read(&mut self, id: StreamId, bytes: &[u8]) -> usize {
        let (Some(limiter), Some(stream)) = (&mut self.limiter, self.streams.get_mut(&id)) else {
            return bytes.len();
        };
        let Some(quota) = &mut stream.quota else { return bytes.len() };
        let k = limiter.allowance(quota, bytes);
        let moved = limiter.consume(quota, &bytes[..k], bytes.len() - k);
        if k < bytes.len() {
            stream.first_bytes.extend_from_slice(&bytes[k..]);
        }
        self.count_throttled(moved, true);
        k
    }

    /// The guest's bytes that may be written to the client now: what
    /// [`Streams::out`] holds, within the egress quota.
    pub fn out_allowed(&self, id: StreamId) -> &[u8] {
        let out = self.out(id);
        match &self.limiter {
            None => out,
            Some(limiter) => &out[..out.len().min(limiter.write_max())],
        }
    }

    /// Nothing may be written to the client now: it waits for tokens.
    pub fn write_throttled(&mut self, id: StreamId) {
        let (Some(limiter), Some(stream)) = (&self.limiter, self.streams.get_mut(&id)) else { return };
        let Some(quota) = &mut stream.quota else { return };
        if stream.write_waits.is_some() {
            return;
        }
        let now = limiter.now();
        stream.write_waits = Some(now);
        let at = limiter.write_ready_at(quota);
        self.wait(at, id, Wait::Write);
    }

    /// Streams whose tokens are due go on: readers back in the read turns,
    /// writers flushed, in the order they began to wait.
    fn resume(&mut self, now: Instant) {
        while let Some(entry) = self.waits.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let (id, wait) = entry.remove();
            let Some(stream) = self.streams.get_mut(&id) else { continue };
            match wait {
                Wait::Read(since) => {
                    if stream.reading == Reading::Throttled {
                        self.counters.throttled_read_us += micros(now.saturating_duration_since(since));
                        stream.reading = Reading::Queued;
                        self.read_queue.push_back(id);
                    }
                }
                Wait::Write => {
                    if let Some(since) = stream.write_waits.take() {
                        self.counters.throttled_write_us += micros(now.saturating_duration_since(since));
                        self.actions.push_back(Action::Flush(id));
                    }
                }
            }
        }
    }

    /// The next thing to do, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// What the streams counted: clients, bytes, drops, the guest's faults
    /// on the link and its service's last report.
    pub fn counters(&self) -> Counters {
        Counters { connections: self.connections(), ..self.counters }
    }

    /// Client connections carried now.
    pub fn connections(&self) -> u64 {
        self.streams.len() as u64
    }

    /// True once the guest's link is up.
    pub fn link_up(&self) -> bool {
        self.link_up
    }

    // Clients.

    /// A new client, with the bytes read from it before it came here:
    /// its stream's id, or `None` when it is over the connection limit
    /// (reset it then; nobody else sees anything).
    pub fn accept(&mut self, first_bytes: Vec<u8>) -> Option<StreamId> {
        if self.streams.len() - self.dropping + self.waiting.len() >= self.limits.max_connections
            && !self.drop_oldest_unanswered()
        {
            return None;
        }
        let id = self.next_id;
        self.next_id += 1;
        if self.link_up {
            self.open(id, first_bytes);
        } else {
            self.waiting.push_back((id, first_bytes));
        }
        Some(id)
    }

    /// The guest's link is up (or down again, its device reset).
    pub fn set_link_up(&mut self, up: bool) {
        self.link_up = up;
    }

    /// Clients that waited for the link to come up get their streams once
    /// it is. True if any did.
    pub fn open_waiting(&mut self) -> bool {
        if !self.link_up || self.waiting.is_empty() {
            return false;
        }
        while let Some((id, first_bytes)) = self.waiting.pop_front() {
            self.open(id, first_bytes);
        }
        true
    }

    fn open(&mut self, id: StreamId, first_bytes: Vec<u8>) {
        // Clients usually speak first: look at once rather than after a wake-up.
        let stream = Stream {
            reading: Reading::Queued,
            flow: Window::default(),
            out: Vec::new(),
            first_bytes,
            failed: false,
            guest_closed: false,
            answered: false,
            dropped: false,
            lingering: false,
            ended: None,
            quota: self.limiter.as_ref().map(Limiter::client),
            write_waits: None,
        };
        self.streams.insert(id, stream);
        self.unanswered.insert(id);
        self.control.push_back(Record::Open(id));
        self.read_queue.push_back(id);
    }

    /// The client may have bytes (after [`Action::WatchRead`]).
    pub fn client_readable(&mut self, id: StreamId) {
        if let Some(stream) = self.streams.get_mut(&id)
            && stream.reading == Reading::Armed
        {
            stream.reading = Reading::Queued;
            self.read_queue.push_back(id);
        }
    }

    /// The client can take bytes (after [`Action::WatchWrite`]).
    pub fn client_writable(&mut self, id: StreamId) {
        self.write_out(id);
    }

    // Client to guest.

    /// Streams waiting for a read turn: how many turns a pass gives.
    pub fn read_turns(&self) -> usize {
        self.read_queue.len()
    }

    /// The next stream's read turn; `None` when no stream waits.
    pub fn next_turn(&mut self) -> Option<Turn> {
        let id = self.read_queue.pop_front()?;
        let Some(stream) = self.streams.get_mut(&id) else { return Some(Turn::Skip) };
        if stream.reading != Reading::Queued {
            return Some(Turn::Skip);
        }
        let room = stream.flow.send_room();
        if room == 0 {
            stream.reading = Reading::Stalled;
            return Some(Turn::Skip);
        }
        if let (Some(limiter), Some(quota)) = (&self.limiter, &mut stream.quota) {
            let max = if stream.first_bytes.is_empty() {
                limiter.read_max(quota, room)
            } else {
                let len = stream.first_bytes.len().min(room);
                limiter.allowance(quota, &stream.first_bytes[..len])
            };
            if max == 0 {
                self.throttle_read(id);
                return Some(Turn::Skip);
            }
            if !stream.first_bytes.is_empty() {
                return Some(Turn::First { id, len: max });
            }
            return Some(Turn::Client { id, max });
        }
        if !stream.first_bytes.is_empty() {
            // What was read before the handover goes first.
            return Some(Turn::First { id, len: stream.first_bytes.len().min(room) });
        }
        Some(Turn::Client { id, max: room })
    }

    /// The link had no room for this turn's frame: the stream keeps its turn.
    pub fn no_room(&mut self, id: StreamId) {
        self.read_queue.push_front(id);
    }

    /// The bytes read before the handover that still wait.
    pub fn first_bytes(&self, id: StreamId) -> &[u8] {
        self.streams.get(&id).map_or(&[], |s| &s.first_bytes)
    }

    /// `n` of the first bytes went to the guest.
    pub fn first_sent(&mut self, id: StreamId, n: usize) {
        let Some(stream) = self.streams.get_mut(&id) else { return };
        let n = n.min(stream.first_bytes.len());
        if let (Some(limiter), Some(quota)) = (&mut self.limiter, &mut stream.quota) {
            let held = stream.first_bytes.len() - n;
            let moved = limiter.consume(quota, &stream.first_bytes[..n], held);
            self.counters.throttled_bytes_in += moved.bytes;
            self.counters.throttled_publishes += moved.publishes;
        }
        stream.first_bytes.drain(..n);
        if stream.first_bytes.is_empty() {
            stream.first_bytes = Vec::new();
        }
        self.sent_to_guest(id, n);
    }

    /// `n` bytes (more than 0) of the client went to the guest.
    pub fn client_read(&mut self, id: StreamId, n: usize) {
        self.sent_to_guest(id, n);
    }

    fn sent_to_guest(&mut self, id: StreamId, n: usize) {
        let Some(stream) = self.streams.get_mut(&id) else { return };
        stream.flow.sent(n);
        self.counters.bytes_in += n as u64;
        self.read_queue.push_back(id);
    }

    /// The client had nothing to read.
    pub fn client_blocked(&mut self, id: StreamId) {
        if let Some(stream) = self.streams.get_mut(&id) {
            stream.reading = Reading::Armed;
            self.actions.push_back(Action::WatchRead(id));
        }
    }

    /// The client finished sending (EOF) at `now`, having acknowledged
    /// `acked` bytes: the guest hears so, answers what it sent and closes;
    /// a client that takes none of the answers in time is reset.
    pub fn client_ended(&mut self, now: Instant, id: StreamId, acked: u64) {
        let Some(stream) = self.streams.get_mut(&id) else { return };
        stream.ended = Some(now);
        self.ending.insert((now, id), acked);
        self.stop_reading(id);
        self.write_out(id);
    }

    /// Reading the client failed: the guest hears it has gone.
    pub fn client_failed(&mut self, id: StreamId) {
        self.fail(id);
        self.write_out(id);
    }

    // Guest to client.

    /// The guest's bytes its client has not taken.
    pub fn out(&self, id: StreamId) -> &[u8] {
        self.streams.get(&id).map_or(&[], |s| &s.out)
    }

    /// An [`Action::Flush`] wrote `written` bytes of [`Streams::out`] and
    /// ended as `how`. `linger` says the time and what the client has
    /// acknowledged; it is asked only when the stream starts to linger (the
    /// hot path reads neither clock nor socket).
    pub fn flushed(&mut self, id: StreamId, written: usize, how: Flushed, linger: impl FnOnce() -> (Instant, u64)) {
        let Some(stream) = self.streams.get_mut(&id) else { return };
        let written = written.min(stream.out.len());
        stream.out.drain(..written);
        self.out_total -= written;
        self.counters.bytes_out += written as u64;
        let mut wait_for_tokens = false;
        if let (Some(limiter), Some(quota)) = (&mut self.limiter, &mut stream.quota) {
            let moved = limiter.wrote(quota, written);
            self.counters.throttled_bytes_out += moved.bytes;
            wait_for_tokens = how == Flushed::All && !stream.out.is_empty();
        }
        if stream.out.is_empty() && stream.out.capacity() > 0 {
            // An idle stream keeps no buffer.
            stream.out = Vec::new();
        }
        self.consumed(id, written);
        match how {
            Flushed::All if wait_for_tokens => self.write_throttled(id),
            Flushed::All => {}
            Flushed::Blocked => self.actions.push_back(Action::WatchWrite(id)),
            Flushed::Failed => self.fail(id),
        }
        self.settle(id, Some(linger));
    }

    /// Writes what waits for the client, if anything does; then ends the
    /// stream if both sides are done.
    fn write_out(&mut self, id: StreamId) {
        let Some(stream) = self.streams.get(&id) else { return };
        if stream.out.is_empty() {
            self.settle(id, None::<fn() -> (Instant, u64)>);
        } else {
            self.actions.push_back(Action::Flush(id));
        }
    }

    /// `n` of the guest's bytes were taken by the client or discarded: the
    /// guest gets its window back (in halves; none once it has closed).
    fn consumed(&mut self, id: StreamId, n: usize) {
        let Some(stream) = self.streams.get_mut(&id) else { return };
        if let Some(credit) = stream.flow.consumed(n)
            && !stream.guest_closed
        {
            self.control.push_back(Record::Credit(id, credit));
        }
    }

    /// Ends the stream once both sides are done and the client has every
    /// byte (FIN), or starts its linger when the client has not.
    fn settle(&mut self, id: StreamId, linger: Option<impl FnOnce() -> (Instant, u64)>) {
        let Some(stream) = self.streams.get_mut(&id) else { return };
        if !stream.guest_closed || stream.reading != Reading::Done {
            return;
        }
        if stream.out.is_empty() {
            self.actions.push_back(Action::Finish(id));
            self.forget(id);
        } else if !stream.lingering
            && let Some(linger) = linger
        {
            stream.lingering = true;
            let (now, acked) = linger();
            self.lingering.push_back((now, id, acked));
        }
    }

    // The guest.

    /// Acts on every record of a frame the guest sent.
    pub fn guest_frame(&mut self, frame: &[u8]) {
        let Ok(records) = streams::records(frame) else {
            self.counters.bad_frames += 1;
            return;
        };
        for record in records {
            match record {
                Ok(Record::Data(id, bytes)) => self.guest_data(id, bytes),
                Ok(Record::Close(id)) => self.guest_close(id),
                Ok(Record::Credit(id, n)) => self.guest_credit(id, n),
                Ok(Record::Stats(bytes)) => match ServiceStats::from_bytes(bytes) {
                    Some(stats) => self.counters.set_service(stats),
                    None => self.counters.bad_records += 1,
                },
                // Host-to-guest records: a guest never sends them.
                Ok(Record::Open(_) | Record::Auth(_)) => self.counters.bad_records += 1,
                Err(_) => {
                    self.counters.bad_frames += 1;
                    break;
                }
            }
        }
    }

    fn guest_data(&mut self, id: StreamId, bytes: &[u8]) {
        // Bytes for a stream that ended here are the guest's to lose.
        let Some(stream) = self.streams.get_mut(&id) else { return };
        if !stream.answered {
            // Once per stream, not on every record of the hot path.
            stream.answered = true;
            self.unanswered.remove(&id);
        }
        if stream.guest_closed {
            self.counters.bad_records += 1;
            return;
        }
        let allowed = stream.flow.received(bytes.len());
        if allowed < bytes.len() {
            self.counters.bad_records += 1;
        }
        if stream.failed {
            // The client is gone: what the guest sends now goes nowhere,
            // and the window it used comes straight back.
            self.consumed(id, allowed);
        } else {
            stream.out.extend_from_slice(&bytes[..allowed]);
            self.out_total += allowed;
        }
        self.write_out(id);
    }

    fn guest_close(&mut self, id: StreamId) {
        let Some(stream) = self.streams.get_mut(&id) else { return };
        if stream.guest_closed {
            self.counters.bad_records += 1;
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

    fn guest_credit(&mut self, id: StreamId, n: u32) {
        if let Some(stream) = self.streams.get_mut(&id) {
            stream.flow.credited(n);
            if stream.reading == Reading::Stalled && stream.flow.send_room() > 0 {
                stream.reading = Reading::Queued;
                self.read_queue.push_back(id);
            }
        }
    }

    /// The next record without bytes for the guest, if any; it stays
    /// first until [`Streams::control_sent`].
    pub fn next_control(&self) -> Option<Record<'static>> {
        self.control.front().copied()
    }

    /// The record [`Streams::next_control`] gave went into a frame.
    pub fn control_sent(&mut self) {
        self.control.pop_front();
    }

    /// The guest lost every stream (its device was reset): so do their
    /// clients, reset. Records not yet sent are void.
    pub fn reset_all(&mut self) {
        self.end_all(Action::Reset);
        self.read_queue.clear();
        self.control.clear();
    }

    /// The VM stops: every client sees a clean close.
    pub fn close_all(&mut self) {
        self.end_all(Action::Finish);
        while let Some((id, _)) = self.waiting.pop_front() {
            self.actions.push_back(Action::Forget(id));
        }
    }

    /// Ends every stream: `how` (a reset or a clean close), then forgotten.
    fn end_all(&mut self, how: fn(StreamId) -> Action) {
        let ids: Vec<StreamId> = self.streams.keys().copied().collect();
        for id in ids {
            self.actions.push_back(how(id));
            self.forget(id);
        }
    }

    // Limits.

    /// Resets the clients furthest behind until the guest's bytes waiting
    /// for clients are within the budget; the guest hears they have gone.
    pub fn shed(&mut self) {
        while self.out_total > self.limits.out_budget {
            let Some((&id, _)) = self.streams.iter().max_by_key(|(_, s)| s.out.len()) else { return };
            self.actions.push_back(Action::Reset(id));
            self.counters.shed_clients += 1;
            self.fail(id);
            self.write_out(id);
        }
    }

    /// Resets the oldest client the guest has not answered; the guest
    /// hears it has gone. False when every client has been answered, or
    /// too many dropped are still open.
    fn drop_oldest_unanswered(&mut self) -> bool {
        // A guest that never closes what it is told has gone must not let
        // the streams held here grow without end.
        if self.dropping >= self.limits.max_connections {
            return false;
        }
        let Some(id) = self.unanswered.pop_first() else { return false };
        let Some(stream) = self.streams.get_mut(&id) else { return false };
        stream.dropped = true;
        self.actions.push_back(Action::Reset(id));
        self.dropping += 1;
        self.counters.silent_clients_dropped += 1;
        self.fail(id);
        self.write_out(id);
        true
    }

    /// When [`Streams::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let lingering = self.lingering.front().map(|&(since, _, _)| since);
        let ending = self.ending.first_key_value().map(|(&(since, _), _)| since);
        let linger = lingering.into_iter().chain(ending).min().map(|since| since + self.limits.linger);
        let tokens = self.waits.first_key_value().map(|(&(at, _), _)| at);
        linger.into_iter().chain(tokens).min()
    }

    /// Resets the clients that took none of their last bytes in time;
    /// `acked` says what a client has acknowledged now.
    pub fn handle_timeout(&mut self, now: Instant, mut acked: impl FnMut(StreamId) -> u64) {
        if self.limiter.is_some() {
            self.tick(now);
            self.resume(now);
        }
        let linger = self.limits.linger;
        while let Some(&(since, id, before)) = self.lingering.front() {
            if now < since + linger {
                break;
            }
            self.lingering.pop_front();
            // The stream may have finished meanwhile (then it is gone).
            if !self.streams.contains_key(&id) {
                continue;
            }
            let acked_now = acked(id);
            if acked_now > before {
                // Slow, but it reads: it waits again.
                self.lingering.push_back((now, id, acked_now));
                continue;
            }
            self.actions.push_back(Action::Reset(id));
            self.drop_out(id);
            self.forget(id);
        }
        while let Some((&(since, id), &before)) = self.ending.first_key_value() {
            if now < since + linger {
                break;
            }
            self.ending.remove(&(since, id));
            if !self.streams.contains_key(&id) {
                continue;
            }
            let acked_now = acked(id);
            let Some(stream) = self.streams.get_mut(&id) else { continue };
            if acked_now > before {
                stream.ended = Some(now);
                self.ending.insert((now, id), acked_now);
                continue;
            }
            // A client that finished sending and takes none of its answers:
            // what the guest still sends goes nowhere and its window comes
            // back, so the guest closes the stream too (which ends it).
            stream.ended = None;
            self.actions.push_back(Action::Reset(id));
            self.client_failed(id);
        }
    }

    // The ends of a stream.

    /// Nothing more of the client's goes to the guest, which hears `Close`
    /// (once).
    fn stop_reading(&mut self, id: StreamId) {
        if let Some(stream) = self.streams.get_mut(&id)
            && stream.reading != Reading::Done
        {
            stream.reading = Reading::Done;
            self.control.push_back(Record::Close(id));
        }
    }

    /// The client is gone: the guest hears so, and what the client will
    /// never read is discarded.
    fn fail(&mut self, id: StreamId) {
        self.stop_reading(id);
        self.drop_out(id);
    }

    /// Discards what a failed client will never read.
    fn drop_out(&mut self, id: StreamId) {
        let Some(stream) = self.streams.get_mut(&id) else { return };
        stream.failed = true;
        let discarded = std::mem::take(&mut stream.out).len();
        self.out_total -= discarded;
        self.consumed(id, discarded);
    }

    fn forget(&mut self, id: StreamId) {
        if let Some(stream) = self.streams.remove(&id) {
            if let Some(since) = stream.ended {
                self.ending.remove(&(since, id));
            }
            if !stream.answered {
                self.unanswered.remove(&id);
            }
            self.out_total -= stream.out.len();
            self.dropping -= usize::from(stream.dropped);
            self.actions.push_back(Action::Forget(id));
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
#[path = "streams_tests.rs"]
mod tests;
