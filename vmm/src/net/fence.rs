//! The fence of a tenant's process in a fleet: a deadline past which it
//! must not answer any client, because its node may have lost the lease
//! under which it owns the tenant (and another node may then run it).
//!
//! `mqvisor serve` in a fleet sends its tenant processes a [`FENCE`]
//! datagram on the handoff socket each time its lease is renewed: the
//! moment its own fence falls, as the host's `CLOCK_MONOTONIC` in
//! nanoseconds (8 bytes, little-endian). An absolute time on a clock every
//! process of the host shares, so a datagram read late (a process that was
//! stopped, or busy) never moves the deadline later. Without such a
//! datagram (no fleet) a process has no deadline.
//!
//! Owns the datagram's encoding and the deadline's arithmetic. The daemon
//! fences too (it kills its tenants at the same moment); this is what
//! still holds when the daemon itself is stalled or stopped while its
//! tenants run on. Never trusts the datagram beyond its shape: a deadline
//! only ever ends service sooner or later, never grants anything else.

use std::time::{Duration, Instant};

/// Byte 0 of a handoff datagram that carries a fence deadline rather than
/// a client (see `ingress`'s module doc).
pub const FENCE: u8 = 0x81;

/// Length of a fence datagram: the kind, then the deadline.
pub const FENCE_LEN: usize = 9;

/// The host's `CLOCK_MONOTONIC` now, nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `now` is a valid, writable timespec for the call's duration;
    // CLOCK_MONOTONIC exists on every Linux this runs on.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    u64::try_from(now.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(now.tv_nsec).unwrap_or(0))
}

/// The datagram saying: serve no client after `at`.
pub fn datagram(at: Instant) -> [u8; FENCE_LEN] {
    let now = Instant::now();
    let ns = monotonic_ns();
    let at_ns = match at.checked_duration_since(now) {
        Some(ahead) => ns.saturating_add(u64::try_from(ahead.as_nanos()).unwrap_or(u64::MAX)),
        None => ns.saturating_sub(u64::try_from(now.duration_since(at).as_nanos()).unwrap_or(u64::MAX)),
    };
    let mut datagram = [0u8; FENCE_LEN];
    datagram[0] = FENCE;
    datagram[1..].copy_from_slice(&at_ns.to_le_bytes());
    datagram
}

/// The deadline a fence datagram carries, on this process's clock, or
/// `None` for any other datagram.
pub fn deadline(datagram: &[u8]) -> Option<Instant> {
    let (&[FENCE], at) = datagram.split_at_checked(1)? else { return None };
    let at_ns = u64::from_le_bytes(at.try_into().ok()?);
    let (now, ns) = (Instant::now(), monotonic_ns());
    Some(match at_ns.checked_sub(ns) {
        Some(ahead) => now + Duration::from_nanos(ahead),
        // Already past: now is as late as it can be served.
        None => now.checked_sub(Duration::from_nanos(ns - at_ns)).unwrap_or(now),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_survives_the_datagram_on_the_same_clock() {
        let now = Instant::now();
        for at in [now + Duration::from_secs(4), now + Duration::from_millis(1), now - Duration::from_millis(30)] {
            let read = deadline(&datagram(at)).unwrap();
            let apart = if read > at { read - at } else { at - read };
            assert!(apart < Duration::from_millis(5), "{at:?} read as {read:?}");
        }
    }

    #[test]
    fn a_datagram_read_late_keeps_its_deadline() {
        let at = Instant::now() + Duration::from_millis(50);
        let sent = datagram(at);
        std::thread::sleep(Duration::from_millis(80));
        assert!(deadline(&sent).unwrap() <= Instant::now(), "a late read must not move the deadline later");
    }

    #[test]
    fn anything_else_is_no_deadline() {
        let mut wrong_kind = datagram(Instant::now());
        wrong_kind[0] = 0x80;
        assert_eq!(deadline(&wrong_kind), None);
        assert_eq!(deadline(&datagram(Instant::now())[..8]), None);
        assert_eq!(deadline(&[FENCE; 10]), None);
        assert_eq!(deadline(&[]), None);
    }
}
