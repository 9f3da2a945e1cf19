//! The `mqvisor serve` configuration file: the shared listen address, the
//! state directory, defaults for every tenant, and one table per tenant.
//!
//! Owns reading and checking it before anything starts: every tenant's
//! broker settings are resolved (files read, limits validated, the memory
//! they need checked) here, so a bad tenant is found at start, naming
//! itself, never by a crash loop later. Only the daemon's own settings are
//! errors; a tenant whose settings fail is a [`FailedTenant`], and the
//! others are served. Never starts anything.
//!
//! ```toml
//! listen = "127.0.0.1:1883"
//! state_dir = "/var/lib/mqvisor"
//!
//! [defaults]
//! memory = 64
//! max_connections = 1000
//!
//! [tenants.acme]
//! password_file = "acme.passwd"
//! idle_stop_after = 600         # stop its VM after 10 idle minutes
//! persistence = "sync"          # or "batch", or "off" (state in RAM only)
//! standby = "preferred"         # in a fleet: or "required" (see the README)
//! cpus = 0.5                    # limits of its VMM process (cgroups)
//! memory_limit = 128            # MiB, guest RAM included
//! pids_limit = 16
//!
//! [tenants.globex]
//! listen = "127.0.0.1:1884"   # also reachable without a prefix here
//! ```
//!
//! MQTT over TLS and WebSockets on shared ports, a tenant picked by the
//! host name the client asked for (TLS SNI, or the `Host` header on
//! `listen_ws`): `NAME.<tls_domain>` is tenant NAME, and so are its own
//! `tls_names`. The certificate and key are read by the tenant's process,
//! which completes the handshake: never by the daemon, which checks here
//! only that the files are there.
//!
//! ```toml
//! listen_tls = "0.0.0.0:8883"
//! listen_wss = "0.0.0.0:443"
//! tls_domain = "mq.example.com"
//!
//! [defaults]
//! tls_cert = "wildcard.pem"     # *.mq.example.com
//! tls_key = "wildcard.key"
//!
//! [tenants.acme]
//! tls_names = ["mqtt.acme.com"] # its own domain, with its own certificate
//! tls_cert = "acme.pem"
//! tls_key = "acme.key"
//! tls_client_ca = "acme-ca.pem" # mutual TLS for this tenant's clients
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use mqvisor::cgroup::Limits;
use mqvisor::state::Persistence;
use mqvisor::vm::Service;

use crate::quotas::QuotaFlags;
use crate::settings::{BrokerFlags, OwnCert, TenantRun};

/// Largest configuration file accepted.
const MAX_FILE: u64 = 1 << 20;
/// Guest RAM of a tenant unless the file says otherwise, MiB.
const DEFAULT_MEMORY_MIB: u32 = 64;

/// The daemon's configuration, checked.
#[derive(Debug)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    /// Shared ports for MQTT over TLS, over WebSockets, and over both.
    pub listen_tls: Option<SocketAddr>,
    pub listen_ws: Option<SocketAddr>,
    pub listen_wss: Option<SocketAddr>,
    /// `NAME.<tls_domain>` reaches tenant NAME on those ports (lower case).
    pub tls_domain: Option<String>,
    pub state_dir: PathBuf,
    /// The control API's unix socket (default `STATE_DIR/control.sock`).
    pub control_socket: PathBuf,
    /// Where `/metrics` is served, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    pub tenants: BTreeMap<String, TenantConfig>,
    /// Tenants of the file whose settings cannot be used.
    pub failed: BTreeMap<String, FailedTenant>,
    /// What tenants added while serving start from.
    pub defaults: TenantTable,
    /// One node of a fleet on etcd (`[cluster]`), if it is one.
    pub cluster: Option<super::cluster::ClusterConfig>,
}

/// A tenant whose settings could not be used at start: listed, refused to
/// its clients and removable, but not served until they can be (`mqvisor
/// tenant restart NAME` tries them again).
#[derive(Debug, Clone)]
pub struct FailedTenant {
    /// Why, naming the file or setting at fault.
    pub reason: String,
    /// What trying again starts from.
    pub again: Again,
}

/// What a failed tenant's next try starts from.
#[derive(Debug, Clone)]
pub enum Again {
    /// Its table, read again (a missing file may be back): paths relative
    /// to the folder given.
    Read(toml::Table, PathBuf),
    /// Its settings, good, which could not be put in place (its control
    /// group, its port).
    Start(Box<TenantConfig>),
    /// Nothing: its table itself is unusable.
    Never,
}

impl FailedTenant {
    /// Its settings over `defaults`, if they can be used now.
    pub fn config(&self, defaults: &TenantTable) -> Result<TenantConfig, String> {
        match &self.again {
            Again::Read(table, base) => defaults.tenant(table.clone(), base),
            Again::Start(config) => Ok((**config).clone()),
            Again::Never => Err(format!("{} (correct it and restart the daemon, or remove the tenant)", self.reason)),
        }
    }
}

/// The keys of a `[defaults]` or a `[tenants.NAME]` table, each given or
/// not: a tenant's own table over `[defaults]` is its [`TenantConfig`].
#[derive(Debug, Clone, Default)]
pub struct TenantTable {
    memory: Option<u32>,
    listen: Option<SocketAddr>,
    idle_stop_after: Option<std::time::Duration>,
    user: Option<String>,
    persistence: Option<Persistence>,
    /// `standby`: whether its state is mirrored in a fleet, and whether
    /// writes wait for the mirror.
    standby: Option<Standby>,
    limits: Limits,
    tls: TlsTable,
    quotas: QuotaFlags,
    broker: BrokerFlags,
}

/// The TLS keys of a tenant's table (paths absolute).
#[derive(Debug, Clone, Default)]
struct TlsTable {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    identity_as_user: Option<bool>,
    names: Option<Vec<String>>,
}

impl TlsTable {
    fn parse(table: &mut toml::Table, base: &Path, context: &str) -> Result<TlsTable, String> {
        let path = |table: &mut toml::Table, key| {
            take(table, key, context, "a path", |v| v.as_str().map(|p| absolute(base, PathBuf::from(p))))
        };
        Ok(TlsTable {
            cert: path(table, "tls_cert")?,
            key: path(table, "tls_key")?,
            client_ca: path(table, "tls_client_ca")?,
            identity_as_user: take(table, "tls_identity_as_user", context, "true or false", toml::Value::as_bool)?,
            names: take(table, "tls_names", context, "a list of host names like [\"mqtt.acme.com\"]", |v| {
                v.as_array()?
                    .iter()
                    .map(|n| n.as_str().map(|n| n.trim_end_matches('.').to_ascii_lowercase()))
                    .collect::<Option<Vec<String>>>()
            })?,
        })
    }

    /// These keys over `under`, checked: files present (their contents
    /// are the tenant process's to read), settings that go together given
    /// together.
    fn over(&self, under: &TlsTable) -> Result<TlsTable, String> {
        let merged = TlsTable {
            cert: self.cert.clone().or_else(|| under.cert.clone()),
            key: self.key.clone().or_else(|| under.key.clone()),
            client_ca: self.client_ca.clone().or_else(|| under.client_ca.clone()),
            identity_as_user: self.identity_as_user.or(under.identity_as_user),
            names: self.names.clone().or_else(|| under.names.clone()),
        };
        if self.cert.is_some() != self.key.is_some() || merged.cert.is_some() != merged.key.is_some() {
            return Err("tls_cert and tls_key go together: give both".into());
        }
        if merged.cert.is_none() && (merged.client_ca.is_some() || merged.names.is_some()) {
            return Err("tls_client_ca and tls_names need tls_cert and tls_key".into());
        }
        if merged.identity_as_user == Some(true) && merged.client_ca.is_none() {
            return Err("tls_identity_as_user needs tls_client_ca".into());
        }
        for name in merged.names.iter().flatten() {
            if !super::directory::valid_host_name(name) {
                return Err(format!(
                    "tls_names: {name:?} is not a host name (lower-case labels of letters, digits and '-'; \
                     a wildcard belongs in the certificate, not here)"
                ));
            }
        }
        for (key, file) in [("tls_cert", &merged.cert), ("tls_key", &merged.key), ("tls_client_ca", &merged.client_ca)]
        {
            if let Some(file) = file {
                match std::fs::metadata(file) {
                    Ok(meta) if meta.is_file() => {}
                    Ok(_) => return Err(format!("{key} {}: not a regular file", file.display())),
                    Err(e) => return Err(format!("{key} {}: {e}", file.display())),
                }
            }
        }
        Ok(merged)
    }
}

/// `p` relative to `base`, made absolute: the tenant's process reads it
/// from its own settings file.
fn absolute(base: &Path, p: PathBuf) -> PathBuf {
    std::path::absolute(base.join(&p)).unwrap_or(p)
}

/// The keys of a tenant table that are neither the broker's nor quotas.
const TENANT_KEYS: &[&str] = &[
    "memory",
    "listen",
    "idle_stop_after",
    "user",
    "persistence",
    "standby",
    "cpus",
    "memory_limit",
    "pids_limit",
    "tls_cert",
    "tls_key",
    "tls_client_ca",
    "tls_identity_as_user",
    "tls_names",
];

impl TenantTable {
    /// The keys of `table` (paths relative to `base`); errors begin with
    /// `context`.
    fn parse(table: toml::Table, base: &Path, context: &str) -> Result<TenantTable, String> {
        let mut table = table;
        let positive = |v: &toml::Value| v.as_integer().filter(|&n| n > 0);
        let memory = take(&mut table, "memory", context, "a positive number of MiB", |v| {
            positive(v).and_then(|n| u32::try_from(n).ok())
        })?;
        let listen = take(&mut table, "listen", context, "an address like \"127.0.0.1:1884\"", |v| {
            v.as_str().and_then(|s| s.parse().ok())
        })?;
        let idle_stop_after = take(&mut table, "idle_stop_after", context, "a positive number of seconds", |v| {
            positive(v).and_then(|n| u64::try_from(n).ok()).map(std::time::Duration::from_secs)
        })?;
        let user = take(&mut table, "user", context, "a user name", |v| v.as_str().map(str::to_string))?;
        let persistence = take(&mut table, "persistence", context, "\"sync\", \"batch\" or \"off\"", |v| {
            v.as_str().and_then(Persistence::from_name)
        })?;
        let standby =
            take(&mut table, "standby", context, "\"required\", \"preferred\" or \"off\"", |v| match v.as_str() {
                Some("required") => Some(Standby::Required),
                Some("preferred") => Some(Standby::Preferred),
                Some("off") => Some(Standby::Off),
                _ => None,
            })?;
        let limits = Limits {
            cpus: take(&mut table, "cpus", context, "a number of CPUs like 0.5", |v| {
                v.as_float().or_else(|| v.as_integer().map(|n| n as f64))
            })?,
            memory_mib: take(&mut table, "memory_limit", context, "a positive number of MiB", |v| {
                positive(v).and_then(|n| u64::try_from(n).ok())
            })?,
            pids: take(&mut table, "pids_limit", context, "a positive number of tasks", |v| {
                positive(v).and_then(|n| u32::try_from(n).ok())
            })?,
        };
        limits.validate().map_err(|e| format!("{context}: {e}"))?;
        let tls = TlsTable::parse(&mut table, base, context)?;
        let quotas = QuotaFlags::take_from(&mut table, context)?;
        if let Some(name) = &user {
            mqvisor::privileges::RunAs::lookup(name).map_err(|e| format!("{context}: {e}"))?;
        }
        let mut broker: BrokerFlags = table.try_into().map_err(|e: toml::de::Error| {
            // The broker's keys are what serde lists; the tenant's own were
            // taken out above, so a misspelt one of those is named here.
            let message = e.message();
            if message.contains("unknown field") {
                let own: Vec<&str> = TENANT_KEYS.iter().chain(crate::quotas::CONFIG_KEYS).copied().collect();
                format!("{context}: {message}, or one of the tenant's own: {}", own.join(", "))
            } else {
                format!("{context}: {message}")
            }
        })?;
        broker.password_file = broker.password_file.map(|p| absolute(base, p));
        broker.acl_file = broker.acl_file.map(|p| absolute(base, p));
        Ok(TenantTable { memory, listen, idle_stop_after, user, persistence, standby, limits, tls, quotas, broker })
    }

    /// Whether a tenant of `table` (its own TOML table) over these
    /// defaults has its state mirrored in a fleet (`standby` not "off").
    pub fn mirrored(&self, table: &toml::Table) -> bool {
        match table.get("standby").and_then(toml::Value::as_str) {
            Some(own) => own != "off",
            None => self.standby != Some(Standby::Off),
        }
    }

    /// A tenant from its TOML `table` (paths relative to `base`), over
    /// these defaults, checked.
    pub fn tenant(&self, table: toml::Table, base: &Path) -> Result<TenantConfig, String> {
        let own = TenantTable::parse(table, base, "settings")?;
        let broker = own.broker.over(&self.broker).map_err(|e| e.to_string())?;
        let tls = own.tls.over(&self.tls)?;
        if own.listen.is_some() && tls.client_ca.is_some() {
            return Err("listen: a tenant with tls_client_ca takes clients over TLS only, with a client \
                        certificate; a plain port of its own would let any client in"
                .into());
        }
        // Its own certificate serves its own names; the provider's (of
        // [defaults]) still serves NAME.<tls_domain>.
        let (cert, key, tls_own) = match (&own.tls.cert, &own.tls.key, &self.tls.cert, &self.tls.key, &tls.names) {
            (Some(cert), Some(key), Some(shared_cert), Some(shared_key), Some(names)) if cert != shared_cert => {
                let own = OwnCert { names: names.clone(), cert: cert.clone(), key: key.clone() };
                (Some(shared_cert.clone()), Some(shared_key.clone()), Some(own))
            }
            _ => (tls.cert, tls.key, None),
        };
        // Checked now: a bad tenant fails where it is declared, naming itself.
        let settings = broker.resolve().map_err(|e| e.to_string())?;
        let memory = own.memory.or(self.memory).unwrap_or(DEFAULT_MEMORY_MIB);
        let standby = own.standby.or(self.standby).unwrap_or_default();
        if standby == Standby::Required && own.persistence.or(self.persistence) == Some(Persistence::Off) {
            return Err(
                "standby = \"required\" needs persistence \"sync\" or \"batch\": with \"off\" there is no state \
                        to mirror"
                    .to_string(),
            );
        }
        // What its `mqvisor run` checks at start: settings that can never
        // boot are refused here, not found out by a crash loop.
        let service = Service::Mqtt {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            max_connections: settings.config.max_connections,
            max_packet_size: settings.config.max_packet_size,
        };
        mqvisor::vm::plan(mqvisor::DEFAULT_IMAGE, memory, &settings.config_blob(), "", service)
            .map_err(|e| e.to_string())?;
        let limits = Limits {
            cpus: own.limits.cpus.or(self.limits.cpus),
            memory_mib: own.limits.memory_mib.or(self.limits.memory_mib),
            pids: own.limits.pids.or(self.limits.pids),
        };
        Ok(TenantConfig {
            listen: own.listen,
            tls_names: tls.names.unwrap_or_default(),
            idle_stop_after: own.idle_stop_after.or(self.idle_stop_after),
            limits,
            mirrored: standby != Standby::Off,
            run: TenantRun {
                memory,
                user: own.user.or_else(|| self.user.clone()),
                persistence: own.persistence.or(self.persistence).unwrap_or_default(),
                state: None,
                cgroup: Vec::new(),
                tls_identity_as_user: tls.identity_as_user.unwrap_or(false),
                tls_cert: cert,
                tls_key: key,
                tls_own,
                tls_client_ca: tls.client_ca,
                quotas: own.quotas.over(&self.quotas).resolve(toml::Table::new())?,
                broker,
                standby: None,
                standby_required: standby == Standby::Required,
            },
        })
    }

    /// A tenant added while serving, from the TOML `table` of a request,
    /// as [`TenantTable::tenant`]; its paths must be absolute, since nothing
    /// says which folder a relative one is relative to (`mqvisor tenant add
    /// --settings FILE` makes them so, relative to FILE).
    pub fn added(&self, table: toml::Table, base: &Path) -> Result<TenantConfig, String> {
        for key in PATH_KEYS {
            if let Some(path) = table.get(key).and_then(toml::Value::as_str)
                && Path::new(path).is_relative()
            {
                return Err(format!(
                    "{key} {path:?} must be an absolute path (`mqvisor tenant add --settings FILE` reads it \
                     relative to FILE's folder)"
                ));
            }
        }
        self.tenant(table, base)
    }
}

/// The keys of a tenant's table that name files.
const PATH_KEYS: [&str; 5] = ["password_file", "acl_file", "tls_cert", "tls_key", "tls_client_ca"];

/// The tenant settings file `path` (a `[tenants.NAME]` table) as a request
/// body: its file paths made absolute, relative to its folder.
pub fn settings_file_body(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut table: toml::Table = toml::from_str(&text).map_err(|e| format!("{}: {}", path.display(), e.message()))?;
    let base = path.parent().unwrap_or(Path::new(""));
    for key in PATH_KEYS {
        if let Some(toml::Value::String(file)) = table.get_mut(key) {
            let absolute = std::path::absolute(base.join(&*file)).map_err(|e| format!("{}: {e}", path.display()))?;
            *file = absolute.to_str().ok_or_else(|| format!("{}: {key} is not UTF-8", path.display()))?.to_string();
        }
    }
    toml::to_string(&table).map_err(|e| format!("{}: {e}", path.display()))
}

/// One tenant, with the defaults applied: what the daemon does with it,
/// and what its process runs with.
#[derive(Debug, Clone)]
pub struct TenantConfig {
    /// A port of its own, where clients need no `TENANT:` prefix.
    pub listen: Option<SocketAddr>,
    /// Host names of its own (SNI, `Host`) on the shared TLS and
    /// WebSocket ports, lower case.
    pub tls_names: Vec<String>,
    /// Stop the VM after this long without clients (its state is kept
    /// unless persistence is off).
    pub idle_stop_after: Option<std::time::Duration>,
    /// Its VMM process's CPU, memory and task limits (a cgroup each).
    pub limits: Limits,
    /// In a fleet, its state is mirrored to a standby (`standby` is not
    /// `"off"`).
    pub mirrored: bool,
    /// Its process's settings: guest memory, user, persistence (`sync` by
    /// default, its state file in `state_dir`) and broker settings, paths
    /// absolute, checked.
    pub run: TenantRun,
}

/// A tenant's `standby` key: in a fleet, whether its state is mirrored
/// to another node, and whether its writes wait for that node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Standby {
    /// Mirrored; without a standby, writes fail (durable publishes are
    /// refused).
    Required,
    /// Mirrored when a standby is reachable; otherwise not.
    #[default]
    Preferred,
    /// Never mirrored.
    Off,
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ServeConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is {size} bytes; at most {MAX_FILE} are accepted")]
    TooLarge { path: PathBuf, size: u64 },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("tenant name {0:?}: use 1 to 64 of a-z, 0-9, '-' and '_'")]
    TenantName(String),
}

/// A tenant's name is part of user names, paths and metric labels.
pub fn valid_tenant_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// Removes `key` from `table` and parses it; an unparsable value is an
/// error saying what `key` must be.
fn take<T>(
    table: &mut toml::Table,
    key: &str,
    context: &str,
    must_be: &str,
    parse: impl FnOnce(&toml::Value) -> Option<T>,
) -> Result<Option<T>, String> {
    table.remove(key).map(|v| parse(&v).ok_or_else(|| format!("{context}: {key} must be {must_be}"))).transpose()
}

impl ServeConfig {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<ServeConfig, ServeConfigError> {
        let read_error = |source| ServeConfigError::Read { path: path.to_path_buf(), source };
        let size = std::fs::metadata(path).map_err(read_error)?.len();
        if size > MAX_FILE {
            return Err(ServeConfigError::TooLarge { path: path.to_path_buf(), size });
        }
        let text = std::fs::read_to_string(path).map_err(read_error)?;
        let syntax = |message: String| ServeConfigError::Syntax { path: path.to_path_buf(), message };
        let mut root: toml::Table = toml::from_str(&text).map_err(|e| syntax(e.message().to_string()))?;
        let base = path.parent().unwrap_or(Path::new("")).to_path_buf();
        let listen = match root.remove("listen") {
            None => SocketAddr::from(([127, 0, 0, 1], 1883)),
            Some(v) => {
                v.as_str().and_then(|s| s.parse().ok()).ok_or_else(|| syntax("listen must be an address".into()))?
            }
        };
        let address = |root: &mut toml::Table, key: &str| match root.remove(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .and_then(|s| s.parse().ok())
                .map(Some)
                .ok_or_else(|| syntax(format!("{key} must be an address like \"0.0.0.0:8883\""))),
        };
        let listen_tls = address(&mut root, "listen_tls")?;
        let listen_ws = address(&mut root, "listen_ws")?;
        let listen_wss = address(&mut root, "listen_wss")?;
        let tls_domain = match root.remove("tls_domain") {
            None => None,
            Some(v) => {
                let domain = v.as_str().map(|d| d.trim_end_matches('.').to_ascii_lowercase());
                Some(domain.filter(|d| super::directory::valid_host_name(d)).ok_or_else(|| {
                    syntax(
                        "tls_domain must be a host name like \"mq.example.com\" (tenant NAME is NAME.mq.example.com)"
                            .into(),
                    )
                })?)
            }
        };
        let state_dir = match root.remove("state_dir") {
            None => return Err(syntax("state_dir is required (where tenants' files are kept)".into())),
            Some(v) => base.join(v.as_str().ok_or_else(|| syntax("state_dir must be a path".into()))?),
        };
        let control_socket = match root.remove("control_socket") {
            None => state_dir.join("control.sock"),
            Some(v) => base.join(v.as_str().ok_or_else(|| syntax("control_socket must be a path".into()))?),
        };
        let metrics_listen = match root.remove("metrics_listen") {
            None => None,
            Some(v) => Some(
                v.as_str()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| syntax("metrics_listen must be an address".into()))?,
            ),
        };
        let defaults = match root.remove("defaults") {
            None => TenantTable::default(),
            Some(toml::Value::Table(t)) => TenantTable::parse(t, &base, "[defaults]").map_err(syntax)?,
            Some(_) => return Err(syntax("[defaults] must be a table".into())),
        };
        if defaults.listen.is_some() {
            return Err(syntax("[defaults] cannot set listen: each tenant's own port must differ".into()));
        }
        let tables = match root.remove("tenants") {
            None => toml::Table::new(),
            Some(toml::Value::Table(t)) => t,
            Some(_) => return Err(syntax("tenants must be tables, [tenants.NAME]".into())),
        };
        let cluster = match root.remove("cluster") {
            None => None,
            Some(toml::Value::Table(t)) => Some(super::cluster::ClusterConfig::parse(t, listen).map_err(syntax)?),
            Some(_) => return Err(syntax("[cluster] must be a table".into())),
        };
        if cluster.is_some() && !tables.is_empty() {
            return Err(syntax(
                "with [cluster], tenants are kept in etcd (mqvisor tenant add on any node), not in [tenants.NAME]"
                    .into(),
            ));
        }
        if let Some(key) = root.keys().next() {
            return Err(syntax(format!(
                "unknown key {key:?} (expected listen, listen_tls, listen_ws, listen_wss, tls_domain, state_dir, \
                 control_socket, metrics_listen, defaults, tenants, cluster)"
            )));
        }
        let mut tenants = BTreeMap::new();
        let mut failed = BTreeMap::new();
        for (name, value) in tables {
            if !valid_tenant_name(&name) {
                return Err(ServeConfigError::TenantName(name));
            }
            let toml::Value::Table(table) = value else {
                let reason = format!("[tenants.{name}] must be a table");
                failed.insert(name, FailedTenant { reason, again: Again::Never });
                continue;
            };
            match defaults.tenant(table.clone(), &base) {
                Ok(tenant) => {
                    tenants.insert(name, tenant);
                }
                Err(reason) => {
                    failed.insert(name, FailedTenant { reason, again: Again::Read(table, base.clone()) });
                }
            }
        }
        Ok(ServeConfig {
            listen,
            listen_tls,
            listen_ws,
            listen_wss,
            tls_domain,
            state_dir,
            control_socket,
            metrics_listen,
            tenants,
            failed,
            defaults,
            cluster,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<ServeConfig, ServeConfigError> {
        // A folder per call: tests run at once, and two texts may be as long.
        static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("mqvisor-serve-config-{}-{call}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("acme.passwd"), "").unwrap();
        let path = dir.join("serve.toml");
        std::fs::write(&path, text).unwrap();
        ServeConfig::load(&path)
    }

    #[test]
    fn defaults_apply_to_every_tenant_and_tenants_override_them() {
        let c = load(
            "state_dir = \"state\"\n[defaults]\nmemory = 96\nmax_connections = 50\n\
             cpus = 1\nmemory_limit = 128\npids_limit = 16\n\
             [tenants.acme]\npassword_file = \"acme.passwd\"\nmax_connections = 7\ncpus = 0.5\n\
             [tenants.globex]\nlisten = \"127.0.0.1:1884\"\n",
        )
        .unwrap();
        assert_eq!(c.listen, SocketAddr::from(([127, 0, 0, 1], 1883)));
        let acme = &c.tenants["acme"];
        assert_eq!((acme.run.memory, acme.run.broker.max_connections), (96, Some(7)));
        assert!(acme.run.broker.password_file.as_ref().unwrap().is_absolute());
        assert_eq!(acme.run.persistence, Persistence::Sync);
        assert_eq!(acme.limits, Limits { cpus: Some(0.5), memory_mib: Some(128), pids: Some(16) });
        let globex = &c.tenants["globex"];
        assert_eq!(globex.run.broker.max_connections, Some(50));
        assert_eq!(globex.listen, Some(SocketAddr::from(([127, 0, 0, 1], 1884))));
        assert_eq!(globex.limits, Limits { cpus: Some(1.0), memory_mib: Some(128), pids: Some(16) });
    }

    #[test]
    fn quotas_come_from_defaults_and_tenants_and_reach_the_tenant_process() {
        let c = load(
            "state_dir = \"state\"\n[defaults]\nmax_publish_rate = 2000\nmax_connection_rate = 50\n\
             [tenants.acme]\nmax_publish_rate = 100\nmax_client_publish_rate = 10\n\
             [tenants.globex]\nmax_egress_bytes_rate = 0\n[tenants.bad]\nmax_publish_rate = -1\n",
        )
        .unwrap();
        let acme = c.tenants["acme"].run.quotas;
        assert_eq!((acme.max_publish_rate, acme.max_client_publish_rate, acme.max_connection_rate), (100, 10, 50));
        let globex = c.tenants["globex"].run.quotas;
        assert_eq!((globex.max_publish_rate, globex.max_egress_bytes_rate), (2000, 0));
        assert!(c.failed["bad"].reason.contains("max_publish_rate"), "{}", c.failed["bad"].reason);
        // Not the broker's: its settings never see them.
        assert_eq!(c.tenants["acme"].run.broker.max_connections, None);
    }

    #[test]
    fn mistakes_are_named() {
        let err = |text: &str| load(text).unwrap_err().to_string();
        assert!(err("listen = \"x\"\nstate_dir = \"s\"").contains("listen must be an address"));
        assert!(err("[tenants.a]").contains("state_dir is required"));
        assert!(err("state_dir = \"s\"\n[tenants.Bad]").contains("tenant name \"Bad\""));
        assert!(
            err("state_dir = \"s\"\n[defaults]\nlisten = \"127.0.0.1:1\"").contains("[defaults] cannot set listen")
        );
        assert!(err("state_dir = \"s\"\nlisen = 1").contains("unknown key \"lisen\""));
        assert!(err("state_dir = \"s\"\n[defaults]\npids_limit = 2").contains("[defaults]: the task limit"));
    }

    #[test]
    fn a_tenant_whose_settings_fail_is_failed_and_the_others_kept() {
        let failed = |tenant: &str| {
            let config = load(&format!("state_dir = \"s\"\n[tenants.ok]\n[tenants.a]\n{tenant}")).unwrap();
            assert!(config.tenants.contains_key("ok") && !config.tenants.contains_key("a"), "{tenant}");
            config.failed["a"].reason.clone()
        };
        assert!(failed("max_conections = 5").contains("max_conections"));
        assert!(failed("memory = 0").contains("memory must be"));
        assert!(failed("idle_stop_after = -1").contains("idle_stop_after must be"));
        assert!(failed("persistence = \"always\"").contains("persistence must be \"sync\", \"batch\" or \"off\""));
        assert!(failed("standby = \"always\"").contains("standby must be \"required\", \"preferred\" or \"off\""));
        assert!(failed("standby = \"required\"\npersistence = \"off\"").contains("no state to mirror"));
        assert!(failed("password_file = \"missing\"").contains("missing"));
        assert!(failed("cpus = 0").contains("cpus must be between"));
        assert!(failed("cpus = \"half\"").contains("cpus must be a number"));
        assert!(failed("memory_limit = 8").contains("at least 16 MiB"));
        // Settings no VM can boot with, as `mqvisor run` finds at start.
        assert!(failed("memory = 1").contains("--memory 1 MiB is too small"));
        assert!(failed("memory = 8").contains("--max-packet-size 1048576 does not fit in --memory 8 MiB"));
        assert!(failed("memory = 16\nmax_connections = 100000").contains("--max-connections 100000 does not fit"));
        let config = load("state_dir = \"s\"\n[tenants]\na = 5\n").unwrap();
        assert!(config.failed["a"].reason.contains("must be a table"));
    }

    #[test]
    fn tls_settings_go_together_and_name_real_files() {
        let c = load(
            "state_dir = \"s\"\nlisten_tls = \"127.0.0.1:0\"\ntls_domain = \"MQ.Example.com.\"\n\
             [defaults]\ntls_cert = \"acme.passwd\"\ntls_key = \"acme.passwd\"\n\
             [tenants.acme]\ntls_names = [\"MQTT.acme.com\"]\ntls_client_ca = \"acme.passwd\"\n\
             tls_identity_as_user = true\n[tenants.globex]\n",
        )
        .unwrap();
        assert_eq!(c.tls_domain.as_deref(), Some("mq.example.com"));
        let acme = &c.tenants["acme"];
        assert_eq!(acme.tls_names, ["mqtt.acme.com"]);
        assert!(acme.run.tls_cert.as_ref().unwrap().is_absolute() && acme.run.tls_identity_as_user);
        assert!(c.tenants["globex"].run.tls_key.is_some(), "the defaults' certificate");
        let failed = |tenant: &str| {
            let config = load(&format!("state_dir = \"s\"\n[tenants.a]\n{tenant}")).unwrap();
            config.failed["a"].reason.clone()
        };
        assert!(failed("tls_cert = \"acme.passwd\"").contains("tls_cert and tls_key go together"));
        assert!(failed("tls_names = [\"a.com\"]").contains("need tls_cert and tls_key"));
        let pair = "tls_cert = \"acme.passwd\"\ntls_key = \"acme.passwd\"\n";
        assert!(failed(&format!("{pair}tls_identity_as_user = true")).contains("needs tls_client_ca"));
        assert!(failed(&format!("{pair}tls_names = [\"*.acme.com\"]")).contains("is not a host name"));
        let own_port = format!("{pair}tls_client_ca = \"acme.passwd\"\nlisten = \"127.0.0.1:1\"");
        assert!(failed(&own_port).contains("takes clients over TLS only"));
        assert!(failed(&format!("{pair}tls_names = \"a.com\"")).contains("tls_names must be a list"));
        assert!(failed("tls_cert = \"missing.pem\"\ntls_key = \"acme.passwd\"").contains("missing.pem"));
        let err = |text: &str| load(text).unwrap_err().to_string();
        assert!(err("state_dir = \"s\"\nlisten_tls = \"x\"").contains("listen_tls must be an address"));
        assert!(err("state_dir = \"s\"\ntls_domain = \"*.x\"").contains("tls_domain must be a host name"));
    }

    #[test]
    fn added_tenants_name_their_files_absolute() {
        let config = load("state_dir = \"s\"\n").unwrap();
        let table = |text: &str| toml::from_str::<toml::Table>(text).unwrap();
        let err = config.defaults.added(table("acl_file = \"acl\""), Path::new("/")).unwrap_err();
        assert!(err.contains("acl_file \"acl\" must be an absolute path"), "{err}");
        let dir = std::env::temp_dir().join(format!("mqvisor-serve-added-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("conf")).unwrap();
        std::fs::write(dir.join("conf/acl"), "topic read x\n").unwrap();
        std::fs::write(dir.join("conf/t.toml"), "acl_file = \"acl\"\nmax_connections = 5\n").unwrap();
        let body = settings_file_body(&dir.join("conf/t.toml")).unwrap();
        let tenant = config.defaults.added(table(&body), Path::new("/")).unwrap();
        assert_eq!(tenant.run.broker.acl_file, Some(dir.join("conf/acl")));
        assert_eq!(tenant.run.broker.max_connections, Some(5));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
