//! The guest's network: finds the virtio-net device in boot-info, brings up
//! smoltcp on it, and runs a TCP service ([`echo`] or [`mqtt`]) until the VM
//! is stopped.
//!
//! Owns what the services share: bring-up, the listening-socket backlog and
//! the idle step (park in the VMM until smoltcp's or the service's next
//! deadline, or until the VMM delivers frames). Must never spin while idle.

mod device;
pub mod echo;
mod hal;
pub mod mqtt;

use alloc::vec;
use alloc::vec::Vec;
use core::ptr::NonNull;

use mqvisor_boot_abi::{BootInfo, LISTEN_BACKLOG, NetConfig, device_kind};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, Ipv4Address};
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};

use crate::{clock, paravirt};
use device::VirtioNet;

/// Exit code when the network cannot be brought up.
pub const EXIT_NO_NETWORK: u32 = 3;
/// Most TCP connections served at once, whatever the memory.
const MAX_CONNECTIONS: usize = 4096;
/// Heap kept back from sockets: TX frames in flight, service state, scratch.
const HEAP_RESERVE: usize = 8 << 20;

fn now() -> Instant {
    Instant::from_micros(i64::try_from(clock::now().as_micros()).unwrap_or(i64::MAX))
}

/// The device, the interface and the service's sockets.
pub struct Net {
    device: VirtioNet,
    iface: Interface,
    pub sockets: SocketSet<'static>,
    /// Every socket the service owns, listening or connected.
    pub handles: Vec<SocketHandle>,
    port: u16,
    socket_buffer: usize,
    max_connections: usize,
}

impl Net {
    /// Brings up the device and interface from boot-info, or ends the VM.
    /// Each connection gets two socket buffers of `socket_buffer` bytes; the
    /// connection limit follows from what is left of the heap.
    pub fn bring_up(info: &BootInfo, socket_buffer: usize) -> Net {
        match Self::try_bring_up(info, socket_buffer) {
            Ok(net) => net,
            Err(why) => paravirt::exit(EXIT_NO_NETWORK, why.as_bytes()),
        }
    }

    fn try_bring_up(info: &BootInfo, socket_buffer: usize) -> Result<Net, &'static str> {
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
        let driver = VirtIONetRaw::new(transport).map_err(|_| "virtio-net device refused initialisation")?;
        let net: &NetConfig = &info.net;
        let max_frame = usize::from(net.mtu) + 14;
        let mut device = VirtioNet::new(driver, max_frame);
        let config = Config::new(HardwareAddress::Ethernet(EthernetAddress(net.guest_mac)));
        let mut iface = Interface::new(config, &mut device, now());
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(Ipv4Address::from_octets(net.guest_ip)), net.prefix_len));
        });
        let per_connection = 2 * socket_buffer;
        let max_connections = (crate::heap::free_bytes().saturating_sub(HEAP_RESERVE) / per_connection)
            .clamp(LISTEN_BACKLOG, MAX_CONNECTIONS);
        let mut net = Net {
            device,
            iface,
            sockets: SocketSet::new(Vec::new()),
            handles: Vec::new(),
            port: net.port,
            socket_buffer,
            max_connections,
        };
        // Listen before the first poll: the VMM may already have SYNs queued.
        net.keep_listening();
        Ok(net)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    /// Moves frames between the device and the sockets.
    pub fn poll(&mut self) {
        self.iface.poll(now(), &mut self.device, &mut self.sockets);
        if self.device.failed() {
            paravirt::exit(EXIT_NO_NETWORK, b"virtio-net driver reported an inconsistent device");
        }
    }

    /// Keeps `LISTEN_BACKLOG` sockets listening while under the connection
    /// limit; true if it added any.
    pub fn keep_listening(&mut self) -> bool {
        let mut listening =
            self.handles.iter().filter(|&&h| self.sockets.get::<tcp::Socket>(h).state() == tcp::State::Listen).count();
        let mut added = false;
        while listening < LISTEN_BACKLOG && self.handles.len() < self.max_connections {
            let mut socket = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; self.socket_buffer]),
                tcp::SocketBuffer::new(vec![0; self.socket_buffer]),
            );
            socket.set_nagle_enabled(false);
            // A fresh socket in Closed state always accepts `listen`.
            let _ = socket.listen(self.port);
            self.handles.push(self.sockets.add(socket));
            listening += 1;
            added = true;
        }
        added
    }

    /// Forgets sockets that reached Closed (the service is done with them).
    pub fn reap_closed(&mut self, mut done: impl FnMut(SocketHandle)) {
        let sockets = &mut self.sockets;
        self.handles.retain(|&h| {
            if sockets.get::<tcp::Socket>(h).state() == tcp::State::Closed {
                done(h);
                sockets.remove(h);
                false
            } else {
                true
            }
        });
    }

    /// Parks until smoltcp's next deadline, `service_deadline_us` (guest
    /// microseconds), or frames from the VMM — unless frames already wait.
    pub fn idle(&mut self, service_deadline_us: Option<u64>) {
        if self.device.has_rx() {
            return;
        }
        let now_us = clock::now().as_micros();
        let net_delay = self.iface.poll_delay(now(), &self.sockets).map(|d| d.total_micros());
        let service_delay = service_deadline_us.map(|t| t.saturating_sub(now_us));
        let delay_us = match (net_delay, service_delay) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        paravirt::wait_ns(delay_us.map_or(u64::MAX, |us| us.saturating_mul(1000)));
    }
}
