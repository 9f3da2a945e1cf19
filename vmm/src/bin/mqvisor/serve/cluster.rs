//! One node of a fleet on etcd (`[cluster]` in serve's configuration):
//! tenants are defined in etcd, each owned by exactly one live node, and
//! every node's front takes any tenant's clients, relaying those of a
//! tenant owned elsewhere to its owner.
//!
//! Keys (values in parentheses):
//! - `/mqvisor/nodes/NODE` (JSON: advertise address, capacity), under this
//!   node's lease;
//! - `/mqvisor/tenants/NAME` (the tenant's TOML table, as `PUT
//!   /tenants/NAME` takes it), no lease: a tenant outlives every node;
//! - `/mqvisor/owners/NAME` (the owner's node name), created under the
//!   owner's lease in a transaction that succeeds only if the key is absent,
//!   so one node at a time owns a tenant and ownership ends with its lease;
//! - `/mqvisor/last/NAME` (the node that last ran it), no lease: whether a
//!   node's own state file of NAME is still its latest state;
//! - `/mqvisor/drain/NODE` (empty), no lease: NODE takes no tenant;
//! - `/mqvisor/standby/NAME` (`NODE EPOCH`), no lease: the node the owner
//!   of NAME under claim revision EPOCH mirrors its state to; once the
//!   owner is gone, that node claims NAME first and boots it from its copy
//!   if the copy is whole and of that epoch (`super::standby`);
//! - `/mqvisor/relay-key` (32 random bytes, hex), no lease: made by the
//!   first node, read by every node; a relayed connection carries it in
//!   its PROXY header, and the relay port closes one without it.
//!
//! Owns the lease ([`keep_lease`]), the decisions of which tenants this
//! node runs and where the others live ([`sync`]), and the answers to the
//! control API's tenant requests in a fleet. Never starts or stops a
//! process itself: it tells the daemon's loop ([`ToDaemon`]), which owns the
//! tenants.
//!
//! Fencing, the timing argument. The lease has a TTL of [`LEASE_TTL`]; it is
//! renewed every TTL/3. etcd sets a renewed lease to expire TTL after it
//! *receives* the renewal, which is after this node *sent* it; so, on this
//! node's clock, the lease lives until at least `sent + TTL`, where `sent`
//! is when the last renewal that was answered was sent (clock rates differ
//! by far less than the margin over a few seconds). This node stops every
//! tenant it runs (SIGKILL, no grace) at `sent + TTL - FENCE_MARGIN`
//! without a newer answered renewal: [`FENCE_MARGIN`] (2 s) before etcd can
//! delete its owner keys, and so before any other node can claim them. A
//! node that lost etcd therefore never runs a tenant another node may also
//! be running. Leader changes in etcd only lengthen leases. What this does
//! not cover: the daemon's one thread stalled for longer than the margin
//! (the fence is late by the stall), and a node whose clock jumps.
//!
//! The daemon is not the only one to fence: each renewal also gives every
//! tenant process of this node the same deadline ([`fence_deadlines`], sent
//! as a `net::fence` datagram), past which the process itself writes
//! nothing more to any client and stops its VM. A daemon that is stopped
//! (SIGSTOP) or stalled while its tenants run on therefore cannot leave them
//! serving, and acknowledging, past the moment another node may claim them.
//! The deadline is a time on the host's monotonic clock, which every
//! process of the host shares: a process that reads it late (stopped,
//! busy) still stops on time, and one stopped past it answers no one once
//! it runs again, as it checks the deadline before every write.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use super::config::{TenantConfig, TenantTable, valid_tenant_name};
use super::control::TenantView;
use super::directory::{Directory, Reach};
use super::etcd::{Etcd, Kv};
use super::proxy_header::RelayKey;
use crate::settings::StandbyTarget;

/// The lease's time to live, seconds.
pub const LEASE_TTL: u64 = 6;
/// Renewals, every TTL/3.
const RENEW_EVERY: Duration = Duration::from_secs(LEASE_TTL / 3);
/// Tenants are stopped this long before the lease can expire in etcd.
pub const FENCE_MARGIN: Duration = Duration::from_secs(2);
/// How often the tenants, owners and nodes are read again.
const SYNC_EVERY: Duration = Duration::from_secs(1);
/// A tenant with no owner for this long is claimed by any node with room,
/// not only by the one its placement picks (which may be unable to).
const CLAIM_ANYWAY_AFTER: Duration = Duration::from_secs(3);
/// A tenant this node could not start is left to other nodes this long.
const RETRY_AFTER: Duration = Duration::from_secs(30);
/// Tenants a node takes unless its `capacity` says otherwise.
const DEFAULT_CAPACITY: u32 = 1000;

const NODES: &str = "/mqvisor/nodes/";
const TENANTS: &str = "/mqvisor/tenants/";
const OWNERS: &str = "/mqvisor/owners/";
/// `/mqvisor/drain/NODE`: NODE is drained (no lease: it stays until undrained).
const DRAIN: &str = "/mqvisor/drain/";
/// `/mqvisor/last/NAME`: the node that last ran tenant NAME (no lease). A
/// node that claims NAME keeps the state file it has of it only if that
/// node is itself: otherwise another node ran NAME since, and the file is
/// stale.
const LAST: &str = "/mqvisor/last/";
const RELAY_KEY_PATH: &str = "/mqvisor/relay-key";
const STANDBY: &str = "/mqvisor/standby/";

/// Connections relayed to another node, and the bytes copied both ways
/// (counted when a relayed connection ends).
pub static RELAYED_CONNECTIONS: AtomicU64 = AtomicU64::new(0);
pub static RELAYED_BYTES: AtomicU64 = AtomicU64::new(0);
/// Connections to the relay port closed without the relay key.
pub static RELAY_REFUSED: AtomicU64 = AtomicU64::new(0);
/// The fleet's relay key, once read from etcd (`/mqvisor/relay-key`).
static RELAY_KEY: OnceLock<RelayKey> = OnceLock::new();
/// Tenants run here whose process lost its standby since the last pass.
static MIRRORS_LOST: std::sync::Mutex<BTreeSet<String>> = std::sync::Mutex::new(BTreeSet::new());

/// Tenant `name`'s process lost its standby: at the next pass its standby
/// key is deleted (that copy misses what comes next, and must never be
/// booted) and another standby is chosen.
pub fn mirror_lost(name: &str) {
    if let Ok(mut lost) = MIRRORS_LOST.lock() {
        lost.insert(name.to_string());
    }
}
/// This node's name, once it is a node of a fleet.
static NODE: OnceLock<String> = OnceLock::new();
/// When this node fences next (see the module doc), for its tenants'
/// processes, which fence themselves at the same moment (`net::fence`).
static FENCE_AT: OnceLock<watch::Sender<Option<Instant>>> = OnceLock::new();

/// When this node fences next, as it changes, if it is a node of a fleet.
pub fn fence_deadlines() -> Option<watch::Receiver<Option<Instant>>> {
    FENCE_AT.get().map(watch::Sender::subscribe)
}

/// This node's figures in a fleet, for `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetStats {
    pub node: String,
    pub relayed_connections: u64,
    pub relayed_bytes: u64,
    pub relay_refused: u64,
}

/// This node's figures, if it is a node of a fleet.
pub fn stats() -> Option<FleetStats> {
    Some(FleetStats {
        node: NODE.get()?.clone(),
        relayed_connections: RELAYED_CONNECTIONS.load(Ordering::Relaxed),
        relayed_bytes: RELAYED_BYTES.load(Ordering::Relaxed),
        relay_refused: RELAY_REFUSED.load(Ordering::Relaxed),
    })
}

/// The fleet's relay key, once this node has read it (until then it
/// neither relays nor takes relayed connections).
pub fn relay_key() -> Option<&'static RelayKey> {
    RELAY_KEY.get()
}

/// Reads the fleet's relay key from etcd, making it first if no node has:
/// retried until etcd answers.
async fn read_relay_key(etcd: &Etcd) -> RelayKey {
    loop {
        let mut fresh = [0u8; 32];
        let made = std::fs::File::open("/dev/urandom")
            .and_then(|mut random| std::io::Read::read_exact(&mut random, &mut fresh))
            .map(|()| hex(&fresh));
        let answer = match made {
            Ok(text) => etcd.create(RELAY_KEY_PATH, text.as_bytes(), 0).await.map_err(|e| e.to_string()),
            Err(e) => Err(format!("no random bytes for a relay key: {e}")),
        };
        let text = match answer {
            Ok((true, _)) => hex(&fresh).into_bytes(),
            Ok((false, Some(held))) => held.value,
            Ok((false, None)) => Vec::new(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the fleet's relay key: retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        match unhex(&text) {
            Some(key) => return key,
            None => {
                tracing::error!("{RELAY_KEY_PATH} in etcd is not 64 hexadecimal digits: no relaying until it is");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
}

/// `bytes` in lower-case hexadecimal.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The relay key written as [`hex`] writes it.
pub fn unhex(text: &[u8]) -> Option<RelayKey> {
    let text = std::str::from_utf8(text).ok()?.trim();
    let mut key = [0u8; 32];
    if text.len() != 2 * key.len() {
        return None;
    }
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(key)
}

/// `[cluster]`, checked.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// etcd's endpoints, `http://HOST:PORT`.
    pub etcd: Vec<String>,
    /// This node's name, unique in the fleet.
    pub node: String,
    /// Where other nodes reach this node's relay port.
    pub advertise: SocketAddr,
    /// Where the relay port listens (default: `advertise`).
    pub relay_listen: SocketAddr,
    /// Tenants this node takes at most.
    pub capacity: u32,
}

impl ClusterConfig {
    /// `[cluster]`'s keys; `listen` is the shared port, which the relay
    /// port must not be.
    pub fn parse(mut table: toml::Table, listen: SocketAddr) -> Result<ClusterConfig, String> {
        let etcd = match table.remove("etcd") {
            Some(toml::Value::Array(list)) if !list.is_empty() => list
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or("[cluster] etcd must be a list of \"http://HOST:PORT\"")?,
            None => return Err("[cluster] etcd is required: a list like [\"http://10.0.0.1:2379\"]".into()),
            Some(_) => return Err("[cluster] etcd must be a non-empty list like [\"http://10.0.0.1:2379\"]".into()),
        };
        Etcd::new(&etcd).map_err(|e| format!("[cluster] etcd: {e}"))?;
        let node = match table.remove("node") {
            Some(toml::Value::String(n)) if valid_tenant_name(&n) => n,
            None => return Err("[cluster] node is required: this node's name, 1 to 64 of a-z, 0-9, '-' and '_'".into()),
            Some(_) => return Err("[cluster] node must be 1 to 64 of a-z, 0-9, '-' and '_'".into()),
        };
        let address = |table: &mut toml::Table, key: &str| match table.remove(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .and_then(|s| s.parse::<SocketAddr>().ok())
                .map(Some)
                .ok_or_else(|| format!("[cluster] {key} must be an address like \"10.0.0.1:1884\"")),
        };
        let advertise = address(&mut table, "advertise")?
            .ok_or("[cluster] advertise is required: where other nodes reach this node's relay port, \"ADDR:PORT\"")?;
        if advertise.ip().is_unspecified() || advertise.port() == 0 {
            return Err("[cluster] advertise must be an address other nodes can reach, with a port".into());
        }
        let relay_listen = address(&mut table, "relay_listen")?.unwrap_or(advertise);
        if relay_listen == listen || advertise == listen {
            return Err("[cluster] the relay port must not be the shared port (listen): relayed clients \
                        arrive with a PROXY header, which only the relay port takes"
                .into());
        }
        let capacity = match table.remove("capacity") {
            None => DEFAULT_CAPACITY,
            Some(v) => v
                .as_integer()
                .and_then(|n| u32::try_from(n).ok())
                .filter(|&n| n > 0)
                .ok_or("[cluster] capacity must be a positive number of tenants")?,
        };
        if let Some(key) = table.keys().next() {
            return Err(format!(
                "[cluster]: unknown key {key:?} (expected etcd, node, advertise, relay_listen, capacity)"
            ));
        }
        Ok(ClusterConfig { etcd, node, advertise, relay_listen, capacity })
    }
}

/// Where the front sends a tenant's clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// This node runs it.
    Here,
    /// Another node does: relay to its relay port.
    There(SocketAddr),
    /// No node does yet: the client is told the server is unavailable.
    Nowhere,
}

/// Every tenant of the fleet and where it lives, read by the accept tasks.
#[derive(Clone, Default)]
pub struct Steering(Arc<RwLock<BTreeMap<String, Place>>>);

impl Steering {
    /// Where `tenant`'s clients go (`None`: no such tenant in the fleet).
    pub fn place(&self, tenant: &str) -> Option<Place> {
        self.0.read().ok()?.get(tenant).copied()
    }

    fn set(&self, places: BTreeMap<String, Place>) {
        if let Ok(mut table) = self.0.write() {
            *table = places;
        }
    }
}

/// What the cluster asks of the daemon's loop.
pub enum ToDaemon {
    /// Run `name` (its TOML `table`): this node owns it under `lease`. The
    /// loop refuses when the lease is no longer the current one.
    /// Its state comes from `state`; its processes mirror their state to
    /// `standby`, if one is given.
    Own {
        name: String,
        table: String,
        lease: i64,
        state: StateFrom,
        standby: Option<StandbyTarget>,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Hand `name`'s process `connection` to a new standby (`target`), and
    /// mirror its next processes there too.
    Standby { name: String, target: StandbyTarget, connection: std::net::TcpStream },
    /// Stop running `name`: removed, or owned elsewhere now.
    /// When `removed` (from the fleet), its files here go too.
    Disown { name: String, removed: bool },
    /// The lease is lost or about to be: stop every tenant now.
    Fence,
}

/// Where a tenant claimed by this node gets its state from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateFrom {
    /// The state file this node has: it was the last to run the tenant.
    Kept,
    /// This node's standby copy, whole and of the last owner's epoch (this).
    Copy(u64),
    /// Nothing: another node ran it since this one last did, and left no
    /// copy here (what this node has is moved aside).
    Fresh,
}

/// The control API's tenant requests, in a fleet.
pub enum Request {
    Add {
        name: String,
        table: String,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Remove {
        name: String,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// The fleet's tenants, `local` (this node's own views) among them.
    List {
        local: Vec<TenantView>,
        reply: oneshot::Sender<Vec<TenantView>>,
    },
    Node {
        request: NodeRequest,
        reply: oneshot::Sender<Result<Vec<NodeView>, String>>,
    },
}

/// What `mqvisor node` asks.
pub enum NodeRequest {
    List,
    /// Move the node's tenants away and place none there.
    Drain(String),
    /// Place tenants there again.
    Undrain(String),
}

/// One live node as `mqvisor node list` shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NodeView {
    pub name: String,
    pub advertise: String,
    pub capacity: u32,
    /// Tenants it owns.
    pub tenants: u32,
    pub drained: bool,
}

/// The lease as the daemon's loop and [`sync`] see it: its id while it is
/// safe to run tenants under it.
pub type Lease = watch::Receiver<Option<i64>>;

/// Keeps this node registered under a lease, renewing it every TTL/3, and
/// fences (see the module doc) when renewals stop being answered; then
/// registers again under a new lease.
pub async fn keep_lease(
    etcd: Etcd,
    config: ClusterConfig,
    lease: watch::Sender<Option<i64>>,
    daemon: mpsc::UnboundedSender<ToDaemon>,
) {
    let registration = serde_json::json!({
        "advertise": config.advertise.to_string(),
        "capacity": config.capacity,
    })
    .to_string();
    let ttl = Duration::from_secs(LEASE_TTL);
    // A lease given up (fenced) but not yet revoked: etcd being out of
    // reach is what fences, and an etcd that comes back from a restart
    // gives every lease a full TTL again, which would keep this node's old
    // owner keys (and so its tenants, unserved) another TTL.
    let mut previous: Option<i64> = None;
    // The other lease holding this node's name, once said.
    let mut said_held_by = None;
    loop {
        let sent = Instant::now();
        let id = match etcd.grant(LEASE_TTL).await {
            Ok(id) => id,
            Err(e) => {
                tracing::warn!(error = %e, "no lease: retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let key = format!("{NODES}{}", config.node);
        if let Some(old) = previous
            && etcd.revoke(old).await.is_ok()
        {
            previous = None;
        }
        // Created only where no live lease holds the name: a second node
        // given the same name must not take over the first one's key (its
        // tenants would become unreachable through every other node).
        match etcd.create(&key, registration.as_bytes(), id).await {
            Ok((true, _)) => {}
            Ok((false, holder)) => {
                let _ = etcd.revoke(id).await;
                let holder = holder.map_or(0, |kv| kv.lease);
                if Some(holder) != previous && said_held_by.replace(holder) != Some(holder) {
                    tracing::error!(
                        node = %config.node,
                        lease = holder,
                        "another node of this name is registered (or this node's previous run, until its lease \
                         expires): this node serves no tenant until the name is free"
                    );
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot register this node: retrying");
                let _ = etcd.revoke(id).await;
                continue;
            }
        }
        tracing::info!(node = %config.node, lease = id, "registered in etcd");
        let deadlines = FENCE_AT.get_or_init(|| watch::channel(None).0);
        // Before the lease is said: every tenant started under it has a deadline.
        deadlines.send_replace(Some(sent + ttl - FENCE_MARGIN));
        if let Some(old) = previous.take()
            && let Err(e) = etcd.revoke(old).await
        {
            // Its keys go when it expires, a TTL from now at most.
            tracing::warn!(lease = old, error = %e, "cannot revoke the lease given up");
        }
        let _ = lease.send(Some(id));
        let mut renewed = sent;
        loop {
            let fence_at = renewed + ttl - FENCE_MARGIN;
            let next = (renewed + RENEW_EVERY).min(fence_at);
            tokio::time::sleep_until(next.into()).await;
            if Instant::now() >= fence_at {
                break;
            }
            let sent = Instant::now();
            let answered = tokio::time::timeout(fence_at.saturating_duration_since(sent), etcd.keepalive(id)).await;
            match answered {
                Ok(Ok(left)) if left > 0 => {
                    renewed = sent;
                    deadlines.send_replace(Some(renewed + ttl - FENCE_MARGIN));
                }
                Ok(Ok(_)) => {
                    tracing::warn!(lease = id, "the lease has expired in etcd");
                    break;
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "lease renewal failed");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(_) => {}
            }
        }
        // Said before the daemon stops them: from here no new tenant starts
        // under this lease.
        let _ = lease.send(None);
        let _ = daemon.send(ToDaemon::Fence);
        tracing::warn!(node = %config.node, lease = id, "lease lost: every tenant here stopped (fenced)");
        if !matches!(tokio::time::timeout(Duration::from_secs(1), etcd.revoke(id)).await, Ok(Ok(()))) {
            previous = Some(id);
        }
    }
}

/// What [`sync`] last read from etcd.
#[derive(Default)]
struct Snapshot {
    tenants: BTreeMap<String, Vec<u8>>,
    /// The revision that created each tenant's key: a tenant removed and
    /// added again has a new one.
    created: BTreeMap<String, i64>,
    owners: BTreeMap<String, Kv>,
    /// Each node's relay address and capacity.
    nodes: BTreeMap<String, (SocketAddr, u32)>,
    /// Drained nodes.
    drained: BTreeSet<String>,
    /// Each tenant's standby node and the epoch it stands by for.
    standbys: BTreeMap<String, (String, u64)>,
    /// Each node's lease: a node that restarted has a new one.
    leases: BTreeMap<String, i64>,
}

impl Snapshot {
    /// The standby of `tenant` and the epoch it stands by for, if that
    /// epoch is of this tenant: a claim made after its key was created (a
    /// tenant removed and added again under the same name is another
    /// tenant, whose state must never come from the old one's copy).
    fn standby(&self, tenant: &str) -> Option<(&str, u64)> {
        let (node, epoch) = self.standbys.get(tenant)?;
        let created = u64::try_from(*self.created.get(tenant)?).ok()?;
        (*epoch > created).then_some((node.as_str(), *epoch))
    }
}

fn strip<'a>(key: &'a str, prefix: &str) -> Option<&'a str> {
    key.strip_prefix(prefix).filter(|n| valid_tenant_name(n))
}

async fn read(etcd: &Etcd) -> Result<Snapshot, super::etcd::EtcdError> {
    let mut snapshot = Snapshot::default();
    for kv in etcd.range(TENANTS, true).await? {
        if let Some(name) = strip(&kv.key, TENANTS) {
            snapshot.created.insert(name.to_string(), kv.create_revision);
            snapshot.tenants.insert(name.to_string(), kv.value);
        }
    }
    for kv in etcd.range(OWNERS, true).await? {
        if let Some(name) = strip(&kv.key, OWNERS) {
            snapshot.owners.insert(name.to_string(), kv);
        }
    }
    for kv in etcd.range(STANDBY, true).await? {
        let Some(name) = strip(&kv.key, STANDBY) else { continue };
        let value = String::from_utf8_lossy(&kv.value).into_owned();
        if let Some((node, epoch)) = value.split_once(' ')
            && let Ok(epoch) = epoch.parse()
        {
            snapshot.standbys.insert(name.to_string(), (node.to_string(), epoch));
        }
    }
    for kv in etcd.range(DRAIN, true).await? {
        if let Some(name) = strip(&kv.key, DRAIN) {
            snapshot.drained.insert(name.to_string());
        }
    }
    for kv in etcd.range(NODES, true).await? {
        let Some(name) = strip(&kv.key, NODES) else { continue };
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(&kv.value) else { continue };
        let advertise = value.get("advertise").and_then(|a| a.as_str()).and_then(|a| a.parse().ok());
        let capacity = value.get("capacity").and_then(serde_json::Value::as_u64);
        snapshot.leases.insert(name.to_string(), kv.lease);
        if let (Some(advertise), Some(capacity)) = (advertise, capacity) {
            snapshot.nodes.insert(name.to_string(), (advertise, u32::try_from(capacity).unwrap_or(u32::MAX)));
        }
    }
    Ok(snapshot)
}

/// FNV-1a, 64 bits: the same on every node and every build (std's hasher
/// promises neither).
fn fnv(parts: &[&str]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325_u64;
    for part in parts {
        for &b in part.as_bytes().iter().chain(&[0xff]) {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    // FNV mixes its last bytes poorly: a finalizer (MurmurHash3's).
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash
}

/// The node that should own `tenant`: weighted rendezvous hashing, each
/// node weighted by its free capacity (`free`, nodes with none left out).
/// Every node computes the same answer from the same snapshot.
fn placement<'a>(tenant: &str, free: impl Iterator<Item = (&'a str, u32)>) -> Option<&'a str> {
    free.filter(|&(_, room)| room > 0)
        .map(|(node, room)| {
            // A uniform number in (0, 1) from the hash: -room / ln(u) is the
            // score of weighted rendezvous hashing (largest wins).
            let u = ((fnv(&[node, tenant]) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            (node, -f64::from(room) / u.ln())
        })
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(node, _)| node)
}

/// The fleet's loop on this node: reads tenants, owners and nodes every
/// [`SYNC_EVERY`], claims the unowned tenants placement gives this node,
/// has the daemon run the ones it owns and drop the others, and keeps the
/// front's [`Steering`] and [`Directory`] up to date. Answers the control
/// API's requests in between.
#[allow(clippy::too_many_arguments)]
pub async fn sync(
    etcd: Etcd,
    config: ClusterConfig,
    defaults: TenantTable,
    base: PathBuf,
    lease: Lease,
    daemon: mpsc::UnboundedSender<ToDaemon>,
    mut requests: mpsc::UnboundedReceiver<Request>,
    steering: Steering,
    directory: Directory,
) {
    let me = config.node.as_str();
    let _ = NODE.set(config.node.clone());
    let _ = RELAY_KEY.set(read_relay_key(&etcd).await);
    // Tenants the daemon runs for this node, with the owner key's revision.
    let mut running: BTreeMap<String, i64> = BTreeMap::new();
    // The revision that created the key of each tenant run here, when it
    // began to run here.
    let mut started_as: BTreeMap<String, i64> = BTreeMap::new();
    let mut unowned_since: BTreeMap<String, Instant> = BTreeMap::new();
    // The standby of each tenant run here, with that node's lease when it
    // was chosen (none: no other node had room).
    let mut standing: BTreeMap<String, Option<(String, i64)>> = BTreeMap::new();
    // Tenants with a copy here that the last read did not list.
    let mut copies_gone: BTreeSet<String> = BTreeSet::new();
    let mut cannot: BTreeMap<String, Instant> = BTreeMap::new();
    let mut snapshot = Snapshot::default();
    // Each tenant's settings as read from its table (and the table they
    // were read from): what the front needs of a tenant run elsewhere to
    // route its TLS and WebSocket clients (a certificate or not, its own
    // host names). Read again only when the table changes.
    let mut settings: BTreeMap<String, (Vec<u8>, Option<TenantConfig>)> = BTreeMap::new();
    let mut tick = tokio::time::interval(SYNC_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Some(request) = requests.recv() => {
                answer(request, &etcd, &defaults, &base, &snapshot, me).await;
                // A change is acted on at once, not at the next tick.
            }
        }
        let current = *lease.borrow();
        snapshot = match read(&etcd).await {
            Ok(snapshot) => snapshot,
            Err(e) => {
                // The tenants run on while the lease holds: its keeper fences.
                tracing::warn!(error = %e, "cannot read the fleet from etcd");
                continue;
            }
        };
        if current.is_none() {
            // Fenced: the daemon dropped every tenant.
            running.clear();
        }
        // A drained node has no room: nothing is placed there.
        let mut free: BTreeMap<&str, u32> = snapshot
            .nodes
            .iter()
            .map(|(n, &(_, cap))| (n.as_str(), if snapshot.drained.contains(n) { 0 } else { cap }))
            .collect();
        for owner in snapshot.owners.values() {
            if let Some(room) = std::str::from_utf8(&owner.value).ok().and_then(|n| free.get_mut(n)) {
                *room = room.saturating_sub(1);
            }
        }
        let now = Instant::now();
        cannot.retain(|_, since| now.duration_since(*since) < RETRY_AFTER);
        let mut places = BTreeMap::new();
        for (name, table) in &snapshot.tenants {
            let owner = snapshot.owners.get(name);
            let mine = owner.is_some_and(|kv| kv.value == me.as_bytes() && Some(kv.lease) == current);
            let created = snapshot.created.get(name).copied().unwrap_or(0);
            if started_as.get(name).is_some_and(|&was| was != created) && running.remove(name).is_some() {
                // Removed and added again between two reads: what runs here
                // (its process, its state, its settings) is the old
                // tenant's. Stopped and its files deleted; run afresh from
                // the next pass.
                tracing::info!(tenant = %name, "added again: its old process and files go");
                let _ = daemon.send(ToDaemon::Disown { name: name.clone(), removed: true });
                started_as.remove(name);
                places.insert(name.clone(), Place::Nowhere);
                continue;
            }
            if !mine && running.remove(name).is_some() {
                let _ = daemon.send(ToDaemon::Disown { name: name.clone(), removed: false });
            }
            let place = match (owner, current) {
                (Some(kv), _) if mine && kv.create_revision < created => {
                    // A claim of the tenant that was removed before this one
                    // was added under its name: let go, claimed afresh (its
                    // epoch must be this tenant's, or its standby's copy
                    // would never be booted).
                    let _ = etcd.delete_if(&format!("{OWNERS}{name}"), kv.create_revision).await;
                    Place::Nowhere
                }
                (Some(kv), Some(id)) if mine => {
                    if running.contains_key(name) {
                        Place::Here
                    } else {
                        let owned = (id, kv.create_revision);
                        let here = Here::of(name, (me, &base, &defaults), &snapshot, &free);
                        let place =
                            run_here(&etcd, &daemon, name, table, owned, &here, &mut running, &mut cannot).await;
                        standing.insert(name.clone(), here.standby_node(&snapshot));
                        place
                    }
                }
                (Some(kv), _) => {
                    unowned_since.remove(name);
                    let node = std::str::from_utf8(&kv.value).unwrap_or("");
                    match snapshot.nodes.get(node) {
                        Some(&(advertise, _)) if node != me => Place::There(advertise),
                        _ => Place::Nowhere,
                    }
                }
                (None, lease_now) => {
                    let since = *unowned_since.entry(name.clone()).or_insert(now);
                    // The tenant's standby, alive and with room, claims it
                    // first (it has its state); otherwise placement picks.
                    let standby = snapshot.standby(name).map(|(node, _)| node).filter(|node| {
                        snapshot.nodes.contains_key(*node) && free.get(node).is_some_and(|&room| room > 0)
                    });
                    let picked = match standby {
                        Some(node) => node == me,
                        None => placement(name, free.iter().map(|(&n, &room)| (n, room))) == Some(me),
                    };
                    let anyway =
                        now.duration_since(since) >= CLAIM_ANYWAY_AFTER && free.get(me).is_some_and(|&room| room > 0);
                    match lease_now {
                        Some(id) if (picked || anyway) && !cannot.contains_key(name) => {
                            let here = Here::of(name, (me, &base, &defaults), &snapshot, &free);
                            let place = claim(&etcd, &daemon, name, table, id, &here, &mut running, &mut cannot).await;
                            standing.insert(name.clone(), here.standby_node(&snapshot));
                            if place == Place::Here
                                && let Some(room) = free.get_mut(me)
                            {
                                // Room taken within this pass, so a pass
                                // that sees many unowned tenants keeps to
                                // `capacity`.
                                *room = room.saturating_sub(1);
                            }
                            place
                        }
                        _ => Place::Nowhere,
                    }
                }
            };
            if place != Place::Nowhere {
                unowned_since.remove(name);
            }
            if running.contains_key(name) {
                started_as.entry(name.clone()).or_insert(created);
            }
            places.insert(name.clone(), place);
        }
        started_as.retain(|name, _| running.contains_key(name));
        standing.retain(|name, _| running.contains_key(name));
        let lost = MIRRORS_LOST.lock().map(|mut lost| std::mem::take(&mut *lost)).unwrap_or_default();
        for name in lost.iter().filter(|name| running.contains_key(*name)) {
            tracing::warn!(tenant = %name, "its standby is lost: that copy is stale from now on");
            if let Err(e) = etcd.delete(&format!("{STANDBY}{name}")).await {
                tracing::warn!(tenant = %name, error = %e, "cannot retire its standby key");
            }
            standing.insert(name.clone(), None);
        }
        // A standby that is gone (or came back as a new run of its node,
        // without the copy's latest writes) is replaced: the tenant's
        // process is handed a connection to another node, which it sends
        // its state to whole, then every write.
        for (name, standby) in standing.iter_mut() {
            let alive = standby.as_ref().is_some_and(|(node, lease)| snapshot.leases.get(node) == Some(lease));
            let Some(&epoch) = running.get(name).filter(|_| !alive) else { continue };
            let table = snapshot.tenants.get(name).and_then(|t| std::str::from_utf8(t).ok());
            if !defaults.mirrored(&table.and_then(|t| toml::from_str(t).ok()).unwrap_or_default()) {
                continue;
            }
            let Some((node, address)) = standby_for(name, me, &snapshot.nodes, &free) else { continue };
            match replace_standby(&etcd, name, (node, address), epoch).await {
                Ok((target, connection)) => {
                    tracing::info!(tenant = %name, standby = node, "a new standby");
                    let _ = daemon.send(ToDaemon::Standby { name: name.clone(), target, connection });
                    *standby = snapshot.leases.get(node).map(|&lease| (node.to_string(), lease));
                }
                Err(e) => tracing::warn!(tenant = %name, standby = node, "cannot reach the new standby: {e}"),
            }
        }
        // Removed from the fleet, or this node drained: stopped here, its
        // owner key let go (to another node, when it is drained).
        let drained = snapshot.drained.contains(me);
        let removed: Vec<String> =
            running.keys().filter(|n| drained || !snapshot.tenants.contains_key(*n)).cloned().collect();
        for name in removed {
            if let Some(revision) = running.remove(&name) {
                let removed = !snapshot.tenants.contains_key(&name);
                let _ = daemon.send(ToDaemon::Disown { name: name.clone(), removed });
                let _ = etcd.delete_if(&format!("{OWNERS}{name}"), revision).await;
                if drained {
                    tracing::info!(tenant = %name, "drained: left to the other nodes");
                    places.insert(name.clone(), Place::Nowhere);
                }
            }
        }
        unowned_since.retain(|name, _| snapshot.tenants.contains_key(name));
        // Copies kept here of tenants gone from the fleet (in two reads in
        // a row: one read may predate a tenant just added) are deleted.
        let gone: BTreeSet<String> =
            super::standby::copies(&base).into_iter().filter(|name| !snapshot.tenants.contains_key(name)).collect();
        for name in gone.intersection(&copies_gone) {
            tracing::info!(tenant = %name, "removed from the fleet: its standby copy here deleted");
            super::standby::delete(&base, name);
        }
        copies_gone = gone;
        // The front knows every tenant of the fleet (those run here are
        // entered with their own settings by the daemon's loop).
        let before: BTreeSet<String> = steering.0.read().map(|t| t.keys().cloned().collect()).unwrap_or_default();
        for gone in before.iter().filter(|n| !places.contains_key(*n)) {
            directory.remove(gone);
        }
        settings.retain(|name, _| snapshot.tenants.contains_key(name));
        for (name, place) in &places {
            if *place == Place::Here {
                continue;
            }
            let Some(table) = snapshot.tenants.get(name) else { continue };
            if settings.get(name).is_none_or(|(read, _)| read != table) {
                let config = std::str::from_utf8(table)
                    .ok()
                    .and_then(|text| toml::from_str::<toml::Table>(text).ok())
                    .and_then(|parsed| defaults.added(parsed, &base).ok());
                settings.insert(name.clone(), (table.clone(), config));
            }
            let entered = match settings.get(name) {
                Some((_, Some(config))) => directory.enter(name, config),
                _ => Err(String::new()),
            };
            if entered.is_err() {
                // Known, so that its clients are told it is unavailable.
                let _ = directory.insert(name, Reach::Plain, &[]);
            }
        }
        steering.set(places);
    }
}

/// Claims `name` under `lease`; runs it here when the claim wins.
#[allow(clippy::too_many_arguments)]
async fn claim(
    etcd: &Etcd,
    daemon: &mpsc::UnboundedSender<ToDaemon>,
    name: &str,
    table: &[u8],
    lease: i64,
    here: &Here<'_>,
    running: &mut BTreeMap<String, i64>,
    cannot: &mut BTreeMap<String, Instant>,
) -> Place {
    let key = format!("{OWNERS}{name}");
    match etcd.create(&key, here.me.as_bytes(), lease).await {
        Ok((true, _)) => {}
        Ok((false, _)) => return Place::Nowhere,
        Err(e) => {
            tracing::warn!(tenant = %name, error = %e, "claim failed");
            return Place::Nowhere;
        }
    }
    // The revision is read back for a removal that must not delete a
    // later owner's key.
    let revision = match etcd.range(&key, false).await {
        Ok(kvs) => kvs.into_iter().find(|kv| kv.lease == lease).map_or(0, |kv| kv.create_revision),
        Err(_) => 0,
    };
    tracing::info!(tenant = %name, lease, revision, "claimed");
    run_here(etcd, daemon, name, table, (lease, revision), here, running, cannot).await
}

/// This node, as the claim of one tenant sees it.
struct Here<'a> {
    me: &'a str,
    state_dir: &'a std::path::Path,
    /// The node to mirror the tenant's state to, and its relay address.
    standby: Option<(&'a str, SocketAddr)>,
    /// The epoch this node stands by for, if it is the tenant's standby.
    stood_by: Option<u64>,
    /// Serve's `[defaults]`: whether tenants are mirrored unless they say.
    defaults: &'a TenantTable,
}

impl<'a> Here<'a> {
    /// The standby chosen and its node's lease now.
    fn standby_node(&self, snapshot: &Snapshot) -> Option<(String, i64)> {
        let (node, _) = self.standby?;
        Some((node.to_string(), *snapshot.leases.get(node)?))
    }

    fn of(
        tenant: &str,
        (me, state_dir, defaults): (&'a str, &'a std::path::Path, &'a TenantTable),
        snapshot: &'a Snapshot,
        free: &BTreeMap<&str, u32>,
    ) -> Here<'a> {
        Here {
            me,
            state_dir,
            defaults,
            standby: standby_for(tenant, me, &snapshot.nodes, free),
            stood_by: snapshot.standby(tenant).filter(|(node, _)| *node == me).map(|(_, epoch)| epoch),
        }
    }
}

/// Names `node` (at `address`) the standby of `tenant` owned under
/// `epoch`, and connects to it: the PROXY header sent, the socket ready
/// for the tenant's state disk.
async fn replace_standby(
    etcd: &Etcd,
    tenant: &str,
    (node, address): (&str, SocketAddr),
    epoch: i64,
) -> Result<(StandbyTarget, std::net::TcpStream), String> {
    let key = hex(relay_key().ok_or("the relay key is not read yet")?);
    let epoch = u64::try_from(epoch).map_err(|e| e.to_string())?;
    let target = StandbyTarget { address, tenant: tenant.to_string(), epoch, key };
    let connecting = target.clone();
    let stream = tokio::task::spawn_blocking(move || super::relay::connect_replica(&connecting))
        .await
        .map_err(|e| e.to_string())??;
    // Said before the process mirrors there: should this node go, that
    // node claims the tenant first.
    let value = format!("{node} {epoch}");
    etcd.put(&format!("{STANDBY}{tenant}"), value.as_bytes(), 0).await.map_err(|e| e.to_string())?;
    Ok((target, stream))
}

/// The node a tenant owned by `me` mirrors its state to: placement among
/// the other nodes with room.
fn standby_for<'a>(
    tenant: &str,
    me: &str,
    nodes: &'a BTreeMap<String, (SocketAddr, u32)>,
    free: &BTreeMap<&str, u32>,
) -> Option<(&'a str, SocketAddr)> {
    let others =
        nodes.iter().filter(|(n, _)| *n != me).map(|(n, _)| (n.as_str(), free.get(n.as_str()).copied().unwrap_or(0)));
    let node = placement(tenant, others)?;
    nodes.get_key_value(node).map(|(n, &(advertise, _))| (n.as_str(), advertise))
}

/// Runs `name`, owned here (`owned`: the lease and the owner key's
/// revision); one that cannot run here has its owner key let go and is
/// left to others for a while.
#[allow(clippy::too_many_arguments)]
async fn run_here(
    etcd: &Etcd,
    daemon: &mpsc::UnboundedSender<ToDaemon>,
    name: &str,
    table: &[u8],
    (lease, revision): (i64, i64),
    here: &Here<'_>,
    running: &mut BTreeMap<String, i64>,
    cannot: &mut BTreeMap<String, Instant>,
) -> Place {
    match own(etcd, daemon, name, table, (lease, revision), here).await {
        Ok(()) => {
            running.insert(name.to_string(), revision);
            Place::Here
        }
        Err(e) => {
            tracing::warn!(tenant = %name, error = %e, "cannot run it here: left to others");
            cannot.insert(name.to_string(), Instant::now());
            let _ = etcd.delete_if(&format!("{OWNERS}{name}"), revision).await;
            Place::Nowhere
        }
    }
}

/// Has the daemon run `name` (owned under `(lease, epoch)`), from the state
/// file this node has of it if this node was the last to run it
/// ([`LAST`]), else from this node's standby copy if it is whole and of the
/// last owner's epoch, else from nothing; its processes mirror their state
/// to `here.standby`, if there is one.
async fn own(
    etcd: &Etcd,
    daemon: &mpsc::UnboundedSender<ToDaemon>,
    name: &str,
    table: &[u8],
    (lease, epoch): (i64, i64),
    here: &Here<'_>,
) -> Result<(), String> {
    let table = String::from_utf8(table.to_vec()).map_err(|_| "its table in etcd is not UTF-8".to_string())?;
    let me = here.me;
    let last = format!("{LAST}{name}");
    let kept =
        etcd.range(&last, false).await.map_err(|e| e.to_string())?.first().is_some_and(|kv| kv.value == me.as_bytes());
    let copy = here.stood_by.filter(|_| !kept).and_then(|stood_by| {
        let whole = super::standby::whole(here.state_dir, name);
        if whole != Some(stood_by) {
            tracing::warn!(tenant = %name, epoch = stood_by, copy = ?whole, "this node's standby copy is not whole for that epoch: starting without it");
        }
        (whole == Some(stood_by)).then_some(StateFrom::Copy(stood_by))
    });
    let state = if kept { StateFrom::Kept } else { copy.unwrap_or(StateFrom::Fresh) };
    if !kept {
        // Said before it runs here: a node that ran it before must not take
        // its own old state for the latest once this one has run it.
        etcd.put(&last, me.as_bytes(), 0).await.map_err(|e| e.to_string())?;
    }
    let parsed: toml::Table = toml::from_str(&table).unwrap_or_default();
    let mirrored = here.defaults.mirrored(&parsed);
    let standby = match (here.standby.filter(|_| mirrored), relay_key().map(|key| hex(key))) {
        (Some((node, address)), Some(key)) => {
            // Said before the first process runs: should this node go, that
            // node claims the tenant first.
            let value = format!("{node} {epoch}");
            etcd.put(&format!("{STANDBY}{name}"), value.as_bytes(), 0).await.map_err(|e| e.to_string())?;
            let epoch = u64::try_from(epoch).unwrap_or(0);
            Some(StandbyTarget { address, tenant: name.to_string(), epoch, key })
        }
        _ => None,
    };
    let (reply, answer) = oneshot::channel();
    daemon
        .send(ToDaemon::Own { name: name.to_string(), table, lease, state, standby, reply })
        .map_err(|_| "the daemon is stopping".to_string())?;
    answer.await.map_err(|_| "the daemon is stopping".to_string())?
}

/// Answers one control API request from etcd.
async fn answer(
    request: Request,
    etcd: &Etcd,
    defaults: &TenantTable,
    base: &std::path::Path,
    snapshot: &Snapshot,
    me: &str,
) {
    match request {
        Request::Add { name, table, reply } => {
            let added = async {
                if !valid_tenant_name(&name) {
                    return Err(format!("tenant name {name:?}: use 1 to 64 of a-z, 0-9, '-' and '_'"));
                }
                // Checked here as every node would check it: a table no node
                // can run never enters the fleet.
                let parsed: toml::Table =
                    toml::from_str(&table).map_err(|e| format!("tenant {name}: {}", e.message()))?;
                let tenant = defaults.added(parsed, base).map_err(|e| format!("tenant {name}: {e}"))?;
                if tenant.listen.is_some() {
                    return Err(format!("tenant {name}: a port of its own is not available in a fleet"));
                }
                match etcd.create(&format!("{TENANTS}{name}"), table.as_bytes(), 0).await {
                    Ok((true, _)) => {
                        tracing::info!(tenant = %name, "added to the fleet");
                        Ok(())
                    }
                    Ok((false, _)) => Err(format!("tenant {name:?} exists")),
                    Err(e) => Err(format!("tenant {name}: {e}")),
                }
            }
            .await;
            let _ = reply.send(added);
        }
        Request::Remove { name, reply } => {
            let removed = match etcd.delete(&format!("{TENANTS}{name}")).await {
                Ok(true) => {
                    tracing::info!(tenant = %name, "removed from the fleet");
                    // Added again later, it starts empty wherever it lands
                    // (and its standbys drop their copies).
                    let _ = etcd.delete(&format!("{LAST}{name}")).await;
                    let _ = etcd.delete(&format!("{STANDBY}{name}")).await;
                    Ok(())
                }
                Ok(false) => Err(format!("no tenant {name:?}")),
                Err(e) => Err(format!("tenant {name}: {e}")),
            };
            let _ = reply.send(removed);
        }
        Request::Node { request, reply } => {
            let answer = match request {
                NodeRequest::List => {
                    let mut owned: BTreeMap<&str, u32> = BTreeMap::new();
                    for kv in snapshot.owners.values() {
                        if let Ok(node) = std::str::from_utf8(&kv.value) {
                            *owned.entry(node).or_default() += 1;
                        }
                    }
                    Ok(snapshot
                        .nodes
                        .iter()
                        .map(|(name, &(advertise, capacity))| NodeView {
                            name: name.clone(),
                            advertise: advertise.to_string(),
                            capacity,
                            tenants: owned.get(name.as_str()).copied().unwrap_or(0),
                            drained: snapshot.drained.contains(name),
                        })
                        .collect())
                }
                NodeRequest::Drain(node) if !snapshot.nodes.contains_key(&node) => {
                    Err(format!("no node {node:?} is registered in the fleet"))
                }
                NodeRequest::Drain(node) => match etcd.put(&format!("{DRAIN}{node}"), b"", 0).await {
                    Ok(()) => {
                        tracing::info!(node = %node, "drained");
                        Ok(Vec::new())
                    }
                    Err(e) => Err(format!("node {node}: {e}")),
                },
                NodeRequest::Undrain(node) => match etcd.delete(&format!("{DRAIN}{node}")).await {
                    Ok(true) => {
                        tracing::info!(node = %node, "undrained");
                        Ok(Vec::new())
                    }
                    Ok(false) => Err(format!("no node {node:?} is drained")),
                    Err(e) => Err(format!("node {node}: {e}")),
                },
            };
            let _ = reply.send(answer);
        }
        Request::List { local, reply } => {
            let mut local: BTreeMap<String, TenantView> = local.into_iter().map(|v| (v.name.clone(), v)).collect();
            let views = snapshot
                .tenants
                .keys()
                .map(|name| {
                    let owner = snapshot.owners.get(name).and_then(|kv| String::from_utf8(kv.value.clone()).ok());
                    match local.remove(name) {
                        Some(view) => TenantView { node: Some(Some(me.to_string())), ..view },
                        None => TenantView {
                            state: if owner.is_some() { "elsewhere" } else { "unplaced" }.into(),
                            error: None,
                            node: Some(owner),
                            ..TenantView::failed(name, "")
                        },
                    }
                })
                .collect();
            let _ = reply.send(views);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ClusterConfig, String> {
        ClusterConfig::parse(toml::from_str(text).unwrap(), "127.0.0.1:1883".parse().unwrap())
    }

    #[test]
    fn cluster_keys_are_checked_and_named() {
        let c = parse("etcd = [\"http://127.0.0.1:2379\"]\nnode = \"h1\"\nadvertise = \"10.0.0.1:1884\"\n").unwrap();
        assert_eq!((c.node.as_str(), c.relay_listen, c.capacity), ("h1", c.advertise, DEFAULT_CAPACITY));
        let err = |text: &str| parse(text).unwrap_err();
        assert!(err("node = \"h1\"\nadvertise = \"10.0.0.1:1\"").contains("etcd is required"));
        assert!(err("etcd = [\"https://e:1\"]\nnode = \"h1\"\nadvertise = \"10.0.0.1:1\"").contains("only http://"));
        assert!(
            err("etcd = [\"http://e:1\"]\nnode = \"H 1\"\nadvertise = \"10.0.0.1:1\"").contains("node must be 1 to 64")
        );
        assert!(err("etcd = [\"http://e:1\"]\nadvertise = \"10.0.0.1:1\"").contains("node is required"));
        assert!(err("etcd = \"http://e:1\"\nnode = \"h1\"\nadvertise = \"10.0.0.1:1\"").contains("non-empty list"));
        assert!(err("etcd = [\"http://e:1\"]\nnode = \"h1\"").contains("advertise is required"));
        assert!(err("etcd = [\"http://e:1\"]\nnode = \"h1\"\nadvertise = \"0.0.0.0:1\"").contains("can reach"));
        assert!(err("etcd = [\"http://e:1\"]\nnode = \"h1\"\nadvertise = \"127.0.0.1:1883\"").contains("shared port"));
        let extra = "etcd = [\"http://e:1\"]\nnode = \"h1\"\nadvertise = \"10.0.0.1:1\"\ncapacity = 0";
        assert!(err(extra).contains("capacity must be"));
        let unknown = "etcd = [\"http://e:1\"]\nnode = \"h1\"\nadvertise = \"10.0.0.1:1\"\nnodes = 1";
        assert!(err(unknown).contains("unknown key \"nodes\""));
    }

    #[test]
    fn placement_is_spread_by_free_capacity_and_skips_full_nodes() {
        let mut counts = BTreeMap::<&str, u32>::new();
        for i in 0..3000 {
            let tenant = format!("t{i}");
            let node = placement(&tenant, [("a", 100), ("b", 100), ("c", 200), ("full", 0)].into_iter()).unwrap();
            *counts.entry(node).or_default() += 1;
        }
        assert_eq!(counts.get("full"), None);
        // c has twice the room of a and b: about half the tenants.
        let c = counts["c"];
        assert!((1300..1700).contains(&c), "{counts:?}");
        assert!(counts["a"] > 600 && counts["b"] > 600, "{counts:?}");
        // The same answer on every node, and no node when none has room.
        assert_eq!(placement("x", [("a", 1), ("b", 1)].into_iter()), placement("x", [("b", 1), ("a", 1)].into_iter()));
        assert_eq!(placement("x", [("a", 0)].into_iter()), None);
    }
}
