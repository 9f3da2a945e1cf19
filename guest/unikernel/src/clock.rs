//! Time for the guest: a TSC clock calibrated from boot-info, and sleeping.
//!
//! Owns the conversion from TSC ticks to nanoseconds. `rdtsc` runs natively at
//! CPL 3, so reading the clock never exits; only `wait_until` does. Must never
//! spin-wait: an idle guest parks in the VMM instead of burning a host core.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::paravirt;

static TSC_KHZ: AtomicU64 = AtomicU64::new(0);
static START_TSC: AtomicU64 = AtomicU64::new(0);

/// Nanoseconds since the guest's `_start`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Instant(u64);

impl Instant {
    /// The guest's `_start`.
    pub const START: Instant = Instant(0);

    /// This instant plus `ns` nanoseconds (saturating).
    pub fn plus_ns(self, ns: u64) -> Instant {
        Instant(self.0.saturating_add(ns))
    }

    /// Microseconds since `_start`.
    pub fn as_micros(self) -> u64 {
        self.0 / 1000
    }

    /// Nanoseconds from `earlier` to `self` (0 if `earlier` is later).
    pub fn ns_since(self, earlier: Instant) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: `rdtsc` reads a counter into registers; the VMM leaves CR4.TSD
    // clear, so it is allowed at CPL 3 and has no memory effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Sets the calibration. `tsc_khz` must be non-zero.
pub fn init(tsc_khz: u64, start_tsc: u64) {
    TSC_KHZ.store(tsc_khz, Ordering::Relaxed);
    START_TSC.store(start_tsc, Ordering::Relaxed);
}

/// Converts a TSC tick count to nanoseconds (saturating).
pub fn ticks_to_ns(ticks: u64) -> u64 {
    let khz = TSC_KHZ.load(Ordering::Relaxed).max(1);
    let ns = u128::from(ticks) * 1_000_000 / u128::from(khz);
    u64::try_from(ns).unwrap_or(u64::MAX)
}

/// The current time.
pub fn now() -> Instant {
    Instant(ticks_to_ns(rdtsc().wrapping_sub(START_TSC.load(Ordering::Relaxed))))
}

/// Parks the vCPU until `deadline`. The VMM may wake the guest early when it
/// has work, so this re-parks until the deadline has really passed.
pub fn wait_until(deadline: Instant) {
    loop {
        let now = now();
        if now >= deadline {
            return;
        }
        paravirt::wait_ns(deadline.ns_since(now));
    }
}
