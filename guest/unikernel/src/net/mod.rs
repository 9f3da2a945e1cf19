//! The guest's network: finds the virtio-net device in boot-info, brings up
//! smoltcp on it, and runs a TCP service until the VM is stopped.
//!
//! Owns the poll loop: poll the interface, serve sockets, and when nothing
//! moved, park in the VMM until smoltcp's next deadline or until the VMM
//! delivers frames. Must never spin while idle.

mod device;
mod hal;

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
const MAX_CONNECTIONS: usize = 1024;
/// Size of each socket buffer: a window large enough for jumbo frames.
const SOCKET_BUFFER: usize = 256 * 1024;
/// Heap kept back from sockets: TX frames in flight and scratch space.
const HEAP_RESERVE: usize = 8 << 20;

/// How many connections fit in what is left of the heap.
fn connection_limit() -> usize {
    let per_connection = 2 * SOCKET_BUFFER;
    (crate::heap::free_bytes().saturating_sub(HEAP_RESERVE) / per_connection).clamp(LISTEN_BACKLOG, MAX_CONNECTIONS)
}

fn now() -> Instant {
    Instant::from_micros(i64::try_from(clock::now().as_micros()).unwrap_or(i64::MAX))
}

/// Brings up the device and interface from boot-info.
fn bring_up(info: &BootInfo) -> Result<(VirtioNet, Interface), &'static str> {
    let desc =
        info.devices().iter().find(|d| d.kind == device_kind::VIRTIO_NET).ok_or("no virtio-net device in boot-info")?;
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
    Ok((device, iface))
}

fn new_listener(port: u16) -> tcp::Socket<'static> {
    let mut socket = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; SOCKET_BUFFER]),
        tcp::SocketBuffer::new(vec![0; SOCKET_BUFFER]),
    );
    socket.set_nagle_enabled(false);
    // A fresh socket in Closed state always accepts `listen`.
    let _ = socket.listen(port);
    socket
}

/// Echoes what each connection sends, keeps a backlog of listening sockets, closes
/// after the peer closes and everything was echoed. True if anything moved.
fn serve_echo(
    sockets: &mut SocketSet<'static>,
    handles: &mut Vec<SocketHandle>,
    port: u16,
    max_connections: usize,
    scratch: &mut [u8],
) -> bool {
    let mut progress = false;
    let mut listening = 0;
    handles.retain(|&handle| {
        let socket = sockets.get_mut::<tcp::Socket>(handle);
        if socket.state() == tcp::State::Listen {
            listening += 1;
        }
        while socket.can_recv() && socket.can_send() {
            let room = socket.send_capacity() - socket.send_queue();
            let take = room.min(scratch.len());
            let n = socket.recv_slice(&mut scratch[..take]).unwrap_or(0);
            if n == 0 {
                break;
            }
            let _ = socket.send_slice(&scratch[..n]);
            progress = true;
        }
        if !socket.may_recv() && socket.recv_queue() == 0 && socket.state() == tcp::State::CloseWait {
            socket.close(); // FIN after the echoed data.
            progress = true;
        }
        if socket.state() == tcp::State::Closed {
            sockets.remove(handle);
            return false;
        }
        true
    });
    while listening < LISTEN_BACKLOG && handles.len() < max_connections {
        handles.push(sockets.add(new_listener(port)));
        listening += 1;
        progress = true;
    }
    progress
}

/// Serves TCP echo on the boot-info port forever.
pub fn run_echo(info: &BootInfo) -> ! {
    let (mut device, mut iface) = match bring_up(info) {
        Ok(up) => up,
        Err(why) => paravirt::exit(EXIT_NO_NETWORK, why.as_bytes()),
    };
    let port = info.net.port;
    let mut sockets = SocketSet::new(Vec::new());
    let mut handles = Vec::new();
    let mut scratch = vec![0u8; SOCKET_BUFFER];
    // Listen before the first poll: the VMM may already have SYNs queued.
    let max_connections = connection_limit();
    serve_echo(&mut sockets, &mut handles, port, max_connections, &mut scratch);
    crate::println!("echo: serving TCP port {port}, up to {max_connections} connections");
    loop {
        iface.poll(now(), &mut device, &mut sockets);
        let moved = serve_echo(&mut sockets, &mut handles, port, max_connections, &mut scratch);
        if device.failed() {
            paravirt::exit(EXIT_NO_NETWORK, b"virtio-net driver reported an inconsistent device");
        }
        if moved || device.has_rx() {
            continue;
        }
        let delay = iface.poll_delay(now(), &sockets);
        paravirt::wait_ns(delay.map_or(u64::MAX, |d| d.total_micros().saturating_mul(1000)));
    }
}
