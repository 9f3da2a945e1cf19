//! Broker settings for `mqvisor run` and `mqvisor broker`: command-line
//! flags over an optional TOML file (`--config`) over defaults.
//!
//! Owns reading and checking everything an operator configures about the
//! broker (limits, password file, ACL file) before anything starts, with
//! errors that name the file and line. Flags and file keys are one struct
//! ([`BrokerFlags`]), so a setting is declared once and mapped to the core's
//! `Config` once. Must never hand on a setting it has not checked
//! (`Config::validate`). Also owns [`TenantRun`], the one file a `serve`
//! tenant's `mqvisor run` process is given.

use std::path::{Path, PathBuf};

use mqvisor::net::quota::Quotas;
use mqvisor::state::Persistence;
use mqvisor_boot_abi::config_blob;
use mqvisor_broker::auth::{Acl, FileError, PasswordFile};
use mqvisor_broker::broker::{Config, ConfigError};
use mqvisor_broker::topic::TopicLimits;
use serde::{Deserialize, Serialize};

/// Largest password, ACL or config file accepted.
const MAX_FILE: u64 = 512 * 1024;

/// Broker settings, as flags of `mqvisor run` and `mqvisor broker` and as keys
/// of the `--config` file (same names, `_` for `-`). A flag overrides the
/// same key in the file.
#[derive(clap::Args, Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerFlags {
    /// TOML file with any of the settings below (flags override it), e.g.
    /// `max_connections = 500` or `password_file = "passwords"` (paths relative to the file)
    #[arg(long, value_name = "PATH")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Most concurrent MQTT connections [default: 10000]
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// Largest MQTT packet accepted, in bytes, 16..=268435460 [default: 1048576]
    #[arg(long, value_name = "BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_packet_size: Option<u32>,
    /// Messages queued per offline or slow session before new ones are dropped [default: 1000]
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_queued_messages: Option<usize>,
    /// Bytes (topics and payloads) queued per offline or slow session before
    /// new messages are dropped; a message alone in its queue is kept whatever
    /// its size; 0: no byte bound, as in Mosquitto [default: 16777216]
    #[arg(long, value_name = "BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_queued_bytes: Option<usize>,
    /// Unacknowledged QoS 1/2 messages in flight per session, at least 1 [default: 20]
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_inflight: Option<u16>,
    /// Incoming QoS 2 messages a client may leave unreleased (no PUBREL yet),
    /// at least 1; the MQTT 5 Receive Maximum. Past it a v5 client is
    /// disconnected with 0x93 and a 3.x client's connection is closed (3.x
    /// cannot be told the limit), counted in $SYS/broker/messages/refused
    /// [default: 100]
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receive_maximum: Option<u16>,
    /// Sessions kept at most, connected or offline; past it clients without a
    /// session are refused [default: 100000]
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_sessions: Option<usize>,
    /// Retained messages kept at most; past it new ones are refused [default: 100000]
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_retained_messages: Option<usize>,
    /// Bytes (topics and payloads) of all retained messages together, at most;
    /// a VM also keeps them within half its memory for messages [default: 67108864]
    #[arg(long, value_name = "BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_retained_bytes: Option<usize>,
    /// Subscriptions one client may hold [default: 1000]
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_subscriptions_per_client: Option<usize>,
    /// Longest topic name or filter, in bytes [default: 65535]
    #[arg(long, value_name = "BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_topic_length: Option<usize>,
    /// Most levels in a topic name or filter [default: 128]
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_topic_levels: Option<usize>,
    /// Longest keep-alive a client may ask for, seconds (Mosquitto's
    /// max_keepalive): an MQTT 5 client asking for more, or for none, is told
    /// to use this; an MQTT 3.x client asking for more is refused [default: no cap]
    #[arg(long, value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_keep_alive: Option<u16>,
    /// Milliseconds a new connection may take to send CONNECT before it is closed [default: 10000]
    #[arg(long, value_name = "MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_timeout_ms: Option<u64>,
    /// Users and salted password hashes, as written by `mosquitto_passwd`
    #[arg(long, value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Per-user publish/subscribe rules (Mosquitto ACL file format)
    #[arg(long, value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acl_file: Option<PathBuf>,
    /// Let clients without a user name connect [default: true without a
    /// password file, false with one]
    #[arg(long, value_name = "BOOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_anonymous: Option<bool>,
}

/// Why the settings cannot be used; each names the file or setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{what} {}: {source}", path.display())]
    Read { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{what} {} is {size} bytes; at most {MAX_FILE} are accepted", path.display())]
    TooLarge { what: &'static str, path: PathBuf, size: u64 },
    #[error("config file {}: {source}", path.display())]
    ConfigFile { path: PathBuf, source: toml::de::Error },
    #[error("password file {}: {source}", path.display())]
    PasswordFile { path: PathBuf, source: FileError },
    #[error("ACL file {}: {source}", path.display())]
    AclFile { path: PathBuf, source: FileError },
    /// A setting TOML cannot carry (a path that is not UTF-8).
    #[error("settings: {0}")]
    Merge(toml::ser::Error),
    /// Merged settings that do not read back (a bug, reported rather than hidden).
    #[error("settings: {0}")]
    Merged(toml::de::Error),
    #[error("{0}")]
    Invalid(ConfigError),
    #[error("tenant settings {}: {source}", path.display())]
    TenantFile { path: PathBuf, source: toml::de::Error },
}

/// What a `serve` tenant's VM process runs with, as one file: the daemon
/// writes it (`STATE_DIR/tenants/NAME.toml`) and starts the process as
/// `mqvisor run --tenant-settings FILE`; only the handoff socket, a
/// descriptor, is a flag of its own. Each key is the `mqvisor run` flag of
/// the same name.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TenantRun {
    /// Guest RAM, MiB.
    pub memory: u32,
    /// The user the process becomes (the daemon runs as root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    pub persistence: Persistence,
    /// Its state file, unless persistence is off (set by the tenant, which
    /// owns the file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<PathBuf>,
    /// The control group directories the process joins, made by the
    /// daemon with the tenant's limits (set by the tenant, which owns them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cgroup: Vec<PathBuf>,
    /// Broker settings, paths absolute, checked.
    pub broker: BrokerFlags,
    /// PEM certificate chain for the tenant's TLS and secure WebSocket
    /// clients (absolute): the handshake ends in this process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert` (absolute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates every TLS client's certificate must chain to
    /// (absolute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_client_ca: Option<PathBuf>,
    /// A TLS client's certificate common name becomes its user name (MQTT
    /// over TLS only; needs `tls_client_ca`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tls_identity_as_user: bool,
    /// The tenant's own certificate, served to clients asking for one of
    /// its own host names; `tls_cert` (the provider's) serves the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_own: Option<OwnCert>,
    /// Its rate quotas (`[quotas]`, the `mqvisor run` flags of the same
    /// names), enforced by its VMM's proxy.
    #[serde(default, skip_serializing_if = "Quotas::is_unlimited")]
    pub quotas: Quotas,
    /// In a fleet: the node its state is mirrored to (set by the daemon
    /// when this node owns it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby: Option<StandbyTarget>,
    /// In a fleet: whether writes to its state wait for a standby that is
    /// gone (`standby = "required"`) or go on without one (`"preferred"`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub standby_required: bool,
}

/// Where a tenant's process mirrors its state (`mqvisor::replica`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StandbyTarget {
    /// The standby node's relay port.
    pub address: std::net::SocketAddr,
    /// The tenant, as the standby names its copy.
    pub tenant: String,
    /// The etcd revision of this node's claim on the tenant.
    pub epoch: u64,
    /// The fleet's relay key, hexadecimal.
    pub key: String,
}

/// A tenant's own certificate and the host names it is served for.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OwnCert {
    pub names: Vec<String>,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TenantRun {
    /// Reads the file at `path`.
    pub fn read(path: &Path) -> Result<TenantRun, SettingsError> {
        let text = read_text(path, "tenant settings")?;
        toml::from_str(&text).map_err(|source| SettingsError::TenantFile { path: path.to_path_buf(), source })
    }

    /// The file's text.
    pub fn to_text(&self) -> Result<String, SettingsError> {
        toml::to_string(self).map_err(SettingsError::Merge)
    }
}

/// Settings resolved and checked, with the auth files' text (the VM gets
/// the text; the host runner the parsed form).
#[derive(Debug)]
pub struct Settings {
    pub config: Config,
    password_text: Option<String>,
    acl_text: Option<String>,
}

fn read_text(path: &Path, what: &'static str) -> Result<String, SettingsError> {
    let read_error = |source| SettingsError::Read { what, path: path.to_path_buf(), source };
    let size = std::fs::metadata(path).map_err(read_error)?.len();
    if size > MAX_FILE {
        return Err(SettingsError::TooLarge { what, path: path.to_path_buf(), size });
    }
    std::fs::read_to_string(path).map_err(read_error)
}

impl BrokerFlags {
    /// These settings over `under`: every setting given here wins.
    pub fn over(&self, under: &BrokerFlags) -> Result<BrokerFlags, SettingsError> {
        // Through TOML tables, so no setting has to be named here: only the
        // settings that were given are serialized.
        let table = |flags: &BrokerFlags| toml::Table::try_from(flags).map_err(SettingsError::Merge);
        let mut merged = table(under)?;
        merged.extend(table(self)?);
        let mut out: BrokerFlags = merged.try_into().map_err(SettingsError::Merged)?;
        out.config = self.config.clone();
        Ok(out)
    }

    /// Merges flags over the config file over defaults, reads the password
    /// and ACL files, and checks the result.
    pub fn resolve(&self) -> Result<Settings, SettingsError> {
        self.resolve_taking(&[]).map(|(settings, _)| settings)
    }

    /// As [`resolve`](Self::resolve), but the config file's keys named in
    /// `others` (settings that are not the broker's, such as `mqvisor
    /// run`'s listeners) are taken out and returned instead of refused.
    pub fn resolve_taking(&self, others: &[&str]) -> Result<(Settings, toml::Table), SettingsError> {
        let mut taken = toml::Table::new();
        let merged = match &self.config {
            Some(path) => {
                let text = read_text(path, "config file")?;
                let config_error = |source| SettingsError::ConfigFile { path: path.clone(), source };
                let mut table: toml::Table = toml::from_str(&text).map_err(config_error)?;
                for key in others {
                    if let Some(value) = table.remove(*key) {
                        taken.insert((*key).to_string(), value);
                    }
                }
                let mut file: BrokerFlags = table.try_into().map_err(config_error)?;
                // Paths in the file are relative to it; flag paths to the cwd.
                let base = path.parent().unwrap_or(Path::new(""));
                file.password_file = file.password_file.map(|p| base.join(p));
                file.acl_file = file.acl_file.map(|p| base.join(p));
                self.over(&file)?
            }
            None => self.clone(),
        };
        Ok((merged.to_settings()?, taken))
    }

    fn to_settings(&self) -> Result<Settings, SettingsError> {
        let password_text = self.password_file.as_deref().map(|p| read_text(p, "password file")).transpose()?;
        let acl_text = self.acl_file.as_deref().map(|p| read_text(p, "ACL file")).transpose()?;
        let passwords = match (&password_text, &self.password_file) {
            (Some(text), Some(path)) => Some(
                PasswordFile::parse(text)
                    .map_err(|source| SettingsError::PasswordFile { path: path.clone(), source })?,
            ),
            _ => None,
        };
        let acl = match (&acl_text, &self.acl_file) {
            (Some(text), Some(path)) => {
                Some(Acl::parse(text).map_err(|source| SettingsError::AclFile { path: path.clone(), source })?)
            }
            _ => None,
        };
        let defaults = Config::default();
        let config = Config {
            max_connections: self.max_connections.unwrap_or(defaults.max_connections),
            max_packet_size: self.max_packet_size.map_or(defaults.max_packet_size, |v| v as usize),
            max_queued_messages: self.max_queued_messages.unwrap_or(defaults.max_queued_messages),
            max_queued_bytes: self.max_queued_bytes.unwrap_or(defaults.max_queued_bytes),
            max_inflight: self.max_inflight.unwrap_or(defaults.max_inflight),
            receive_maximum: self.receive_maximum.unwrap_or(defaults.receive_maximum),
            max_sessions: self.max_sessions.unwrap_or(defaults.max_sessions),
            max_retained_messages: self.max_retained_messages.unwrap_or(defaults.max_retained_messages),
            max_retained_bytes: self.max_retained_bytes.unwrap_or(defaults.max_retained_bytes),
            max_subscriptions_per_client: self
                .max_subscriptions_per_client
                .unwrap_or(defaults.max_subscriptions_per_client),
            topic_limits: TopicLimits {
                max_len: self.max_topic_length.unwrap_or(defaults.topic_limits.max_len),
                max_levels: self.max_topic_levels.unwrap_or(defaults.topic_limits.max_levels),
            },
            max_keep_alive: self.max_keep_alive.or(defaults.max_keep_alive),
            connect_timeout_ms: self.connect_timeout_ms.unwrap_or(defaults.connect_timeout_ms),
            allow_anonymous: self.allow_anonymous.unwrap_or(passwords.is_none()),
            passwords,
            acl,
            ..defaults
        };
        config.validate().map_err(SettingsError::Invalid)?;
        Ok(Settings { config, password_text, acl_text })
    }
}

impl Settings {
    /// The settings as the guest's configuration blob
    /// (`mqvisor_boot_abi::config_blob`).
    pub fn config_blob(&self) -> Vec<u8> {
        config_blob::write(&self.config, self.password_text.as_deref(), self.acl_text.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mqvisor-settings-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn defaults_without_flags_or_file() {
        let s = BrokerFlags::default().resolve().unwrap();
        assert_eq!(s.config.max_connections, 10_000);
        assert!(s.config.allow_anonymous);
        let back = config_blob::read(&s.config_blob()).unwrap();
        assert!(back.passwords.is_none() && back.acl.is_none());
    }

    #[test]
    fn flags_override_the_file_and_paths_are_relative_to_it() {
        let conf = temp(
            "a.toml",
            "max_connections = 5\nmax_inflight = 3\nreceive_maximum = 9\nmax_keep_alive = 60\nacl_file = \"acl\"\n",
        );
        std::fs::write(conf.with_file_name("acl"), "topic read x\n").unwrap();
        let flags = BrokerFlags { config: Some(conf), max_inflight: Some(7), ..BrokerFlags::default() };
        let s = flags.resolve().unwrap();
        assert_eq!((s.config.max_connections, s.config.max_inflight), (5, 7));
        assert_eq!(s.config.max_keep_alive, Some(60));
        assert!(s.config.acl.is_some());
        // What the guest reads is what the host resolved.
        let guest = config_blob::read(&s.config_blob()).unwrap();
        assert_eq!((guest.max_connections, guest.max_inflight, guest.max_keep_alive), (5, 7, Some(60)));
        assert_eq!(guest.receive_maximum, 9);
        assert!(guest.acl.is_some());
    }

    #[test]
    fn zero_limits_and_oversize_files_are_refused() {
        let err = BrokerFlags { max_inflight: Some(0), ..BrokerFlags::default() }.resolve().unwrap_err();
        assert!(matches!(err, SettingsError::Invalid(ConfigError::ZeroWindow)), "{err}");
        let err = BrokerFlags { receive_maximum: Some(0), ..BrokerFlags::default() }.resolve().unwrap_err();
        assert!(matches!(err, SettingsError::Invalid(ConfigError::ZeroWindow)), "{err}");
        let err = BrokerFlags { max_topic_levels: Some(0), ..BrokerFlags::default() }.resolve().unwrap_err();
        assert!(err.to_string().contains("topic length and level"), "{err}");
        let err = BrokerFlags { max_keep_alive: Some(0), ..BrokerFlags::default() }.resolve().unwrap_err();
        assert!(err.to_string().contains("max keep alive"), "{err}");
        let big = temp("big", &"#".repeat(usize::try_from(MAX_FILE).unwrap() + 1));
        let err = BrokerFlags { acl_file: Some(big), ..BrokerFlags::default() }.resolve().unwrap_err();
        assert!(err.to_string().contains("at most"), "{err}");
    }

    #[test]
    fn a_tenant_file_reads_back_as_written() {
        let tenant = TenantRun {
            memory: 96,
            user: None,
            persistence: Persistence::Batch,
            state: Some(PathBuf::from("/var/lib/mqvisor/tenants/acme.state")),
            cgroup: Vec::new(),
            broker: BrokerFlags { max_connections: Some(7), ..BrokerFlags::default() },
            tls_cert: Some(PathBuf::from("/etc/acme/cert.pem")),
            tls_key: Some(PathBuf::from("/etc/acme/key.pem")),
            tls_client_ca: None,
            tls_identity_as_user: false,
            tls_own: None,
            quotas: Quotas { max_publish_rate: 2000, ..Quotas::default() },
            standby: Some(StandbyTarget {
                address: "10.0.0.3:1884".parse().unwrap(),
                tenant: "acme".into(),
                epoch: 42,
                key: "ab".repeat(32),
            }),
            standby_required: true,
        };
        let text = tenant.to_text().unwrap();
        // Settings not given are not written.
        assert!(!text.contains("tls_client_ca") && !text.contains("tls_identity_as_user"), "{text}");
        let path = temp("acme.toml", &text);
        let back = TenantRun::read(&path).unwrap();
        assert_eq!((back.memory, back.persistence, back.state), (96, Persistence::Batch, tenant.state));
        assert_eq!(back.broker.max_connections, Some(7));
        assert_eq!((back.tls_cert, back.tls_key), (tenant.tls_cert, tenant.tls_key));
        assert!(back.tls_client_ca.is_none() && !back.tls_identity_as_user);
        assert_eq!((&back.standby, back.standby_required), (&tenant.standby, true));
        assert_eq!(back.quotas, tenant.quotas);
        std::fs::write(&path, "memory = 64\npersistence = \"sync\"\nswap = 1\n[broker]\n").unwrap();
        let err = TenantRun::read(&path).unwrap_err().to_string();
        assert!(err.starts_with("tenant settings") && err.contains("swap"), "{err}");
    }

    #[test]
    fn bad_files_are_named() {
        let conf = temp("b.toml", "max_conections = 5\n");
        let err = BrokerFlags { config: Some(conf), ..BrokerFlags::default() }.resolve().unwrap_err();
        assert!(err.to_string().contains("config file") && err.to_string().contains("max_conections"), "{err}");
        let err = BrokerFlags { max_packet_size: Some(3), ..BrokerFlags::default() }.resolve().unwrap_err();
        assert!(err.to_string().contains("outside"), "{err}");
        let conf = temp("c.toml", "config = \"other.toml\"\n");
        let err = BrokerFlags { config: Some(conf), ..BrokerFlags::default() }.resolve().unwrap_err();
        assert!(err.to_string().contains("config"), "a config file cannot name another: {err}");
    }
}
