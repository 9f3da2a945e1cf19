//! The MQTT broker service: the broker core (`mqvisor-broker`) over smoltcp
//! sockets on the service port.
//!
//! Owns the mapping between sockets and broker connections, and moving bytes
//! between them: socket bytes into the core, the core's output into socket
//! send buffers (what does not fit stays in the core, which then queues or
//! drops per its limits), the core's close requests into FINs, and time into
//! `tick`. Limits come from the command line the VMM writes.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::format;
use alloc::string::String;

use mqvisor_boot_abi::BootInfo;
use mqvisor_broker::broker::{Broker, Config, ConnId, Event};
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;

use super::Net;
use crate::clock;

/// Socket buffer size per direction and connection.
const SOCKET_BUFFER: usize = 64 * 1024;

/// Adds the password and ACL files from the boot-info configuration blob.
pub fn add_auth_files(config: &mut Config, info: &BootInfo) -> Result<(), String> {
    use mqvisor_boot_abi::config_blob;
    use mqvisor_broker::auth::{Acl, PasswordFile};
    if info.config_len == 0 {
        return Ok(());
    }
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
    let sections = config_blob::parse(blob).ok_or("malformed configuration blob")?;
    let text =
        |bytes: &[u8]| core::str::from_utf8(bytes).map(String::from).map_err(|_| String::from("file is not UTF-8"));
    if let Some(bytes) = sections[config_blob::PASSWORD_FILE] {
        config.passwords = Some(PasswordFile::parse(&text(bytes)?).map_err(|e| format!("password file: {e}"))?);
    }
    if let Some(bytes) = sections[config_blob::ACL_FILE] {
        config.acl = Some(Acl::parse(&text(bytes)?).map_err(|e| format!("ACL file: {e}"))?);
    }
    Ok(())
}

/// Broker limits from `mqtt.*` command-line words; unknown words are the
/// caller's business.
pub fn config_from_cmdline(cmdline: &str) -> Result<Config, &str> {
    let mut config = Config::default();
    for word in cmdline.split_ascii_whitespace() {
        let Some((key, value)) = word.split_once('=') else { continue };
        let Some(key) = key.strip_prefix("mqtt.") else { continue };
        let number = || value.parse::<u64>().map_err(|_| word);
        match key {
            "max_connections" => config.max_connections = usize::try_from(number()?).map_err(|_| word)?,
            "max_packet_size" => config.max_packet_size = usize::try_from(number()?).map_err(|_| word)?,
            "max_queued_messages" => config.max_queued_messages = usize::try_from(number()?).map_err(|_| word)?,
            "max_inflight" => config.max_inflight = u16::try_from(number()?).map_err(|_| word)?,
            "allow_anonymous" => config.allow_anonymous = number()? != 0,
            "max_subscriptions_per_client" => {
                config.max_subscriptions_per_client = usize::try_from(number()?).map_err(|_| word)?
            }
            "max_topic_length" => config.topic_limits.max_len = usize::try_from(number()?).map_err(|_| word)?,
            "server_keep_alive" => config.server_keep_alive = Some(u16::try_from(number()?).map_err(|_| word)?),
            "max_topic_levels" => config.topic_limits.max_levels = usize::try_from(number()?).map_err(|_| word)?,
            _ => return Err(word),
        }
    }
    Ok(config)
}

struct Link {
    conn: ConnId,
    /// The broker asked to close: FIN once its output is out.
    closing: bool,
    /// `Broker::closed` was called.
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
    let mut pending_output: BTreeSet<ConnId> = BTreeSet::new();
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
                links.insert(handle, Link { conn, closing: false, released: false });
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
        while let Some(Event::Close(conn)) = broker.poll_event() {
            if let Some(link) = by_conn.get(&conn).and_then(|h| links.get_mut(h)) {
                link.closing = true;
            }
            pending_output.insert(conn);
        }

        // Broker -> sockets.
        pending_output.extend(broker.take_dirty());
        let mut still_pending = BTreeSet::new();
        for conn in core::mem::take(&mut pending_output) {
            let Some(&handle) = by_conn.get(&conn) else { continue };
            let Some(link) = links.get_mut(&handle) else { continue };
            let socket = net.sockets.get_mut::<tcp::Socket>(handle);
            loop {
                let output = broker.output(conn);
                if output.is_empty() || !socket.can_send() {
                    break;
                }
                let sent = socket.send_slice(output).unwrap_or(0);
                if sent == 0 {
                    break;
                }
                broker.consume_output(conn, sent, now);
                moved = true;
            }
            if !broker.output(conn).is_empty() {
                still_pending.insert(conn);
            } else if link.closing && !link.released {
                socket.close();
                broker.closed(conn, now);
                link.released = true;
                moved = true;
            }
            still_pending.extend(broker.take_dirty());
        }
        pending_output = still_pending;

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
        if !moved && pending_output.is_empty() {
            net.idle(broker.next_deadline().map(|ms| ms.saturating_mul(1000)));
        }
    }
}
