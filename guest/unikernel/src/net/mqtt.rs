//! The MQTT broker service: the broker core (`mqvisor-broker`) over smoltcp
//! sockets on the service port.
//!
//! Owns the mapping between sockets and broker connections, and moving bytes
//! between them: socket bytes into the core, the core's output into socket
//! send buffers (what does not fit stays in the core, which then queues or
//! drops per its limits), the core's close requests into FINs, and time into
//! `tick`. The configuration comes from the blob the VMM writes.

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;

use mqvisor_boot_abi::{BootInfo, config_blob};
use mqvisor_broker::broker::{Broker, Config, ConnId, Transmit};
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;

use super::Net;
use crate::clock;

/// Socket buffer size per direction and connection.
const SOCKET_BUFFER: usize = 64 * 1024;

/// The broker configuration the VMM wrote into the configuration blob,
/// decoded and checked (`mqvisor_boot_abi::config_blob`).
pub fn read_config(info: &BootInfo) -> Result<Config, String> {
    if info.config_len > config_blob::MAX_LEN
        || info.config_addr < mqvisor_boot_abi::layout::IMAGE_BASE
        || info.config_addr.saturating_add(info.config_len) > info.heap_start
    {
        return Err("configuration blob outside its region".into());
    }
    let len = usize::try_from(info.config_len).map_err(|_| "configuration blob too large")?;
    // SAFETY: the range was checked above to lie between the image base and
    // the heap, inside mapped RAM, where the VMM wrote the blob before entry;
    // nothing in the guest writes it.
    let blob = unsafe { core::slice::from_raw_parts(info.config_addr as *const u8, len) };
    config_blob::read(blob).map_err(|e| format!("{e}"))
}

struct Link {
    conn: ConnId,
    /// The broker no longer knows the connection: it closed it, or was told
    /// the peer has gone.
    released: bool,
}

fn now_ms() -> u64 {
    clock::now().as_micros() / 1000
}

/// Serves MQTT forever.
pub fn run(info: &BootInfo, config: Config) -> ! {
    let mut net = Net::bring_up(info, SOCKET_BUFFER);
    let max_connections = net.max_connections().min(config.max_connections);
    let mut broker = Broker::new(config);
    let mut links: BTreeMap<SocketHandle, Link> = BTreeMap::new();
    let mut by_conn: BTreeMap<ConnId, SocketHandle> = BTreeMap::new();
    let mut next_conn: ConnId = 1;
    crate::println!("mqtt: serving MQTT on TCP port {}, up to {} connections", net.port(), max_connections);
    loop {
        net.poll();
        let now = now_ms();
        let mut moved = false;

        // Sockets -> broker.
        for &handle in &net.handles {
            let socket = net.sockets.get_mut::<tcp::Socket>(handle);
            let state = socket.state();
            if !links.contains_key(&handle) && !matches!(state, tcp::State::Listen | tcp::State::SynReceived) {
                if state == tcp::State::Closed {
                    continue;
                }
                let conn = next_conn;
                next_conn += 1;
                broker.open(conn, now);
                links.insert(handle, Link { conn, released: false });
                by_conn.insert(conn, handle);
                moved = true;
            }
            let Some(link) = links.get_mut(&handle) else { continue };
            while socket.can_recv() {
                let received = socket.recv(|bytes| {
                    broker.receive(link.conn, bytes, now);
                    (bytes.len(), bytes.len())
                });
                if !matches!(received, Ok(n) if n > 0) {
                    break;
                }
                moved = true;
            }
            let peer_gone = (!socket.may_recv() && socket.recv_queue() == 0) || socket.state() == tcp::State::Closed;
            if peer_gone && !link.released {
                broker.closed(link.conn, now);
                link.released = true;
                socket.close();
                moved = true;
            }
        }

        if broker.next_deadline().is_some_and(|t| now >= t) {
            broker.tick(now);
            moved = true;
        }
        // Broker -> sockets: what does not fit stays in the core, which
        // offers it again on the next pass.
        moved |= broker.poll_transmit(now, |conn, transmit| {
            let Some(&handle) = by_conn.get(&conn) else { return 0 };
            let Some(link) = links.get_mut(&handle) else { return 0 };
            let socket = net.sockets.get_mut::<tcp::Socket>(handle);
            match transmit {
                Transmit::Bytes(bytes) => socket.send_slice(bytes).unwrap_or(0),
                Transmit::Close => {
                    socket.close();
                    link.released = true;
                    0
                }
            }
        });

        net.reap_closed(|handle| {
            if let Some(link) = links.remove(&handle) {
                by_conn.remove(&link.conn);
                if !link.released {
                    broker.closed(link.conn, now);
                }
            }
        });
        if links.len() < max_connections {
            moved |= net.keep_listening();
        }
        if !moved {
            net.idle(broker.next_deadline().map(|ms| ms.saturating_mul(1000)));
        }
    }
}
