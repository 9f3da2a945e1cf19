//! Telling a driver that notifies in a loop from one that works: each
//! notification costs the host an exit and a wake-up of a device thread,
//! which a tenant's neighbours feel. A driver notifies once per burst (and
//! not at all while the device is busy); a guest that notifies far more
//! often than there is work, for a whole second, is stopped.
//!
//! Owns the per-second count. Never stops anything itself: the device's
//! thread says why through the VM's [`GiveUp`].

use std::time::{Duration, Instant};

use crate::devices::{GiveUp, StopReason};

/// Notifications in a second past which, with a hundred times fewer units
/// of work (frames, requests) done, the guest is in a loop.
pub const NOTIFY_STORM: u64 = 50_000;

/// The current second of one device's notifications.
pub struct NotifyStorm {
    /// The device, for the reason ("network", "block").
    device: &'static str,
    /// What one unit of work is called ("frames", "requests").
    work: &'static str,
    start: Instant,
    notifications: u64,
    /// Work done in all, at the start of this second.
    work_before: u64,
}

impl NotifyStorm {
    pub fn new(device: &'static str, work: &'static str) -> Self {
        NotifyStorm { device, work, start: Instant::now(), notifications: 0, work_before: 0 }
    }

    /// Counts `count` notifications, with `work_total` units of work done
    /// so far; in a storm, gives up on the guest through `give_up` and
    /// returns true.
    pub fn notified(&mut self, count: u64, work_total: u64, give_up: &GiveUp) -> bool {
        if self.start.elapsed() >= Duration::from_secs(1) {
            (self.start, self.notifications, self.work_before) = (Instant::now(), 0, work_total);
        }
        self.notifications += count;
        let done = work_total.saturating_sub(self.work_before);
        let storm =
            self.notifications > NOTIFY_STORM && self.notifications > done.saturating_add(1).saturating_mul(100);
        if storm {
            give_up.give_up(StopReason::NotifyStorm {
                device: self.device,
                notifications: self.notifications,
                done,
                work: self.work,
            });
        }
        storm
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_far_beyond_the_work_in_a_second_are_a_storm() {
        let give_up = GiveUp::default();
        let mut storm = NotifyStorm::new("network", "frames");
        // As many notifications as frames: a working driver, however busy.
        assert!(!storm.notified(60_000, 60_000, &give_up));
        assert!(give_up.reason().is_none());
        // A hundred times more notifications than frames: a loop.
        assert!(storm.notified(7_000_000, 60_000, &give_up));
        let why = give_up.reason().unwrap().to_string();
        assert!(why.contains("notified its network device 7060000 times"), "{why}");
        // The first reason stands.
        assert!(storm.notified(9_000_000, 60_000, &give_up));
        assert_eq!(give_up.reason().unwrap().to_string(), why);
    }
}
