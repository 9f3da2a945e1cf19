//! The two frame queues between the virtio-net device and the proxy: frames
//! the guest sent, and frames waiting for room in the guest's RX queue.
//!
//! Owns their bounds. Frames for the guest are never dropped (the link is
//! lossless; streams have no retransmission): the proxy stops producing
//! while [`FrameLink::has_room_for_guest`] is false. Frames from the guest
//! are bounded by the device's TX batch per visit.

use std::collections::VecDeque;

use crate::devices::virtio::net::NetBackend;

/// Frames waiting for guest RX buffers before the proxy stops reading
/// clients: as many as the guest posts RX buffers.
pub const MAX_QUEUED_TO_GUEST: usize = 64;

/// The proxy's view of the virtual link.
#[derive(Default)]
pub struct FrameLink {
    /// Frames from the guest, oldest first.
    pub from_guest: VecDeque<Vec<u8>>,
    /// Frames for the guest, oldest first.
    pub to_guest: VecDeque<Vec<u8>>,
}

impl FrameLink {
    /// True while another frame for the guest may be queued.
    pub fn has_room_for_guest(&self) -> bool {
        self.to_guest.len() < MAX_QUEUED_TO_GUEST
    }
}

/// The virtio-net device's backend: its frames come from and go to the proxy.
impl NetBackend for FrameLink {
    fn frames_from_guest(&mut self) -> &mut VecDeque<Vec<u8>> {
        &mut self.from_guest
    }

    fn frames_to_guest(&mut self) -> &mut VecDeque<Vec<u8>> {
        &mut self.to_guest
    }
}
