//! How long the guest looks for work before it parks on
//! [`ports::WAIT`](crate::ports::WAIT): a park and its wake-up cost two VM
//! exits and a host thread's wake-up (74–150 µs for the wake-up alone under
//! nested virtualization, `docs/platform-notes.md`), where the next frame
//! of a busy stream often comes sooner than that.
//!
//! Owns the look's length, adapted as KVM adapts its halt polling. Never
//! looks longer than [`POLL_MAX_NS`]; whether to look at all (only while
//! traffic flows, so an idle tenant costs nothing) is the caller's. A look
//! takes a CPU that other threads of the host may want (the tenant's own
//! net thread, its clients on the same machine): a look during which the
//! guest lost its CPU ([`PREEMPTED_NS`]) ends, and the next ones are short.
//! Work that keeps coming while the guest looks ([`FLOWING_FINDS`] looks in
//! a row finding it within [`FLOWING_NS`]) needs no look: a park's wake-up
//! is hidden behind the frames already on their way, and a look there only
//! keeps a CPU from the threads that make those frames. Then only every
//! [`REST_IDLES`]th wait looks, to notice when the flow stops.

/// The shortest look.
pub const POLL_MIN_NS: u64 = 30_000;
/// The longest look: a client that answers at once (request and response,
/// a publisher waiting for its PUBACK) comes back within a round trip of
/// the host's TCP and its own code, 100–300 µs.
pub const POLL_MAX_NS: u64 = 300_000;

/// A gap this long between two steps of a look means the host ran
/// something else on the guest's CPU meanwhile: a step is a few
/// nanoseconds, a host timer tick or an exit a few microseconds.
pub const PREEMPTED_NS: u64 = 50_000;

/// A look that finds work sooner than this found it flowing: a client
/// waiting for an answer comes back after a round trip of the host's TCP
/// and its own code (100–300 µs), a stream of pipelined packets within a
/// few tens of microseconds.
pub const FLOWING_NS: u64 = 40_000;

/// Looks in a row that found work flowing before the guest stops looking.
/// A request/response client gives one quick find (its acknowledgement
/// and next request come together) for every slow one, so it keeps its
/// looks.
pub const FLOWING_FINDS: u32 = 4;

/// While work flows, one wait in this many looks; the others park at once.
pub const REST_IDLES: u32 = 16;

/// The length of the next look. A wait that a longer look would have
/// covered (work came within [`POLL_MAX_NS`]) doubles it; a wait longer
/// than that halves it. A tenant whose clients answer at once then never
/// parks between their messages, and one with sparse traffic looks
/// [`POLL_MIN_NS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollWindow {
    ns: u64,
    /// Looks in a row that found work within [`FLOWING_NS`].
    quick_finds: u32,
    /// Waits since the last look while work flows.
    rested: u32,
}

impl Default for PollWindow {
    fn default() -> Self {
        PollWindow { ns: POLL_MIN_NS, quick_finds: 0, rested: 0 }
    }
}

impl PollWindow {
    /// Whether this wait looks before it parks: not while work flows,
    /// except every [`REST_IDLES`]th wait.
    pub fn looks(&mut self) -> bool {
        if self.quick_finds < FLOWING_FINDS {
            return true;
        }
        self.rested += 1;
        if self.rested < REST_IDLES {
            return false;
        }
        self.rested = 0;
        true
    }

    /// Learns from a look that found work `after_ns` into it.
    pub fn found(&mut self, after_ns: u64) {
        if after_ns < FLOWING_NS {
            self.quick_finds = self.quick_finds.saturating_add(1);
        } else {
            self.quick_finds = 0;
        }
    }

    /// How long to look before parking, in nanoseconds.
    pub fn ns(&self) -> u64 {
        self.ns
    }

    /// Learns from one wait that looked and then parked: it lasted
    /// `waited_ns` in all and ended with work waiting or not.
    pub fn parked(&mut self, waited_ns: u64, work: bool) {
        self.quick_finds = 0;
        if waited_ns > POLL_MAX_NS {
            self.ns = (self.ns / 2).max(POLL_MIN_NS);
        } else if work {
            self.ns = (self.ns * 2).min(POLL_MAX_NS);
        }
        // Neither: a wake-up without work (a timer, or the VMM's note of
        // frames the look already took) says nothing about the next one.
    }

    /// Learns that a look lost its CPU to another thread: the host has no
    /// CPU to spare for looking, so the next looks are the shortest.
    pub fn preempted(&mut self) {
        self.ns = POLL_MIN_NS;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_look_grows_when_a_longer_one_would_have_served_and_shrinks_when_not() {
        let mut poll = PollWindow::default();
        poll.parked(120_000, true);
        assert_eq!(poll.ns(), 2 * POLL_MIN_NS);
        for _ in 0..10 {
            poll.parked(200_000, true);
        }
        assert_eq!(poll.ns(), POLL_MAX_NS, "capped");
        poll.parked(5_000, false);
        assert_eq!(poll.ns(), POLL_MAX_NS, "a wake-up without work teaches nothing");
        poll.parked(POLL_MAX_NS + 1, true);
        assert_eq!(poll.ns(), POLL_MAX_NS / 2);
        for _ in 0..10 {
            poll.parked(10_000_000, false);
        }
        assert_eq!(poll.ns(), POLL_MIN_NS, "floored");
        for _ in 0..10 {
            poll.parked(200_000, true);
        }
        poll.preempted();
        assert_eq!(poll.ns(), POLL_MIN_NS, "a look that lost its CPU ends the long ones");
    }

    /// How many of `waits` waits look.
    fn looking(poll: &mut PollWindow, waits: u32) -> u32 {
        (0..waits).map(|_| u32::from(poll.looks())).sum()
    }

    #[test]
    fn work_that_keeps_flowing_is_not_looked_for_until_it_stops() {
        let mut poll = PollWindow::default();
        assert_eq!(looking(&mut poll, 10), 10, "a new guest looks");
        for _ in 0..FLOWING_FINDS - 1 {
            poll.found(FLOWING_NS - 1);
        }
        assert_eq!(looking(&mut poll, 10), 10, "not yet flowing");
        poll.found(FLOWING_NS - 1);
        assert_eq!(looking(&mut poll, 10 * REST_IDLES), 10, "flowing: one wait in REST_IDLES looks");
        poll.found(FLOWING_NS - 1);
        assert_eq!(looking(&mut poll, REST_IDLES), 1, "a quick find keeps it resting");
        poll.found(FLOWING_NS);
        assert_eq!(looking(&mut poll, 10), 10, "a slow find: looking again");
    }

    #[test]
    fn a_request_response_client_keeps_its_looks() {
        let mut poll = PollWindow::default();
        for _ in 0..100 {
            // Its acknowledgement, then its next request a round trip later.
            poll.found(5_000);
            poll.found(150_000);
        }
        assert_eq!(looking(&mut poll, 10), 10);
        for _ in 0..FLOWING_FINDS {
            poll.found(5_000);
        }
        poll.parked(400_000, true);
        assert_eq!(looking(&mut poll, 10), 10, "a park ends the flow");
    }
}
