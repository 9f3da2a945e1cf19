//! The virtio-net device model (virtio 1.2, section 5.1): queue 0 receives
//! (host to guest), queue 1 transmits (guest to host).
//!
//! Owns turning TX descriptor chains into Ethernet frames and writing frames
//! into RX chains. Every chain is validated before use: directions (TX
//! buffers device-readable only, RX buffers device-writable only), total
//! length against the link's largest frame, and every address range against
//! guest memory (through `virtio-queue`'s `Reader`/`Writer`, which never touch
//! memory outside guest RAM). A malformed chain is returned to the guest with
//! length 0 and counted; an avail ring that runs past the queue is a broken
//! driver: a [`RingFault`], counted, kept for the report, and the device
//! needs a reset. It never panics.

use std::collections::VecDeque;
use std::io::{Read, Write};

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use super::metrics::NetMetrics;
use super::{DEVICE_ID, ETH_HDR_LEN, NET_HDR_LEN, QUEUE_SIZE, RX_QUEUE, RingFault, TX_QUEUE, VIRTIO_NET_F_MAC};
use crate::devices::virtio::{
    ActivateError, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1, VirtioDevice, read_config_bytes,
};

struct Active {
    rx: Queue,
    tx: Queue,
    mem: GuestMemoryMmap,
}

/// A virtio-net device; frames go to and come from whoever drives it.
pub struct NetDevice {
    mac: [u8; 6],
    /// Largest Ethernet frame (without the virtio header) either way.
    max_frame: usize,
    active: Option<Active>,
    metrics: NetMetrics,
    /// The most recent ring fault, for the report.
    last_fault: Option<RingFault>,
}

/// Why a chain was refused.
#[derive(Debug, PartialEq, Eq)]
enum ChainError {
    WrongDirection,
    /// Longer than the queue: it loops, or points at a bad index.
    Loop,
    TooLong,
    TooShort,
    Memory,
}

impl NetDevice {
    /// A device with `mac`, carrying frames of at most `max_frame` bytes.
    pub fn new(mac: [u8; 6], max_frame: usize) -> Self {
        NetDevice { mac, max_frame, active: None, metrics: NetMetrics::default(), last_fault: None }
    }

    /// The device's counters.
    pub fn metrics(&self) -> &NetMetrics {
        &self.metrics
    }

    /// The most recent ring fault, if the driver ever broke a ring.
    pub fn last_fault(&self) -> Option<&RingFault> {
        self.last_fault.as_ref()
    }

    /// Takes the most recent ring fault, for the report at the end.
    pub fn take_last_fault(&mut self) -> Option<RingFault> {
        self.last_fault.take()
    }

    /// Counts a ring fault and keeps it for the report.
    pub fn record_fault(&mut self, fault: RingFault) {
        NetMetrics::bump(&self.metrics.ring_faults, 1);
        self.last_fault = Some(fault);
    }

    /// Moves the frames the guest transmitted into `out`, at most `limit`.
    /// Returns how many chains were consumed (frames plus refused chains).
    pub fn pop_tx_frames(&mut self, out: &mut VecDeque<Vec<u8>>, limit: usize) -> Result<usize, RingFault> {
        let max_chain = NET_HDR_LEN + self.max_frame;
        let Some(active) = self.active.as_mut() else { return Ok(0) };
        let mut consumed = 0;
        while consumed < limit {
            let chain = match active.tx.iter(&active.mem) {
                Ok(mut iter) => iter.next(),
                Err(e) => return Err(fault(TX_QUEUE, e)),
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            match read_frame(chain, &active.mem, max_chain) {
                Ok(frame) => {
                    NetMetrics::bump(&self.metrics.tx_frames, 1);
                    NetMetrics::bump(&self.metrics.tx_bytes, frame.len() as u64);
                    out.push_back(frame);
                }
                Err(_) => NetMetrics::bump(&self.metrics.tx_malformed, 1),
            }
            active.tx.add_used(&active.mem, head, 0).map_err(|e| fault(TX_QUEUE, e))?;
            consumed += 1;
        }
        Ok(consumed)
    }

    /// Writes frames from the front of `frames` into the guest's RX buffers
    /// while it has some. Returns how many frames were delivered or dropped.
    pub fn push_rx_frames(&mut self, frames: &mut VecDeque<Vec<u8>>) -> Result<usize, RingFault> {
        let Some(active) = self.active.as_mut() else { return Ok(0) };
        let mut done = 0;
        while let Some(frame) = frames.front() {
            let chain = match active.rx.iter(&active.mem) {
                Ok(mut iter) => iter.next(),
                Err(e) => return Err(fault(RX_QUEUE, e)),
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let written = match write_frame(chain, &active.mem, frame) {
                Ok(len) => {
                    NetMetrics::bump(&self.metrics.rx_frames, 1);
                    NetMetrics::bump(&self.metrics.rx_bytes, frame.len() as u64);
                    len
                }
                Err(ChainError::TooShort) => {
                    NetMetrics::bump(&self.metrics.rx_too_big, 1);
                    0
                }
                Err(_) => {
                    NetMetrics::bump(&self.metrics.rx_malformed, 1);
                    // The frame stays queued for the next, hopefully sane, buffer.
                    active.rx.add_used(&active.mem, head, 0).map_err(|e| fault(RX_QUEUE, e))?;
                    continue;
                }
            };
            active.rx.add_used(&active.mem, head, written).map_err(|e| fault(RX_QUEUE, e))?;
            frames.pop_front();
            done += 1;
        }
        Ok(done)
    }

    /// Re-arms notifications for `queue`; true if buffers arrived meanwhile
    /// (then the worker must look again instead of sleeping).
    /// Whether the RX frames just added must wake the driver: with
    /// EVENT_IDX, only when the used index crossed its `used_event` (a
    /// guest that looks for frames itself asks not to be woken).
    pub fn rx_needs_wake(&mut self) -> Result<bool, RingFault> {
        let Some(active) = self.active.as_mut() else { return Ok(false) };
        active.rx.needs_notification(&active.mem).map_err(|e| fault(RX_QUEUE, e))
    }

    pub fn enable_notification(&mut self, queue: usize) -> Result<bool, RingFault> {
        let Some(active) = self.active.as_mut() else { return Ok(false) };
        let q = if queue == RX_QUEUE { &mut active.rx } else { &mut active.tx };
        q.enable_notification(&active.mem).map_err(|e| fault(queue, e))
    }
}

fn fault(queue: usize, error: virtio_queue::Error) -> RingFault {
    RingFault { queue, error }
}

/// Checks that every descriptor goes the expected way and that the total
/// stays within `max_len`; returns the total.
fn check_chain(
    chain: &DescriptorChain<&GuestMemoryMmap>,
    device_writes: bool,
    max_len: usize,
) -> Result<usize, ChainError> {
    let mut total = 0usize;
    let mut still_linked = false;
    // The iterator stops after `queue size` hops, so a looping chain ends;
    // it then ends on a descriptor that still points onwards.
    for desc in chain.clone() {
        if desc.is_write_only() != device_writes {
            return Err(ChainError::WrongDirection);
        }
        total = total.checked_add(desc.len() as usize).ok_or(ChainError::TooLong)?;
        if total > max_len {
            return Err(ChainError::TooLong);
        }
        still_linked = desc.has_next();
    }
    if still_linked {
        return Err(ChainError::Loop);
    }
    Ok(total)
}

/// Reads the Ethernet frame out of a TX chain (virtio header stripped).
fn read_frame(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    max_chain: usize,
) -> Result<Vec<u8>, ChainError> {
    let total = check_chain(&chain, false, max_chain)?;
    if total < NET_HDR_LEN + ETH_HDR_LEN {
        return Err(ChainError::TooShort);
    }
    let mut reader = chain.reader(mem).map_err(|_| ChainError::Memory)?;
    let mut header = [0u8; NET_HDR_LEN];
    reader.read_exact(&mut header).map_err(|_| ChainError::Memory)?;
    let mut frame = vec![0u8; total - NET_HDR_LEN];
    reader.read_exact(&mut frame).map_err(|_| ChainError::Memory)?;
    Ok(frame)
}

/// Writes header and `frame` into an RX chain; returns the bytes written.
fn write_frame(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    frame: &[u8],
) -> Result<u32, ChainError> {
    // An RX chain's size is the driver's business; only its direction and
    // addresses are checked, and whether this frame fits.
    let room = check_chain(&chain, true, usize::MAX)?;
    let needed = NET_HDR_LEN + frame.len();
    if room < needed {
        return Err(ChainError::TooShort);
    }
    let mut writer = chain.writer(mem).map_err(|_| ChainError::Memory)?;
    let mut header = [0u8; NET_HDR_LEN];
    header[10] = 1; // num_buffers = 1: the frame is in this one chain.
    writer.write_all(&header).map_err(|_| ChainError::Memory)?;
    writer.write_all(frame).map_err(|_| ChainError::Memory)?;
    u32::try_from(needed).map_err(|_| ChainError::TooLong)
}

impl VirtioDevice for NetDevice {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn offered_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX | VIRTIO_NET_F_MAC
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // Config layout (5.1.4): mac[6], then fields we do not offer.
        read_config_bytes(&self.mac, offset, data);
    }

    fn activate(&mut self, queues: Vec<Queue>, features: u64, mem: GuestMemoryMmap) -> Result<(), ActivateError> {
        let got = queues.len();
        let Ok([mut rx, mut tx]) = <[Queue; 2]>::try_from(queues) else {
            return Err(ActivateError::QueueCount { got, want: 2 });
        };
        let event_idx = features & VIRTIO_F_RING_EVENT_IDX != 0;
        rx.set_event_idx(event_idx);
        tx.set_event_idx(event_idx);
        self.active = Some(Active { rx, tx, mem });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }
}

#[cfg(test)]
mod tests {
    //! Hand-built queues, from a driver that may be lying.

    use super::*;
    use crate::devices::virtio::test_descriptors::{NEXT, WRITE, desc};
    use std::sync::atomic::Ordering;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const RAM: usize = 1 << 20;
    const MAX_FRAME: usize = 2048;
    const BUFS: u64 = 0x8_0000;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM)]).unwrap()
    }

    type Mock<'a> = MockSplitQueue<'a, GuestMemoryMmap>;

    fn queues(mem: &GuestMemoryMmap) -> (Mock<'_>, Mock<'_>) {
        (MockSplitQueue::create(mem, GuestAddress(0), 16), MockSplitQueue::create(mem, GuestAddress(0x4000), 16))
    }

    fn activated(mem: &GuestMemoryMmap, rx: &Mock, tx: &Mock) -> NetDevice {
        let mut device = NetDevice::new([2, 0, 0, 0, 0, 1], MAX_FRAME);
        let queues = vec![rx.create_queue::<Queue>().unwrap(), tx.create_queue::<Queue>().unwrap()];
        device.activate(queues, VIRTIO_F_VERSION_1, mem.clone()).unwrap();
        device
    }

    fn frame(len: usize) -> Vec<u8> {
        (0..len).map(|i| u8::try_from(i % 251).unwrap()).collect()
    }

    #[test]
    fn a_well_formed_tx_chain_becomes_one_frame() {
        let mem = memory();
        let payload = frame(100);
        mem.write_slice(&[0u8; NET_HDR_LEN], GuestAddress(BUFS)).unwrap();
        mem.write_slice(&payload, GuestAddress(BUFS + NET_HDR_LEN as u64)).unwrap();
        let (rx, tx) = queues(&mem);
        // Header and frame split across two descriptors, as drivers may do.
        tx.add_desc_chains(&[desc(BUFS, 12, NEXT, 1), desc(BUFS + 12, 100, 0, 0)], 0).unwrap();
        let mut device = activated(&mem, &rx, &tx);
        let mut out = VecDeque::new();
        assert_eq!(device.pop_tx_frames(&mut out, 64).unwrap(), 1);
        assert_eq!(out.pop_front(), Some(payload));
        let used = tx.used().ring().ref_at(0).unwrap().load();
        assert_eq!((used.id(), used.len()), (0, 0));
    }

    #[test]
    fn tx_chains_with_wrong_direction_bad_address_or_bad_length_are_refused() {
        let mem = memory();
        let (rx, tx) = queues(&mem);
        tx.add_desc_chains(
            &[
                desc(BUFS, 200, WRITE, 0),                                             // device-writable in TX
                desc(RAM as u64 - 10, 200, 0, 0),                                      // runs past guest RAM
                desc(u64::MAX - 5, 200, 0, 0),                                         // wraps the address space
                desc(BUFS, u32::try_from(NET_HDR_LEN + MAX_FRAME + 1).unwrap(), 0, 0), // longer than any frame
                desc(BUFS, 8, 0, 0),                                                   // shorter than a header
            ],
            0,
        )
        .unwrap();
        let mut device = activated(&mem, &rx, &tx);
        let mut out = VecDeque::new();
        assert_eq!(device.pop_tx_frames(&mut out, 64).unwrap(), 5);
        assert!(out.is_empty());
        assert_eq!(device.metrics().tx_malformed.load(Ordering::Relaxed), 5);
        for i in 0..5 {
            assert_eq!(tx.used().ring().ref_at(i).unwrap().load().len(), 0);
        }
    }

    #[test]
    fn a_looping_chain_ends_and_is_refused() {
        let mem = memory();
        let (rx, tx) = queues(&mem);
        // Two descriptors pointing at each other: an endless chain.
        tx.add_desc_chains(&[desc(BUFS, 64, NEXT, 1), desc(BUFS, 64, NEXT, 0)], 0).unwrap();
        let mut device = activated(&mem, &rx, &tx);
        let mut out = VecDeque::new();
        let consumed = device.pop_tx_frames(&mut out, 64).unwrap();
        assert!(consumed >= 1);
        assert!(out.is_empty(), "a looping chain must not become a frame");
        assert!(device.metrics().tx_malformed.load(Ordering::Relaxed) >= 1);
    }

    #[test]
    fn an_avail_index_past_the_ring_is_a_ring_fault() {
        let mem = memory();
        let (rx, tx) = queues(&mem);
        let mut device = activated(&mem, &rx, &tx);
        // The driver claims 100 new buffers in a 16-entry ring.
        tx.avail().idx().store(100);
        let mut out = VecDeque::new();
        assert!(matches!(device.pop_tx_frames(&mut out, 64), Err(RingFault { queue: TX_QUEUE, .. })));
    }

    #[test]
    fn rx_writes_header_and_frame_into_a_writable_chain() {
        let mem = memory();
        let (rx, tx) = queues(&mem);
        rx.add_desc_chains(&[desc(BUFS, 4096, WRITE, 0)], 0).unwrap();
        let mut device = activated(&mem, &rx, &tx);
        let payload = frame(300);
        let mut frames = VecDeque::from([payload.clone()]);
        assert_eq!(device.push_rx_frames(&mut frames).unwrap(), 1);
        assert!(frames.is_empty());
        let used = rx.used().ring().ref_at(0).unwrap().load();
        assert_eq!(used.len() as usize, NET_HDR_LEN + 300);
        let mut written = vec![0u8; NET_HDR_LEN + 300];
        mem.read_slice(&mut written, GuestAddress(BUFS)).unwrap();
        assert_eq!(written[10], 1, "num_buffers");
        assert_eq!(&written[NET_HDR_LEN..], &payload[..]);
    }

    #[test]
    fn rx_refuses_read_only_and_out_of_ram_chains_but_keeps_the_frame() {
        let mem = memory();
        let (rx, tx) = queues(&mem);
        rx.add_desc_chains(
            &[desc(BUFS, 4096, 0, 0), desc(RAM as u64 - 100, 4096, WRITE, 0), desc(BUFS, 4096, WRITE, 0)],
            0,
        )
        .unwrap();
        let mut device = activated(&mem, &rx, &tx);
        let mut frames = VecDeque::from([frame(64)]);
        assert_eq!(device.push_rx_frames(&mut frames).unwrap(), 1);
        assert_eq!(device.metrics().rx_malformed.load(Ordering::Relaxed), 2);
        assert_eq!(rx.used().ring().ref_at(0).unwrap().load().len(), 0);
        assert_eq!(rx.used().ring().ref_at(1).unwrap().load().len(), 0);
        assert_eq!(rx.used().ring().ref_at(2).unwrap().load().len() as usize, NET_HDR_LEN + 64);
    }

    #[test]
    fn a_frame_too_big_for_the_buffer_is_dropped_and_counted() {
        let mem = memory();
        let (rx, tx) = queues(&mem);
        rx.add_desc_chains(&[desc(BUFS, 100, WRITE, 0)], 0).unwrap();
        let mut device = activated(&mem, &rx, &tx);
        let mut frames = VecDeque::from([frame(200)]);
        assert_eq!(device.push_rx_frames(&mut frames).unwrap(), 1);
        assert!(frames.is_empty());
        assert_eq!(device.metrics().rx_too_big.load(Ordering::Relaxed), 1);
        assert_eq!(rx.used().ring().ref_at(0).unwrap().load().len(), 0);
    }

    #[test]
    fn overlapping_rx_buffers_are_written_without_harm() {
        let mem = memory();
        let (rx, tx) = queues(&mem);
        // Two descriptors over the same bytes: odd, but only the guest's problem.
        rx.add_desc_chains(&[desc(BUFS, 64, WRITE | NEXT, 1), desc(BUFS, 64, WRITE, 0)], 0).unwrap();
        let mut device = activated(&mem, &rx, &tx);
        let mut frames = VecDeque::from([frame(80)]);
        assert_eq!(device.push_rx_frames(&mut frames).unwrap(), 1);
        assert_eq!(rx.used().ring().ref_at(0).unwrap().load().len() as usize, NET_HDR_LEN + 80);
    }

    #[test]
    fn an_inactive_device_moves_nothing() {
        let mut device = NetDevice::new([2, 0, 0, 0, 0, 1], MAX_FRAME);
        let mut frames = VecDeque::from([frame(80)]);
        assert_eq!(device.push_rx_frames(&mut frames).unwrap(), 0);
        assert_eq!(device.pop_tx_frames(&mut frames, 8).unwrap(), 0);
        assert_eq!(frames.len(), 1);
    }

    #[test]
    fn config_space_holds_the_mac_and_reads_past_it_as_zero() {
        let device = NetDevice::new([2, 0, 0, 0, 0, 1], MAX_FRAME);
        let mut mac = [0u8; 6];
        device.read_config(0, &mut mac);
        assert_eq!(mac, [2, 0, 0, 0, 0, 1]);
        let mut far = [0xffu8; 4];
        device.read_config(u64::MAX - 1, &mut far);
        assert_eq!(far, [0; 4]);
    }
}
