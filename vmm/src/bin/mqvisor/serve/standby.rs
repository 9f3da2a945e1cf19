//! This node as tenants' standby: takes the shipments of a tenant's state
//! (`mqvisor::replica`) that its owner's process sends to the relay port,
//! and keeps a byte-for-byte copy in `STATE_DIR/replicas/NAME.state`.
//!
//! A connection's copy is written to `NAME.new` until its snapshot is whole,
//! then renamed over `NAME.state`, and only then is its epoch written to
//! `NAME.epoch` (what makes a copy whole). A new connection removes the
//! epoch first: the owner starts over because its mirror broke, so the
//! copy there misses what it acknowledged since. Every shipment flagged
//! durable is `fdatasync`ed before it is answered: the owner's guest hears
//! "written" only then.
//!
//! Owns the copies and the newest epoch seen per tenant. Never writes a
//! shipment of an epoch older than the newest that reached this node (a
//! stale owner's process, fenced but not yet gone, gets `ACK_REFUSED`), a
//! shipment outside the file or longer than the bound, or one whose CRC
//! does not match (`ACK_DAMAGED`: the owner sends it again). Never starts a
//! tenant: the cluster does, from a whole copy ([`whole`], [`take`]).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use mqvisor::replica::{ACK_DAMAGED, ACK_DURABLE, ACK_REFUSED, DURABLE, HEAD_LEN, MAX_SHIPMENT, ShipmentHead, WHOLE};
use mqvisor_broker::store::log::crc32c;

use super::config::valid_tenant_name;
use super::proxy_header::ReplicaOf;

/// The largest state file a copy is made of (as `mqvisor run` allows).
const MAX_COPY: u64 = 64 << 30;

/// The newest epoch that reached this node, per tenant: older shipments
/// are refused. Held while a shipment is written, so that a copy taken
/// over ([`take`]) gets no write from its old owner after it.
static NEWEST: Mutex<BTreeMap<String, Arc<Mutex<u64>>>> = Mutex::new(BTreeMap::new());

/// The newest epoch of `tenant` seen here, shared.
fn newest_of(tenant: &str) -> Option<Arc<Mutex<u64>>> {
    let mut all = NEWEST.lock().ok()?;
    Some(all.entry(tenant.to_string()).or_default().clone())
}

/// This node's state directory, once it is a node of a fleet.
static STATE_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Takes replica connections from now on, keeping copies under `state_dir`.
pub fn keep_copies_in(state_dir: &Path) {
    let _ = STATE_DIR.set(state_dir.to_path_buf());
}

/// Serves a replica connection that reached the relay port, on a thread of
/// its own (its writes block on the disk).
pub fn accept(socket: tokio::net::TcpStream, of: ReplicaOf) {
    let Some(state_dir) = STATE_DIR.get() else { return };
    let Ok(socket) = socket.into_std() else { return };
    if socket.set_nonblocking(false).is_err() {
        return;
    }
    // A thread of its own, not tokio's blocking pool: a runtime that
    // stops waits for that pool, and a copy ends only when its owner does.
    let spawned = std::thread::Builder::new().name("standby".into()).spawn(move || receive(socket, of, state_dir));
    if let Err(e) = spawned {
        tracing::warn!("cannot take a replica connection: {e}");
    }
}

/// Where the copies live.
pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("replicas")
}

/// The epoch of the whole copy this node keeps of `tenant`, if it keeps one.
pub fn whole(state_dir: &Path, tenant: &str) -> Option<u64> {
    let dir = dir(state_dir);
    let epoch = std::fs::read_to_string(dir.join(format!("{tenant}.epoch"))).ok()?.trim().parse().ok()?;
    dir.join(format!("{tenant}.state")).is_file().then_some(epoch)
}

/// The tenants this node keeps a copy of (whole or being made).
pub fn copies(state_dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir(state_dir)) else { return Vec::new() };
    let mut names: Vec<String> = entries
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let (tenant, _) = name.rsplit_once('.')?;
            valid_tenant_name(tenant).then(|| tenant.to_string())
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Deletes every copy of `tenant` kept here (a tenant removed from the
/// fleet: its messages must not outlive it on another node's disk).
pub fn delete(state_dir: &Path, tenant: &str) {
    let dir = dir(state_dir);
    for extension in ["epoch", "state", "new"] {
        let _ = std::fs::remove_file(dir.join(format!("{tenant}.{extension}")));
    }
}

/// Moves the whole copy of `tenant` (of epoch `epoch`) to `state_file`,
/// where the tenant's process will boot from it. From then on, no shipment
/// of that epoch or an older one is written here.
pub fn take(state_dir: &Path, tenant: &str, epoch: u64, state_file: &Path) -> std::io::Result<()> {
    let newest = newest_of(tenant).ok_or_else(|| std::io::Error::other("poisoned"))?;
    let mut newest = newest.lock().map_err(|_| std::io::Error::other("poisoned"))?;
    *newest = (*newest).max(epoch.saturating_add(1));
    let dir = dir(state_dir);
    if let Some(parent) = state_file.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::rename(dir.join(format!("{tenant}.state")), state_file)?;
    let _ = std::fs::remove_file(dir.join(format!("{tenant}.epoch")));
    Ok(())
}

/// Serves one replica connection until the owner closes it or breaks a
/// rule.
fn receive(socket: std::net::TcpStream, of: ReplicaOf, state_dir: &Path) {
    if let Err(e) = copy(socket, &of, state_dir) {
        tracing::info!(tenant = %of.tenant, epoch = of.epoch, "replica connection ended: {e}");
    }
}

fn copy(mut socket: std::net::TcpStream, of: &ReplicaOf, state_dir: &Path) -> std::io::Result<()> {
    let refuse = |socket: &mut std::net::TcpStream, why: &str| -> std::io::Result<()> {
        let _ = socket.write_all(&[ACK_REFUSED]);
        Err(std::io::Error::other(why.to_string()))
    };
    if !valid_tenant_name(&of.tenant) {
        return refuse(&mut socket, "not a tenant name");
    }
    let Some(newest) = newest_of(&of.tenant) else { return refuse(&mut socket, "poisoned") };
    if !is_newest(&newest, of.epoch) {
        return refuse(&mut socket, "an older owner's epoch");
    }
    let mut len = [0u8; 8];
    socket.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len);
    if len > MAX_COPY {
        return refuse(&mut socket, "a state file larger than any allowed");
    }
    let dir = dir(state_dir);
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let (new, copy_path) = (dir.join(format!("{}.new", of.tenant)), dir.join(format!("{}.state", of.tenant)));
    // The owner starts over: the copy there was misses what it
    // acknowledged since its mirror broke, and is whole no more.
    let _ = std::fs::remove_file(dir.join(format!("{}.epoch", of.tenant)));
    let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).mode(0o600).open(&new)?;
    file.set_len(len)?;
    let mut data = vec![0u8; MAX_SHIPMENT];
    loop {
        let mut head = [0u8; HEAD_LEN];
        match socket.read_exact(&mut head) {
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            read => read?,
        }
        let head = ShipmentHead::decode(&head);
        if !head.fits(len) {
            return refuse(&mut socket, "a shipment outside the file");
        }
        let data = &mut data[..head.len as usize];
        socket.read_exact(data)?;
        if crc32c(data) != head.crc {
            socket.write_all(&[ACK_DAMAGED])?;
            continue;
        }
        {
            // A newer owner reached this node meanwhile (or the copy was
            // taken over): this one is stale. Checked under the lock the
            // write holds.
            let Ok(seen) = newest.lock() else { return refuse(&mut socket, "poisoned") };
            if of.epoch < *seen {
                drop(seen);
                return refuse(&mut socket, "a newer owner took over");
            }
            file.write_all_at(data, head.offset)?;
            if head.flags & (DURABLE | WHOLE) != 0 {
                file.sync_data()?;
            }
        }
        if head.flags & WHOLE != 0 {
            // The epoch goes last: a copy is never taken for a newer one.
            let epoch = dir.join(format!("{}.epoch", of.tenant));
            let _ = std::fs::remove_file(&epoch);
            std::fs::rename(&new, &copy_path)?;
            std::fs::write(&epoch, of.epoch.to_string())?;
            std::fs::File::open(&dir)?.sync_all()?;
            tracing::info!(tenant = %of.tenant, epoch = of.epoch, bytes = len, "standby copy whole");
        }
        socket.write_all(&[ACK_DURABLE])?;
    }
}

/// True if `epoch` is the newest of its tenant this node has seen (and
/// records it as such).
fn is_newest(newest: &Mutex<u64>, epoch: u64) -> bool {
    let Ok(mut seen) = newest.lock() else { return false };
    if epoch >= *seen {
        *seen = epoch;
        true
    } else {
        false
    }
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};

    use super::*;

    /// A replica connection of `tenant` at `epoch`, served on a thread.
    fn connect(state_dir: &Path, tenant: &str, epoch: u64) -> TcpStream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let owner = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        owner.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        let (socket, _) = listener.accept().unwrap();
        let (of, state_dir) = (ReplicaOf { epoch, tenant: tenant.into() }, state_dir.to_path_buf());
        std::thread::spawn(move || receive(socket, of, &state_dir));
        owner
    }

    /// Ships `data` at `offset` with `flags`; returns the answer.
    fn ship(owner: &mut TcpStream, offset: u64, data: &[u8], flags: u8) -> u8 {
        let len = u32::try_from(data.len()).unwrap();
        let crc = crc32c(data);
        owner.write_all(&ShipmentHead { offset, len, crc, flags }.encode()).unwrap();
        owner.write_all(data).unwrap();
        let mut answer = [0u8; 1];
        owner.read_exact(&mut answer).unwrap();
        answer[0]
    }

    #[test]
    fn an_older_owner_is_refused_a_damaged_shipment_is_asked_again_and_a_taken_copy_gets_nothing() {
        let state_dir = std::env::temp_dir().join(format!("mqvisor-standby-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state_dir);
        let mut owner = connect(&state_dir, "acme", 10);
        owner.write_all(&8192u64.to_le_bytes()).unwrap();
        assert_eq!(ship(&mut owner, 512, b"first", 0), ACK_DURABLE);
        // A CRC that does not match: asked again, nothing written.
        owner.write_all(&ShipmentHead { offset: 0, len: 3, crc: 1, flags: DURABLE }.encode()).unwrap();
        owner.write_all(b"bad").unwrap();
        let mut answer = [0u8; 1];
        owner.read_exact(&mut answer).unwrap();
        assert_eq!(answer[0], ACK_DAMAGED);
        assert_eq!(whole(&state_dir, "acme"), None, "not whole before its snapshot ends");
        assert_eq!(ship(&mut owner, 0, &[], WHOLE | DURABLE), ACK_DURABLE);
        assert_eq!(whole(&state_dir, "acme"), Some(10));
        let copy = std::fs::read(dir(&state_dir).join("acme.state")).unwrap();
        assert_eq!((copy.len(), &copy[512..517], &copy[..3]), (8192, &b"first"[..], &[0u8; 3][..]));
        // An older owner's connection is refused at once.
        let mut stale = connect(&state_dir, "acme", 9);
        stale.read_exact(&mut answer).unwrap();
        assert_eq!(answer[0], ACK_REFUSED);
        // A shipment outside the file ends the connection.
        let mut other = connect(&state_dir, "other", 1);
        other.write_all(&4096u64.to_le_bytes()).unwrap();
        assert_eq!(ship(&mut other, 4096, &[1; 512], DURABLE), ACK_REFUSED);
        // Taken over: the owner's later writes land nowhere.
        let live = state_dir.join("live.state");
        take(&state_dir, "acme", 10, &live).unwrap();
        assert_eq!(ship(&mut owner, 1024, b"late", DURABLE), ACK_REFUSED);
        assert_eq!(&std::fs::read(&live).unwrap()[1024..1028], &[0u8; 4]);
        assert_eq!(copies(&state_dir), vec!["other".to_string()]);
        delete(&state_dir, "other");
        assert!(copies(&state_dir).is_empty());
        let _ = std::fs::remove_dir_all(&state_dir);
    }
}
