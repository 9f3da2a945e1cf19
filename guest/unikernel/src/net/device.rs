//! The guest's network device: whole frames in and out of the
//! `virtio-drivers` raw net driver.
//!
//! Owns the RX buffers posted to the device and the TX buffers in flight
//! (each sized to its frame, freed once the device is done with it).
//! RX buffers start few and grow in batches when a burst of frames drains
//! them all, and are pages nothing has touched yet (`heap::untouched_zeroed`):
//! a page of one costs the host, and the guest an exit, only once a frame
//! reaches it, so an idle tenant pays for the few pages its frames used, not
//! for 8 frames of 64 KiB, and a boot does not spend an exit on each page.
//! Nothing here waits for the device: transmits are queued and reclaimed
//! later, so a burst of frames costs at most one notification (the device
//! suppresses the rest with EVENT_IDX). Buffers are heap boxes whose
//! addresses never change while the device holds them; RX buffers live as
//! long as the VM.

use alloc::boxed::Box;
use alloc::vec::Vec;
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::mmio::MmioTransport;

use super::hal::GuestHal;
use super::notify::EventIdxTransport;

/// Descriptors per virtqueue.
pub const QUEUE_SIZE: usize = 64;
/// RX buffers posted at start, and added per burst that drains them all.
const RX_BATCH: usize = 8;
/// Size of the virtio-net header in front of every frame (VERSION_1).
pub const NET_HDR_LEN: usize = 12;

type Driver = VirtIONetRaw<GuestHal, EventIdxTransport<MmioTransport<'static>>, QUEUE_SIZE>;

struct Inner {
    driver: Driver,
    /// RX buffers the device holds, by token.
    rx_posted: Vec<Option<&'static mut [u8]>>,
    /// RX buffers this driver owns (posted, or being read).
    rx_count: usize,
    /// Frames received since the RX queue was last found empty.
    burst: usize,
    /// TX buffers the device holds, by token, with the length handed over.
    tx_inflight: Vec<Option<(Box<[u8]>, usize)>>,
    buf_len: usize,
    /// Set when the driver reports an error; the guest then stops serving.
    failed: bool,
}

impl Inner {
    fn post_rx(&mut self, buf: &'static mut [u8]) {
        // SAFETY: the buffer is stored in `rx_posted` under the returned token
        // and not touched until `receive_complete` hands it back.
        match unsafe { self.driver.receive_begin(&mut *buf) } {
            Ok(token) => {
                if let Some(slot) = self.rx_posted.get_mut(usize::from(token)) {
                    *slot = Some(buf);
                } else {
                    self.failed = true;
                }
            }
            Err(_) => self.failed = true,
        }
    }

    /// Posts another batch of RX buffers, up to the queue's size.
    fn grow_rx(&mut self) {
        let add = RX_BATCH.min(QUEUE_SIZE - self.rx_count);
        for _ in 0..add {
            let Some(buf) = crate::heap::untouched_zeroed(self.buf_len) else {
                // No heap to spare: the buffers posted already keep serving.
                break;
            };
            self.post_rx(buf);
            self.rx_count += 1;
        }
    }

    fn reclaim_tx(&mut self) {
        while let Some(token) = self.driver.poll_transmit() {
            let Some((buf, len)) = self.tx_inflight.get_mut(usize::from(token)).and_then(Option::take) else {
                self.failed = true;
                return;
            };
            // SAFETY: the same buffer and length as given to transmit_begin.
            if unsafe { self.driver.transmit_complete(token, &buf[..len]) }.is_err() {
                self.failed = true;
            }
        }
    }
}

/// The virtio-net card: frames in, frames out.
pub struct VirtioNet {
    inner: Inner,
}

impl VirtioNet {
    /// Takes over `driver` and posts every RX buffer, each big enough for a
    /// frame of `max_frame` bytes.
    pub fn new(driver: Driver, max_frame: usize) -> VirtioNet {
        let buf_len = NET_HDR_LEN + max_frame;
        let mut inner = Inner {
            driver,
            rx_posted: (0..QUEUE_SIZE).map(|_| None).collect(),
            rx_count: 0,
            burst: 0,
            tx_inflight: (0..QUEUE_SIZE).map(|_| None).collect(),
            buf_len,
            failed: false,
        };
        inner.grow_rx();
        VirtioNet { inner }
    }

    /// True if a frame is waiting (so the guest must not park).
    pub fn has_rx(&self) -> bool {
        self.inner.driver.poll_receive().is_some()
    }

    /// True once the driver has reported an inconsistency.
    pub fn failed(&self) -> bool {
        self.inner.failed
    }

    /// Hands the next received frame (without its virtio-net header) to
    /// `f`, then gives its buffer back to the device. `None`: no frame.
    pub fn receive<R>(&mut self, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        let inner = &mut self.inner;
        let Some(token) = inner.driver.poll_receive() else {
            inner.burst = 0;
            return None;
        };
        inner.burst += 1;
        if inner.burst >= inner.rx_count {
            // This burst used every buffer: the VMM may be holding more.
            inner.grow_rx();
        }
        let Some(buf) = inner.rx_posted.get_mut(usize::from(token)).and_then(Option::take) else {
            inner.failed = true;
            return None;
        };
        // SAFETY: the same buffer as given to receive_begin for this token.
        let lengths = unsafe { inner.driver.receive_complete(token, &mut *buf) };
        let result = match lengths {
            Ok((start, len)) if start.checked_add(len).is_some_and(|end| end <= buf.len()) => {
                Some(f(&buf[start..start + len]))
            }
            _ => {
                inner.failed = true;
                None
            }
        };
        inner.post_rx(buf);
        result
    }

    /// True if the TX queue has room for a frame.
    pub fn can_transmit(&mut self) -> bool {
        self.inner.reclaim_tx();
        self.inner.driver.can_send()
    }

    /// Queues the frame of `frame_len` bytes at `NET_HDR_LEN..` of `buf`
    /// (after [`VirtioNet::can_transmit`]). The device is told at most once
    /// per burst.
    pub fn transmit(&mut self, mut buf: Box<[u8]>, frame_len: usize) {
        let inner = &mut self.inner;
        let total = NET_HDR_LEN + frame_len;
        if total > buf.len() || inner.driver.fill_buffer_header(&mut buf[..total]).is_err() {
            inner.failed = true;
            return;
        }
        // SAFETY: the box goes into `tx_inflight` under the returned token and
        // is not touched until `transmit_complete` hands it back.
        match unsafe { inner.driver.transmit_begin(&buf[..total]) } {
            Ok(token) => match inner.tx_inflight.get_mut(usize::from(token)) {
                Some(slot) => *slot = Some((buf, total)),
                None => inner.failed = true,
            },
            Err(_) => inner.failed = true,
        }
    }
}
