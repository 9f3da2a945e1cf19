//! Relayed connections between the nodes of a fleet (`super::cluster`):
//! a node whose front took a client of a tenant owned elsewhere connects
//! to the owner's relay port, writes a PROXY protocol v2 header
//! ([`super::proxy_header`], saying what the client speaks: MQTT, TLS,
//! WebSockets) and the client's first bytes as the client sent them (the
//! CONNECT, the ClientHello, the upgrade request), then copies bytes both
//! ways until either side closes. The owner's relay port reads that header
//! first and routes the client as its own port for that protocol would, to
//! a tenant it runs, never onwards. A TLS client's handshake is completed
//! by the tenant's process on the owner: the relaying node sees ciphertext
//! only.
//!
//! The relay port takes only a header that carries the fleet's relay key
//! ([`super::cluster::relay_key`]): whoever else reaches it is closed
//! before a byte of theirs is routed.
//!
//! Owns those two ends, and the owner's end of a replica connection
//! ([`connect_replica`]), which shares the header and the key. Never relays a connection that arrived relayed (no
//! loops between nodes whose views of the owners differ for a moment), and
//! never reads more than [`super::proxy_header::MAX_HEADER`] bytes of header.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::cluster::{RELAY_REFUSED, RELAYED_BYTES, RELAYED_CONNECTIONS, relay_key};
use super::front::FirstBytes;
use super::proxy_header::{self, Header, RelayKey, ReplicaOf, Tlvs};

/// How long connecting to the owner may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Relays `client`, whose `first` bytes the front read, to the owner's
/// relay port `owner`; returns when either side has closed.
pub async fn relay(mut client: TcpStream, first: FirstBytes, owner: SocketAddr) {
    let Some(key) = relay_key() else { return };
    let header = match (client.peer_addr(), client.local_addr()) {
        (Ok(source), Ok(destination)) => {
            let tlvs = Tlvs { handed: Some(first.kind().to_byte()), key: Some(*key), replica: None };
            proxy_header::encode(source, destination, &tlvs)
        }
        _ => return,
    };
    let mut upstream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(owner)).await {
        Ok(Ok(upstream)) => upstream,
        Ok(Err(e)) => {
            tracing::warn!(owner = %owner, error = %e, "cannot relay to the tenant's owner");
            return;
        }
        Err(_) => {
            tracing::warn!(owner = %owner, "cannot relay to the tenant's owner: no answer");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let mut opening = header;
    opening.extend_from_slice(&first);
    drop(first);
    if upstream.write_all(&opening).await.is_err() {
        return;
    }
    RELAYED_CONNECTIONS.fetch_add(1, Ordering::Relaxed);
    let copied = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    if let Ok((up, down)) = copied {
        RELAYED_BYTES.fetch_add(up.saturating_add(down), Ordering::Relaxed);
    }
}

/// Connects to the standby `target` names for a tenant's state (blocking,
/// at most [`CONNECT_TIMEOUT`]): the PROXY header with the relay key and
/// the replica TLV sent, the socket options a mirror needs set
/// (`mqvisor::replica`). The tenant's process calls this when it starts,
/// the daemon when it replaces a lost standby.
pub fn connect_replica(target: &crate::settings::StandbyTarget) -> Result<std::net::TcpStream, String> {
    let key = super::cluster::unhex(target.key.as_bytes()).ok_or("the relay key is not 64 hex digits")?;
    let socket = std::net::TcpStream::connect_timeout(&target.address, CONNECT_TIMEOUT).map_err(|e| e.to_string())?;
    let replica = ReplicaOf { epoch: target.epoch, tenant: target.tenant.clone() };
    let tlvs = Tlvs { handed: None, key: Some(key), replica: Some(replica) };
    let header = proxy_header::encode(socket.local_addr().map_err(|e| e.to_string())?, target.address, &tlvs);
    std::io::Write::write_all(&mut &socket, &header).map_err(|e| e.to_string())?;
    mqvisor::replica::set_options(&socket).map_err(|e| e.to_string())?;
    Ok(socket)
}

/// What came to the relay port.
pub enum Relayed {
    /// A client, speaking this (`None`: not said).
    Client(Option<u8>),
    /// A tenant's state, shipped to this node as its standby.
    Replica(ReplicaOf),
}

/// Reads the PROXY v2 header a relaying node sent first on the relay port,
/// within `deadline`; `None` (the connection to be closed) for anything but
/// a header with the fleet's relay key, which is counted.
pub async fn read_header(stream: &mut TcpStream, deadline: Duration) -> Option<Relayed> {
    let header = read_any_header(stream, deadline).await;
    match (header, relay_key()) {
        (Some(Header::Proxy { tlvs: Tlvs { key: Some(given), handed, replica }, .. }), Some(key))
            if same_key(&given, key) =>
        {
            Some(replica.map_or(Relayed::Client(handed), Relayed::Replica))
        }
        (header, _) => {
            RELAY_REFUSED.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(?header, "relay port: closed, no relay key");
            None
        }
    }
}

/// Compares in time independent of where the keys differ.
fn same_key(a: &RelayKey, b: &RelayKey) -> bool {
    a.iter().zip(b).fold(0u8, |differ, (x, y)| differ | (x ^ y)) == 0
}

/// Any PROXY v2 header, read within `deadline`.
async fn read_any_header(stream: &mut TcpStream, deadline: Duration) -> Option<Header> {
    let read = async {
        let mut bytes = vec![0u8; proxy_header::FIXED];
        stream.read_exact(&mut bytes).await.ok()?;
        let total = proxy_header::length(&bytes).ok()?;
        bytes.resize(total, 0);
        stream.read_exact(&mut bytes[proxy_header::FIXED..]).await.ok()?;
        proxy_header::parse(&bytes).ok()
    };
    tokio::time::timeout(deadline, read).await.ok().flatten()
}
