//! TCP echo on the service port: the network path's test service
//! (`mqvisor run --service echo`).

use alloc::vec;

use mqvisor_boot_abi::BootInfo;
use smoltcp::socket::tcp;

use super::Net;

/// Socket buffer size: a window large enough for the link's jumbo frames.
const SOCKET_BUFFER: usize = 256 * 1024;

/// Echoes what each connection sends and closes after the peer closed and
/// everything was echoed.
pub fn run(info: &BootInfo) -> ! {
    let mut net = Net::bring_up(info, SOCKET_BUFFER);
    let mut scratch = vec![0u8; SOCKET_BUFFER];
    crate::println!("echo: serving TCP port {}, up to {} connections", net.port(), net.max_connections());
    loop {
        net.poll();
        let mut moved = false;
        for &handle in &net.handles {
            let socket = net.sockets.get_mut::<tcp::Socket>(handle);
            while socket.can_recv() && socket.can_send() {
                let room = socket.send_capacity() - socket.send_queue();
                let take = room.min(scratch.len());
                let n = socket.recv_slice(&mut scratch[..take]).unwrap_or(0);
                if n == 0 {
                    break;
                }
                let _ = socket.send_slice(&scratch[..n]);
                moved = true;
            }
            if !socket.may_recv() && socket.recv_queue() == 0 && socket.state() == tcp::State::CloseWait {
                socket.close(); // FIN after the echoed data.
                moved = true;
            }
        }
        net.reap_closed(|_| {});
        moved |= net.keep_listening();
        if !moved {
            net.idle(None);
        }
    }
}
