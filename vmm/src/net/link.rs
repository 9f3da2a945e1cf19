//! A smoltcp `Device` over two frame queues: frames the guest sent (to be
//! received by the host stack) and frames the host stack sent (waiting for
//! room in the guest's RX queue).
//!
//! Owns the bound on frames waiting for the guest: past it, new frames are
//! dropped (and counted) and TCP retransmits, so a guest that stops reading
//! cannot make the host buffer grow without limit.

use std::collections::VecDeque;

use smoltcp::phy::{self, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use crate::devices::virtio::net::NetBackend;

/// Frames waiting for guest RX buffers, at most.
pub const MAX_QUEUED_TO_GUEST: usize = 512;

/// The host stack's view of the virtual link.
#[derive(Default)]
pub struct FrameLink {
    /// Frames from the guest, oldest first.
    pub from_guest: VecDeque<Vec<u8>>,
    /// Frames for the guest, oldest first.
    pub to_guest: VecDeque<Vec<u8>>,
    /// Frames dropped because `to_guest` was full.
    pub dropped_to_guest: u64,
    /// Frames ever queued for the guest (tells the proxy the stack sent some).
    pub sent_to_guest: u64,
    max_frame: usize,
}

impl FrameLink {
    /// A link carrying Ethernet frames of at most `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        FrameLink { max_frame, ..FrameLink::default() }
    }
}

/// Capabilities both ends of the link use. Checksums are neither computed nor
/// checked: frames only ever move through memory of this process and its
/// guest, where nothing can corrupt them in flight.
pub fn capabilities(max_frame: usize) -> DeviceCapabilities {
    let mut caps = DeviceCapabilities::default();
    caps.medium = Medium::Ethernet;
    caps.max_transmission_unit = max_frame;
    caps.checksum = ChecksumCapabilities::ignored();
    caps
}

pub struct RxToken(Vec<u8>);
pub struct TxToken<'a>(&'a mut FrameLink);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0u8; len];
        let result = f(&mut frame);
        if self.0.to_guest.len() < MAX_QUEUED_TO_GUEST && len <= self.0.max_frame {
            self.0.to_guest.push_back(frame);
            self.0.sent_to_guest += 1;
        } else {
            self.0.dropped_to_guest += 1;
        }
        result
    }
}

impl phy::Device for FrameLink {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: Instant) -> Option<(RxToken, TxToken<'_>)> {
        let frame = self.from_guest.pop_front()?;
        Some((RxToken(frame), TxToken(self)))
    }

    fn transmit(&mut self, _: Instant) -> Option<TxToken<'_>> {
        Some(TxToken(self))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        capabilities(self.max_frame)
    }
}

/// The virtio-net device's backend: its frames come from and go to the host stack.
impl NetBackend for FrameLink {
    fn frames_from_guest(&mut self) -> &mut VecDeque<Vec<u8>> {
        &mut self.from_guest
    }

    fn frames_to_guest(&mut self) -> &mut VecDeque<Vec<u8>> {
        &mut self.to_guest
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::phy::{Device, RxToken as _, TxToken as _};

    #[test]
    fn frames_flow_both_ways_in_order() {
        let mut link = FrameLink::new(100);
        link.from_guest.push_back(vec![1]);
        link.from_guest.push_back(vec![2]);
        let (rx, _) = link.receive(Instant::ZERO).unwrap();
        assert_eq!(rx.consume(|f| f.to_vec()), vec![1]);
        link.transmit(Instant::ZERO).unwrap().consume(3, |f| f.copy_from_slice(&[7, 8, 9]));
        assert_eq!(link.to_guest.pop_front(), Some(vec![7, 8, 9]));
    }

    #[test]
    fn a_full_queue_to_the_guest_drops_and_counts() {
        let mut link = FrameLink::new(100);
        for _ in 0..MAX_QUEUED_TO_GUEST + 5 {
            link.transmit(Instant::ZERO).unwrap().consume(10, |_| ());
        }
        assert_eq!(link.to_guest.len(), MAX_QUEUED_TO_GUEST);
        assert_eq!(link.dropped_to_guest, 5);
    }
}
