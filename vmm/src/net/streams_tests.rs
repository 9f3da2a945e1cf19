//! The stream logic on simulated time, with the client's side played by
//! the tests: what it reads, what it takes, when it stops.

use mqvisor_boot_abi::streams::{FrameWriter, WINDOW};

use super::*;

const HALF: usize = WINDOW as usize / 2;
const LINGER: Duration = Duration::from_secs(5);

fn limits() -> Limits {
    Limits { max_connections: 4, out_budget: 4 * WINDOW as usize, linger: LINGER }
}

/// Streams whose guest link is up.
fn up(limits: Limits) -> Streams {
    let mut streams = Streams::new(limits);
    streams.set_link_up(true);
    streams
}

fn actions(streams: &mut Streams) -> Vec<Action> {
    std::iter::from_fn(|| streams.poll_action()).collect()
}

/// The records without bytes that would go to the guest now.
fn controls(streams: &mut Streams) -> Vec<Record<'static>> {
    std::iter::from_fn(|| {
        let record = streams.next_control()?;
        streams.control_sent();
        Some(record)
    })
    .collect()
}

/// A frame from the guest holding `records`.
fn frame(records: &[Record<'_>]) -> Vec<u8> {
    let mut buf = vec![0u8; 1 << 20];
    let mut writer = FrameWriter::new(&mut buf, [0; 6], [0; 6]);
    for &record in records {
        assert!(writer.control(record));
    }
    let len = writer.len();
    buf.truncate(len);
    buf
}

/// A client accepted and opened, its `Open` taken.
fn client(streams: &mut Streams) -> StreamId {
    let id = streams.accept(Vec::new()).unwrap_or_default();
    assert_eq!(controls(streams), vec![Record::Open(id)]);
    id
}

/// Plays the client for every `Flush`: it takes at most `room` bytes,
/// and has acknowledged `acked`. Returns the other actions.
fn flush(streams: &mut Streams, now: Instant, room: usize, acked: u64) -> Vec<Action> {
    let mut others = Vec::new();
    while let Some(action) = streams.poll_action() {
        match action {
            Action::Flush(id) => {
                let pending = streams.out(id).len();
                let written = pending.min(room);
                let how = if written < pending { Flushed::Blocked } else { Flushed::All };
                streams.flushed(id, written, how, || (now, acked));
            }
            other => others.push(other),
        }
    }
    others
}

#[test]
fn client_bytes_stop_at_the_window_until_the_guest_credits_them() {
    let mut streams = up(limits());
    let id = client(&mut streams);
    assert_eq!(streams.next_turn(), Some(Turn::Client { id, max: WINDOW as usize }));
    streams.client_read(id, WINDOW as usize - 100);
    assert_eq!(streams.next_turn(), Some(Turn::Client { id, max: 100 }));
    streams.client_read(id, 100);
    // The window is shut: the stream stalls and leaves the turn.
    assert_eq!(streams.next_turn(), Some(Turn::Skip));
    assert_eq!(streams.next_turn(), None);
    streams.guest_frame(&frame(&[Record::Credit(id, 1000)]));
    assert_eq!(streams.next_turn(), Some(Turn::Client { id, max: 1000 }));
    // A guest crediting more than it was sent reopens one window, no more.
    streams.guest_frame(&frame(&[Record::Credit(id, u32::MAX)]));
    assert_eq!(streams.next_turn(), None);
    streams.no_room(id);
    assert_eq!(streams.next_turn(), Some(Turn::Client { id, max: WINDOW as usize }));
    streams.client_blocked(id);
    assert_eq!(actions(&mut streams), vec![Action::WatchRead(id)]);
    streams.client_readable(id);
    assert_eq!(streams.next_turn(), Some(Turn::Client { id, max: WINDOW as usize }));
    assert_eq!(streams.counters().bytes_in, u64::from(WINDOW));
}

#[test]
fn bytes_read_before_the_handover_go_first_within_the_window() {
    let mut streams = up(limits());
    let first = vec![7u8; WINDOW as usize + 10];
    let id = streams.accept(first).unwrap_or_default();
    assert_eq!(streams.next_turn(), Some(Turn::First { id, len: WINDOW as usize }));
    assert_eq!(streams.first_bytes(id).len(), WINDOW as usize + 10);
    streams.first_sent(id, 1000);
    assert_eq!(streams.next_turn(), Some(Turn::First { id, len: WINDOW as usize - 1000 }));
    streams.first_sent(id, WINDOW as usize - 1000);
    assert_eq!(streams.next_turn(), Some(Turn::Skip));
    streams.guest_frame(&frame(&[Record::Credit(id, 4096)]));
    assert_eq!(streams.next_turn(), Some(Turn::First { id, len: 10 }));
    streams.first_sent(id, 10);
    // Only then is the client itself read.
    assert_eq!(streams.next_turn(), Some(Turn::Client { id, max: 4086 }));
}

#[test]
fn guest_bytes_are_credited_back_in_halves_once_the_client_took_them() {
    let mut streams = up(limits());
    let now = Instant::now();
    let id = client(&mut streams);
    let bytes = vec![1u8; HALF - 1];
    streams.guest_frame(&frame(&[Record::Data(id, &bytes)]));
    assert!(flush(&mut streams, now, usize::MAX, 0).is_empty());
    assert_eq!(controls(&mut streams), vec![]);
    // A client that takes only part of the next byte's record: no credit yet.
    streams.guest_frame(&frame(&[Record::Data(id, b"ab")]));
    assert_eq!(flush(&mut streams, now, 0, 0), vec![Action::WatchWrite(id)]);
    assert_eq!(controls(&mut streams), vec![]);
    streams.client_writable(id);
    assert!(flush(&mut streams, now, usize::MAX, 0).is_empty());
    assert_eq!(controls(&mut streams), vec![Record::Credit(id, WINDOW / 2 + 1)]);
    assert_eq!(streams.counters().bytes_out, HALF as u64 + 1);
    assert_eq!(streams.out(id), b"");
}

#[test]
fn guest_bytes_past_the_window_and_records_it_may_not_send_are_counted() {
    let mut streams = up(limits());
    let id = client(&mut streams);
    let window = vec![0u8; WINDOW as usize];
    streams.guest_frame(&frame(&[Record::Data(id, &window), Record::Data(id, b"over")]));
    assert_eq!(streams.out(id).len(), WINDOW as usize);
    assert_eq!(streams.counters().bad_records, 1);
    streams.guest_frame(&frame(&[Record::Open(9), Record::Close(id), Record::Close(id)]));
    assert_eq!(streams.counters().bad_records, 3);
    streams.guest_frame(&frame(&[Record::Data(id, b"after close")]));
    assert_eq!(streams.counters().bad_records, 4);
    // Not a stream frame, a truncated record, a bad service report.
    streams.guest_frame(&[0u8; 20]);
    let mut cut = frame(&[Record::Credit(id, 1)]);
    cut.pop();
    streams.guest_frame(&cut);
    streams.guest_frame(&frame(&[Record::Stats(b"short")]));
    let counters = streams.counters();
    assert_eq!((counters.bad_frames, counters.bad_records), (2, 5));
    let stats = ServiceStats { messages_in: 5, messages_out: 6, messages_dropped: 7, messages_refused: 8 };
    streams.guest_frame(&frame(&[Record::Stats(&stats.to_bytes())]));
    assert_eq!(streams.counters().messages_dropped, 7);
}

#[test]
fn a_stream_the_guest_closed_lingers_while_its_client_takes_bytes() {
    let mut streams = up(limits());
    let t0 = Instant::now();
    let done = client(&mut streams);
    let slow = client(&mut streams);
    // A client that takes everything is finished at once.
    streams.guest_frame(&frame(&[Record::Data(done, b"bye"), Record::Close(done)]));
    assert_eq!(flush(&mut streams, t0, usize::MAX, 0), vec![Action::Finish(done), Action::Forget(done)]);
    assert_eq!(controls(&mut streams), vec![Record::Close(done)]);
    // One that takes part lingers.
    streams.guest_frame(&frame(&[Record::Data(slow, &[0; 100]), Record::Close(slow)]));
    assert_eq!(flush(&mut streams, t0, 40, 1000), vec![Action::WatchWrite(slow), Action::WatchWrite(slow)]);
    assert_eq!(streams.poll_timeout(), Some(t0 + LINGER));
    // It acknowledged more meanwhile: it waits again.
    streams.handle_timeout(t0 + LINGER, |_| 1010);
    assert_eq!(actions(&mut streams), vec![]);
    assert_eq!(streams.poll_timeout(), Some(t0 + 2 * LINGER));
    streams.handle_timeout(t0 + 2 * LINGER - Duration::from_millis(1), |_| 1010);
    assert_eq!(actions(&mut streams), vec![]);
    // Then nothing: it is reset and forgotten.
    streams.handle_timeout(t0 + 2 * LINGER, |_| 1010);
    assert_eq!(actions(&mut streams), vec![Action::Reset(slow), Action::Forget(slow)]);
    assert_eq!(streams.poll_timeout(), None);
    assert_eq!(streams.counters().connections, 0);
}

#[test]
fn past_the_budget_the_client_furthest_behind_is_shed() {
    let mut streams = up(Limits { out_budget: 1000, ..limits() });
    let now = Instant::now();
    let (slow, slower) = (client(&mut streams), client(&mut streams));
    streams.guest_frame(&frame(&[Record::Data(slow, &[0; 300]), Record::Data(slower, &[0; 800])]));
    flush(&mut streams, now, 0, 0);
    streams.shed();
    assert_eq!(actions(&mut streams), vec![Action::Reset(slower)]);
    assert_eq!(controls(&mut streams), vec![Record::Close(slower)]);
    assert_eq!((streams.out(slower).len(), streams.out(slow).len()), (0, 300));
    assert_eq!(streams.counters().shed_clients, 1);
    // What the guest sends it now goes nowhere, and its window comes back.
    let half = vec![0u8; HALF];
    streams.guest_frame(&frame(&[Record::Data(slower, &half)]));
    assert_eq!(streams.out(slower).len(), 0);
    assert_eq!(controls(&mut streams), vec![Record::Credit(slower, WINDOW / 2 + 800)]);
    // The guest closes it: it ends.
    streams.guest_frame(&frame(&[Record::Close(slower)]));
    assert_eq!(actions(&mut streams), vec![Action::Finish(slower), Action::Forget(slower)]);
    streams.shed();
    assert_eq!(actions(&mut streams), vec![]);
}

#[test]
fn at_the_limit_the_oldest_silent_client_makes_room_for_a_new_one() {
    let mut streams = up(Limits { max_connections: 2, ..limits() });
    let (silent, answered) = (client(&mut streams), client(&mut streams));
    streams.guest_frame(&frame(&[Record::Data(answered, b"CONNACK")]));
    flush(&mut streams, Instant::now(), usize::MAX, 0);
    let new = streams.accept(Vec::new()).unwrap_or_default();
    assert_eq!(actions(&mut streams), vec![Action::Reset(silent)]);
    assert_eq!(controls(&mut streams), vec![Record::Close(silent), Record::Open(new)]);
    assert_eq!(streams.counters().silent_clients_dropped, 1);
    // The dropped stream stays until the guest closes it, but no longer counts.
    assert_eq!(streams.counters().connections, 3);
    streams.guest_frame(&frame(&[Record::Data(new, b"CONNACK")]));
    flush(&mut streams, Instant::now(), usize::MAX, 0);
    // Every client answered: a new one is refused, nobody else sees anything.
    assert_eq!(streams.accept(Vec::new()), None);
    assert_eq!(actions(&mut streams), vec![]);
    streams.guest_frame(&frame(&[Record::Close(silent)]));
    assert_eq!(actions(&mut streams), vec![Action::Finish(silent), Action::Forget(silent)]);
    assert_eq!(streams.accept(Vec::new()), None);
}

#[test]
fn a_guest_that_never_closes_dropped_streams_cannot_grow_them_without_end() {
    let mut streams = up(Limits { max_connections: 2, ..limits() });
    client(&mut streams);
    client(&mut streams);
    // Each new client drops a silent one, until as many are dropped as may
    // be carried at once.
    for _ in 0..2 {
        assert!(streams.accept(Vec::new()).is_some());
    }
    assert_eq!(streams.counters().silent_clients_dropped, 2);
    assert_eq!(streams.accept(Vec::new()), None);
    assert_eq!(streams.counters().silent_clients_dropped, 2);
    assert_eq!(streams.counters().connections, 4);
}

#[test]
fn a_half_closed_client_gets_its_answers_then_a_clean_close() {
    let mut streams = up(limits());
    let now = Instant::now();
    let id = client(&mut streams);
    assert_eq!(streams.next_turn(), Some(Turn::Client { id, max: WINDOW as usize }));
    streams.client_read(id, 14);
    assert_eq!(streams.next_turn(), Some(Turn::Client { id, max: WINDOW as usize - 14 }));
    streams.client_ended(now, id, 0);
    assert_eq!(controls(&mut streams), vec![Record::Close(id)]);
    assert_eq!(streams.poll_timeout(), Some(now + LINGER));
    // Nothing more is read; the guest answers and closes.
    assert_eq!(streams.next_turn(), None);
    streams.guest_frame(&frame(&[Record::Data(id, b"CONNACK PUBACK"), Record::Close(id)]));
    assert_eq!(flush(&mut streams, now, usize::MAX, 0), vec![Action::Finish(id), Action::Forget(id)]);
    assert_eq!(streams.poll_timeout(), None);
}

#[test]
fn a_half_closed_client_that_takes_no_answers_loses_its_place() {
    let mut streams = up(limits());
    let t0 = Instant::now();
    let id = client(&mut streams);
    streams.client_ended(t0, id, 50);
    controls(&mut streams);
    streams.guest_frame(&frame(&[Record::Data(id, &[0; 64])]));
    flush(&mut streams, t0, 0, 50);
    // It read some meanwhile: it waits again.
    streams.handle_timeout(t0 + LINGER, |_| 60);
    assert_eq!(actions(&mut streams), vec![]);
    assert_eq!(streams.poll_timeout(), Some(t0 + 2 * LINGER));
    // It read nothing more: reset; the guest's bytes go nowhere, and the
    // guest closes, which ends the stream.
    streams.handle_timeout(t0 + 2 * LINGER, |_| 60);
    assert_eq!(actions(&mut streams), vec![Action::Reset(id)]);
    assert_eq!(streams.out(id), b"");
    streams.guest_frame(&frame(&[Record::Close(id)]));
    assert_eq!(actions(&mut streams), vec![Action::Finish(id), Action::Forget(id)]);
    assert_eq!(streams.poll_timeout(), None);
}

#[test]
fn a_failed_client_ends_its_stream_once_the_guest_closes() {
    let mut streams = up(limits());
    let now = Instant::now();
    let id = client(&mut streams);
    streams.guest_frame(&frame(&[Record::Data(id, b"hello")]));
    assert_eq!(actions(&mut streams), vec![Action::Flush(id)]);
    streams.flushed(id, 2, Flushed::Failed, || (now, 0));
    assert_eq!(controls(&mut streams), vec![Record::Close(id)]);
    assert_eq!(streams.out(id), b"");
    // Its turn to be read comes to nothing.
    assert_eq!(streams.next_turn(), Some(Turn::Skip));
    streams.guest_frame(&frame(&[Record::Close(id)]));
    assert_eq!(actions(&mut streams), vec![Action::Finish(id), Action::Forget(id)]);
    // A read that fails does the same.
    let other = client(&mut streams);
    streams.client_failed(other);
    assert_eq!(controls(&mut streams), vec![Record::Close(other)]);
}

#[test]
fn clients_wait_for_the_link_and_a_device_reset_drops_them_all() {
    let mut streams = Streams::new(limits());
    let early = streams.accept(b"CONNECT".to_vec()).unwrap_or_default();
    assert_eq!(streams.next_control(), None);
    assert!(!streams.open_waiting());
    streams.set_link_up(true);
    assert!(streams.open_waiting());
    assert_eq!(controls(&mut streams), vec![Record::Open(early)]);
    let late = client(&mut streams);
    streams.guest_frame(&frame(&[Record::Data(late, b"x")]));
    streams.reset_all();
    assert_eq!(actions(&mut streams).iter().filter(|a| matches!(a, Action::Reset(_) | Action::Forget(_))).count(), 4);
    assert_eq!((streams.next_control(), streams.next_turn()), (None, None));
    assert_eq!(streams.counters().connections, 0);
}

#[test]
fn a_stopping_vm_closes_every_client_cleanly() {
    let mut streams = up(limits());
    let open = client(&mut streams);
    streams.set_link_up(false);
    let waiting = streams.accept(Vec::new()).unwrap_or_default();
    streams.close_all();
    assert_eq!(actions(&mut streams), vec![Action::Finish(open), Action::Forget(open), Action::Forget(waiting)]);
}
