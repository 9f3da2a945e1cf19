//! The guest's network: finds the virtio-net device in boot-info and carries
//! the VMM's client streams over it (`mqvisor_boot_abi::streams`), for a
//! service ([`echo`] or [`mqtt`]) that runs until the VM is stopped.
//!
//! Owns the frame being built (records of any number of streams share it;
//! [`Link::flush`] sends it) and the idle step: park in the VMM until the
//! service's deadline or until the VMM delivers frames. Must never spin while
//! idle, and never hold a record back once the service's pass is over.

mod device;
pub mod echo;
pub mod hal;
pub mod mqtt;
mod notify;

use alloc::vec::Vec;
use core::ptr::NonNull;

use mqvisor_boot_abi::streams::{self, FrameWriter, Record, ServiceStats, StreamId};
use mqvisor_boot_abi::wait::{PREEMPTED_NS, PollWindow};
use mqvisor_boot_abi::{BootInfo, NetConfig, device_kind};
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};

use crate::{clock, paravirt};
use device::{NET_HDR_LEN, VirtioNet};

/// Exit code when the network cannot be brought up.
pub const EXIT_NO_NETWORK: u32 = 3;
/// How long to park when the TX queue was full: the VMM frees TX buffers
/// without waking the guest.
const TX_FULL_WAIT_NS: u64 = 200_000;
/// Traffic flows when frames came this recently: only then does the guest
/// look for frames before parking (see [`PollWindow`]); an idle guest
/// parks at once and costs nothing.
const BUSY_FOR_NS: u64 = 1_000_000;

/// The guest's end of the link.
pub struct Link {
    device: VirtioNet,
    /// Whether the VMM wakes a parked guest for the next frame.
    rx_wake: notify::RxWake,
    guest_mac: [u8; 6],
    host_mac: [u8; 6],
    /// The frame being built (one frame's room, for the VM's life, of
    /// untouched pages: only those frames reach cost anything; a frame
    /// leaves as a copy of what was written, so a small frame holds little
    /// memory while the device has it).
    building: &'static mut [u8],
    /// Bytes of `building` written; 0 when no frame is started.
    building_len: usize,
    /// Control records that found no room; sent before anything else.
    held: Vec<(StreamId, Control)>,
    /// The TX queue had no room during this pass.
    tx_full: bool,
    /// Frames from the VMM that did not decode (skipped).
    bad_frames: u64,
    /// When frames last came from the VMM.
    last_rx: clock::Instant,
    /// How long to look for frames before parking.
    poll: PollWindow,
}

/// A record without bytes, kept when it found no room.
#[derive(Clone, Copy)]
enum Control {
    Close,
    Credit(u32),
}

impl Link {
    /// Brings up the device from boot-info, or ends the VM.
    pub fn bring_up(info: &BootInfo) -> Link {
        match Self::try_bring_up(info) {
            Ok(link) => link,
            Err(why) => paravirt::exit(EXIT_NO_NETWORK, why.as_bytes()),
        }
    }

    fn try_bring_up(info: &BootInfo) -> Result<Link, &'static str> {
        let desc = info
            .devices()
            .iter()
            .find(|d| d.kind == device_kind::VIRTIO_NET)
            .ok_or("no virtio-net device in boot-info")?;
        let header = NonNull::new(desc.base as *mut VirtIOHeader).ok_or("virtio-net device at address 0")?;
        let size = usize::try_from(desc.size).map_err(|_| "virtio-net window too large")?;
        // SAFETY: the VMM maps a virtio-mmio register window of `size` bytes at
        // `base` (boot-info device list) for the VM's whole life; nothing else
        // in the guest accesses it.
        let transport =
            unsafe { MmioTransport::new(header, size) }.map_err(|_| "virtio-net window is not a virtio-mmio device")?;
        let (transport, rx_wake) = notify::EventIdxTransport::new(transport);
        let driver = VirtIONetRaw::new(transport).map_err(|_| "virtio-net device refused initialisation")?;
        let net: &NetConfig = &info.net;
        let max_frame = usize::from(net.mtu) + streams::ETHERNET_HEADER_LEN;
        let building = crate::heap::untouched_zeroed(max_frame).ok_or("no heap for the frame being built")?;
        Ok(Link {
            device: VirtioNet::new(driver, max_frame),
            rx_wake,
            guest_mac: net.guest_mac,
            host_mac: net.host_mac,
            building,
            building_len: 0,
            held: Vec::new(),
            tx_full: false,
            bad_frames: 0,
            last_rx: clock::Instant::START,
            poll: PollWindow::default(),
        })
    }

    /// Hands every record of every waiting frame to `on`, in order; true if
    /// there were any frames.
    pub fn receive(&mut self, mut on: impl FnMut(Record<'_>)) -> bool {
        let mut any = false;
        let mut bad = 0;
        while self
            .device
            .receive(|frame| match streams::records(frame) {
                Ok(records) => {
                    for record in records {
                        match record {
                            Ok(record) => on(record),
                            Err(_) => {
                                bad += 1;
                                break;
                            }
                        }
                    }
                }
                Err(_) => bad += 1,
            })
            .is_some()
        {
            any = true;
        }
        if any {
            self.last_rx = clock::now();
        }
        if bad > 0 && self.bad_frames == 0 {
            // The VMM is ours: a bad frame is a bug worth one line, not a stop.
            crate::println!("net: skipped a malformed frame from the VMM (further ones are counted silently)");
        }
        self.bad_frames += bad;
        if self.device.failed() {
            paravirt::exit(EXIT_NO_NETWORK, b"virtio-net driver reported an inconsistent device");
        }
        any
    }

    /// Writes with `write` into the frame being built (starting one if
    /// none is); when it writes nothing into a frame that has records, sends
    /// that frame and tries a fresh one. Returns what `write` returned last
    /// (0: no room, the TX queue being full).
    fn write(&mut self, mut write: impl FnMut(&mut FrameWriter<'_>) -> usize) -> usize {
        for _ in 0..2 {
            let mut frame = if self.building_len == 0 {
                FrameWriter::new(self.building, self.host_mac, self.guest_mac)
            } else {
                FrameWriter::resume(self.building, self.building_len)
            };
            let written = write(&mut frame);
            let empty = frame.is_empty();
            self.building_len = frame.len();
            if written > 0 || empty {
                return written;
            }
            if !self.send_frame() {
                return 0;
            }
        }
        0
    }

    /// Transmits the frame being built, if it has records, in a TX buffer of
    /// its own size; false when the TX queue is full (the frame stays).
    fn send_frame(&mut self) -> bool {
        if self.building_len <= streams::ETHERNET_HEADER_LEN {
            return true;
        }
        if !self.device.can_transmit() {
            self.tx_full = true;
            return false;
        }
        let len = self.building_len;
        let mut buf = alloc::vec![0u8; NET_HDR_LEN + len].into_boxed_slice();
        buf[NET_HDR_LEN..].copy_from_slice(&self.building[..len]);
        self.device.transmit(buf, len);
        self.building_len = 0;
        true
    }

    /// Sends up to `bytes.len()` bytes of stream `id`; returns how many were
    /// taken (0 when the TX queue is full).
    pub fn send_data(&mut self, id: StreamId, bytes: &[u8]) -> usize {
        if bytes.is_empty() || !self.send_held() {
            return 0;
        }
        self.write(|frame| frame.data(id, bytes))
    }

    /// True when a frame with records is being built (it leaves at the
    /// next [`Link::flush`]).
    pub fn frame_pending(&self) -> bool {
        self.building_len > streams::ETHERNET_HEADER_LEN
    }

    /// Tells the VMM the service's counters (dropped when there is no room:
    /// the next report carries them again).
    pub fn send_stats(&mut self, stats: ServiceStats) {
        self.write(|frame| usize::from(frame.control(Record::Stats(&stats.to_bytes()))));
    }

    /// Tells the VMM the service is done with stream `id` (after its data).
    pub fn send_close(&mut self, id: StreamId) {
        self.send_control(id, Control::Close);
    }

    /// Gives the VMM `bytes` more of stream `id`'s window.
    pub fn send_credit(&mut self, id: StreamId, bytes: u32) {
        self.send_control(id, Control::Credit(bytes));
    }

    fn send_control(&mut self, id: StreamId, control: Control) {
        if !self.send_held() || !self.try_control(id, control) {
            self.held.push((id, control));
        }
    }

    fn try_control(&mut self, id: StreamId, control: Control) -> bool {
        let record = match control {
            Control::Close => Record::Close(id),
            Control::Credit(n) => Record::Credit(id, n),
        };
        self.write(|frame| usize::from(frame.control(record))) == 1
    }

    /// Sends held control records, oldest first; true once none is left.
    fn send_held(&mut self) -> bool {
        while let Some(&(id, control)) = self.held.first() {
            if !self.try_control(id, control) {
                return false;
            }
            self.held.remove(0);
        }
        true
    }

    /// Sends held records and the frame being built.
    pub fn flush(&mut self) {
        self.send_held();
        self.send_frame();
    }

    /// Parks until `deadline_us` (guest microseconds) or frames from the VMM,
    /// unless frames already wait. Sends what was built first.
    pub fn idle(&mut self, deadline_us: Option<u64>) {
        self.flush();
        if self.device.has_rx() {
            return;
        }
        let start = clock::now();
        let deadline = deadline_us.map(|us| clock::Instant::START.plus_ns(us.saturating_mul(1000)));
        let looked = start.ns_since(self.last_rx) < BUSY_FOR_NS && self.poll.looks();
        if looked {
            // Frames taken while looking need no wake-up (see `notify`).
            self.rx_wake.quiet();
            let until = start.plus_ns(self.poll.ns());
            let until = deadline.map_or(until, |d| until.min(d));
            let mut last = start;
            loop {
                let now = clock::now();
                if now >= until {
                    break;
                }
                if now.ns_since(last) > PREEMPTED_NS {
                    self.poll.preempted();
                    break;
                }
                last = now;
                if self.device.has_rx() {
                    self.poll.found(now.ns_since(start));
                    return;
                }
                core::hint::spin_loop();
            }
        }
        let now_us = clock::now().as_micros();
        let mut wait_ns = deadline_us.map_or(u64::MAX, |t| t.saturating_sub(now_us).saturating_mul(1000));
        if core::mem::take(&mut self.tx_full) || !self.held.is_empty() {
            wait_ns = wait_ns.min(TX_FULL_WAIT_NS);
        }
        self.rx_wake.arm();
        if self.device.has_rx() {
            return;
        }
        paravirt::wait_ns(wait_ns);
        if looked {
            self.poll.parked(clock::now().ns_since(start), self.device.has_rx());
        }
    }
}
