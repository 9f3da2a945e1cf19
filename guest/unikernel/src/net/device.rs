//! The guest's network device: a smoltcp `Device` over the `virtio-drivers`
//! raw net driver.
//!
//! Owns the RX buffers posted to the device and the TX buffers in flight.
//! Nothing here waits for the device: transmits are queued and reclaimed
//! later, so a burst of frames costs at most one notification (the device
//! suppresses the rest with EVENT_IDX). Buffers are heap boxes whose
//! addresses never change while the device holds them.

use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;

use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::mmio::MmioTransport;

use super::hal::GuestHal;

/// Descriptors per virtqueue.
pub const QUEUE_SIZE: usize = 64;
/// Size of the virtio-net header in front of every frame (VERSION_1).
const NET_HDR_LEN: usize = 12;

type Driver = VirtIONetRaw<GuestHal, MmioTransport<'static>, QUEUE_SIZE>;

struct Inner {
    driver: Driver,
    /// RX buffers the device holds, by token.
    rx_posted: Vec<Option<Box<[u8]>>>,
    /// TX buffers the device holds, by token, with the length handed over.
    tx_inflight: Vec<Option<(Box<[u8]>, usize)>>,
    tx_free: Vec<Box<[u8]>>,
    buf_len: usize,
    /// Set when the driver reports an error; the guest then stops serving.
    failed: bool,
}

impl Inner {
    fn post_rx(&mut self, mut buf: Box<[u8]>) {
        // SAFETY: the box is stored in `rx_posted` under the returned token
        // and not touched until `receive_complete` hands it back.
        match unsafe { self.driver.receive_begin(&mut buf) } {
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
            self.tx_free.push(buf);
        }
    }
}

/// The virtio-net card as smoltcp sees it.
pub struct VirtioNet {
    inner: RefCell<Inner>,
    mtu: usize,
}

impl VirtioNet {
    /// Takes over `driver` and posts every RX buffer, each big enough for a
    /// frame of `max_frame` bytes.
    pub fn new(driver: Driver, max_frame: usize) -> VirtioNet {
        let buf_len = NET_HDR_LEN + max_frame;
        let mut inner = Inner {
            driver,
            rx_posted: (0..QUEUE_SIZE).map(|_| None).collect(),
            tx_inflight: (0..QUEUE_SIZE).map(|_| None).collect(),
            tx_free: Vec::new(),
            buf_len,
            failed: false,
        };
        for _ in 0..QUEUE_SIZE {
            inner.post_rx(vec![0u8; buf_len].into_boxed_slice());
        }
        VirtioNet { inner: RefCell::new(inner), mtu: max_frame }
    }

    /// True if a frame is waiting (so the guest must not park).
    pub fn has_rx(&self) -> bool {
        self.inner.borrow().driver.poll_receive().is_some()
    }

    /// True once the driver has reported an inconsistency.
    pub fn failed(&self) -> bool {
        self.inner.borrow().failed
    }
}

pub struct RxToken<'a> {
    inner: &'a RefCell<Inner>,
    buf: Box<[u8]>,
    start: usize,
    len: usize,
}

pub struct TxToken<'a> {
    inner: &'a RefCell<Inner>,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let result = f(&self.buf[self.start..self.start + self.len]);
        self.inner.borrow_mut().post_rx(self.buf);
        result
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut inner = self.inner.borrow_mut();
        let buf_len = inner.buf_len;
        let mut buf = inner.tx_free.pop().unwrap_or_else(|| vec![0u8; buf_len].into_boxed_slice());
        let total = NET_HDR_LEN + len;
        if total > buf.len() {
            // smoltcp never exceeds the MTU we report; refuse rather than panic.
            let mut scratch = vec![0u8; len];
            inner.tx_free.push(buf);
            inner.failed = true;
            return f(&mut scratch);
        }
        let header_ok = inner.driver.fill_buffer_header(&mut buf[..total]).is_ok();
        let result = f(&mut buf[NET_HDR_LEN..total]);
        // SAFETY: the box goes into `tx_inflight` under the returned token and
        // is not touched until `transmit_complete` hands it back.
        match header_ok.then(|| unsafe { inner.driver.transmit_begin(&buf[..total]) }) {
            Some(Ok(token)) => {
                if let Some(slot) = inner.tx_inflight.get_mut(usize::from(token)) {
                    *slot = Some((buf, total));
                }
            }
            _ => {
                inner.failed = true;
                inner.tx_free.push(buf);
            }
        }
        result
    }
}

impl phy::Device for VirtioNet {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        let mut inner = self.inner.borrow_mut();
        inner.reclaim_tx();
        let token = inner.driver.poll_receive()?;
        let mut buf = inner.rx_posted.get_mut(usize::from(token)).and_then(Option::take)?;
        // SAFETY: the same buffer as given to receive_begin for this token.
        let (start, len) = match unsafe { inner.driver.receive_complete(token, &mut buf) } {
            Ok(lengths) => lengths,
            Err(_) => {
                inner.post_rx(buf);
                return None;
            }
        };
        if start + len > buf.len() {
            inner.post_rx(buf);
            return None;
        }
        drop(inner);
        Some((RxToken { inner: &self.inner, buf, start, len }, TxToken { inner: &self.inner }))
    }

    fn transmit(&mut self, _: Instant) -> Option<TxToken<'_>> {
        let mut inner = self.inner.borrow_mut();
        inner.reclaim_tx();
        if !inner.driver.can_send() {
            return None;
        }
        drop(inner);
        Some(TxToken { inner: &self.inner })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.mtu;
        // Same as the host end: the link is memory, nothing to check.
        caps.checksum = smoltcp::phy::ChecksumCapabilities::ignored();
        caps
    }
}
