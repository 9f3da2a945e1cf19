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

/// The length of the next look. A wait that a longer look would have
/// covered (work came within [`POLL_MAX_NS`]) doubles it; a wait longer
/// than that halves it. A tenant whose clients answer at once then never
/// parks between their messages, and one with sparse traffic looks
/// [`POLL_MIN_NS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollWindow {
    ns: u64,
}

impl Default for PollWindow {
    fn default() -> Self {
        PollWindow { ns: POLL_MIN_NS }
    }
}

impl PollWindow {
    /// How long to look before parking, in nanoseconds.
    pub fn ns(&self) -> u64 {
        self.ns
    }

    /// Learns from one wait that looked and then parked: it lasted
    /// `waited_ns` in all and ended with work waiting or not.
    pub fn parked(&mut self, waited_ns: u64, work: bool) {
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
}
