//! Broker settings for `mqvisor run` and `mqvisor broker`: command-line
//! flags over an optional TOML file (`--config`) over defaults.
//!
//! Owns reading and checking everything an operator configures about the
//! broker (limits, password file, ACL file) before anything starts, with
//! errors that name the file and line. Must never hand on a setting it has
//! not checked.

use std::path::{Path, PathBuf};

use mqvisor_broker::auth::{Acl, PasswordFile};
use mqvisor_broker::broker::Config;
use mqvisor_broker::topic::TopicLimits;
use serde::Deserialize;

/// Largest password, ACL or config file accepted.
const MAX_FILE: u64 = 512 * 1024;

/// Broker flags shared by `mqvisor run` and `mqvisor broker`. Each one
/// overrides the same key in `--config`.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct BrokerFlags {
    /// TOML file with any of the settings below (flags override it), e.g.
    /// `max_connections = 500` or `password_file = "passwords"` (paths relative to the file)
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Most concurrent MQTT connections [default: 10000]
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Largest MQTT packet accepted, in bytes, 16..=268435460 [default: 1048576]
    #[arg(long, value_name = "BYTES")]
    pub max_packet_size: Option<u32>,
    /// Messages queued per offline or slow session before new ones are dropped [default: 1000]
    #[arg(long, value_name = "N")]
    pub max_queued_messages: Option<usize>,
    /// Unacknowledged QoS 1/2 messages in flight per session, at least 1 [default: 20]
    #[arg(long, value_name = "N")]
    pub max_inflight: Option<u16>,
    /// Subscriptions one client may hold [default: 1000]
    #[arg(long, value_name = "N")]
    pub max_subscriptions_per_client: Option<usize>,
    /// Longest topic name or filter, in bytes [default: 65535]
    #[arg(long, value_name = "BYTES")]
    pub max_topic_length: Option<usize>,
    /// Most levels in a topic name or filter [default: 128]
    #[arg(long, value_name = "N")]
    pub max_topic_levels: Option<usize>,
    /// Keep-alive the broker imposes on MQTT 5 clients, seconds [default: the client's]
    #[arg(long, value_name = "SECS")]
    pub server_keep_alive: Option<u16>,
    /// Users and salted password hashes, as written by `mosquitto_passwd`
    #[arg(long, value_name = "PATH")]
    pub password_file: Option<PathBuf>,
    /// Per-user publish/subscribe rules (Mosquitto ACL file format)
    #[arg(long, value_name = "PATH")]
    pub acl_file: Option<PathBuf>,
    /// Let clients without a user name connect [default: true without a
    /// password file, false with one]
    #[arg(long, value_name = "BOOL")]
    pub allow_anonymous: Option<bool>,
}

/// The `--config` file: the same settings as the flags.
#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    max_connections: Option<usize>,
    max_packet_size: Option<u32>,
    max_queued_messages: Option<usize>,
    max_inflight: Option<u16>,
    max_subscriptions_per_client: Option<usize>,
    max_topic_length: Option<usize>,
    max_topic_levels: Option<usize>,
    server_keep_alive: Option<u16>,
    password_file: Option<PathBuf>,
    acl_file: Option<PathBuf>,
    allow_anonymous: Option<bool>,
}

/// Settings resolved and checked, with the auth files' text (the VM gets
/// the text; the host runner the parsed form).
#[derive(Debug)]
pub struct Settings {
    pub config: Config,
    password_text: Option<String>,
    acl_text: Option<String>,
}

fn read_text(path: &Path, what: &str) -> Result<String, String> {
    let size = std::fs::metadata(path).map_err(|e| format!("{what} {}: {e}", path.display()))?.len();
    if size > MAX_FILE {
        return Err(format!("{what} {} is {size} bytes; at most {MAX_FILE} are accepted", path.display()));
    }
    std::fs::read_to_string(path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

impl BrokerFlags {
    /// Merges flags over the config file over defaults, and reads the
    /// password and ACL files.
    pub fn resolve(&self) -> Result<Settings, String> {
        let (file, base) = match &self.config {
            Some(path) => {
                let text = read_text(path, "config file")?;
                let file: FileSettings =
                    toml::from_str(&text).map_err(|e| format!("config file {}: {e}", path.display()))?;
                (file, path.parent().map(Path::to_path_buf).unwrap_or_default())
            }
            None => (FileSettings::default(), PathBuf::new()),
        };
        let defaults = Config::default();
        let max_packet_size =
            self.max_packet_size.or(file.max_packet_size).map_or(defaults.max_packet_size, |v| v as usize);
        if !(16..=268_435_460).contains(&max_packet_size) {
            return Err(format!("max packet size {max_packet_size} is outside 16..=268435460"));
        }
        let max_inflight = self.max_inflight.or(file.max_inflight).unwrap_or(defaults.max_inflight);
        if max_inflight == 0 {
            return Err("max inflight must be at least 1".into());
        }
        // File paths are relative to the config file; flag paths to the cwd.
        let in_file = |p: Option<PathBuf>| p.map(|p| base.join(p));
        let password_path = self.password_file.clone().or_else(|| in_file(file.password_file));
        let acl_path = self.acl_file.clone().or_else(|| in_file(file.acl_file));
        let password_text = password_path.as_deref().map(|p| read_text(p, "password file")).transpose()?;
        let acl_text = acl_path.as_deref().map(|p| read_text(p, "ACL file")).transpose()?;
        let passwords = match (&password_text, &password_path) {
            (Some(text), Some(path)) => {
                Some(PasswordFile::parse(text).map_err(|e| format!("password file {}: {e}", path.display()))?)
            }
            _ => None,
        };
        let acl = match (&acl_text, &acl_path) {
            (Some(text), Some(path)) => {
                Some(Acl::parse(text).map_err(|e| format!("ACL file {}: {e}", path.display()))?)
            }
            _ => None,
        };
        let allow_anonymous = self.allow_anonymous.or(file.allow_anonymous).unwrap_or(passwords.is_none());
        let topic_limits = TopicLimits {
            max_len: self.max_topic_length.or(file.max_topic_length).unwrap_or(defaults.topic_limits.max_len),
            max_levels: self.max_topic_levels.or(file.max_topic_levels).unwrap_or(defaults.topic_limits.max_levels),
        };
        if topic_limits.max_len == 0 || topic_limits.max_levels == 0 {
            return Err("topic length and level limits must be at least 1".into());
        }
        let config = Config {
            max_connections: self.max_connections.or(file.max_connections).unwrap_or(defaults.max_connections),
            max_packet_size,
            max_queued_messages: self
                .max_queued_messages
                .or(file.max_queued_messages)
                .unwrap_or(defaults.max_queued_messages),
            max_inflight,
            max_subscriptions_per_client: self
                .max_subscriptions_per_client
                .or(file.max_subscriptions_per_client)
                .unwrap_or(defaults.max_subscriptions_per_client),
            topic_limits,
            server_keep_alive: self.server_keep_alive.or(file.server_keep_alive),
            passwords,
            acl,
            allow_anonymous,
            ..defaults
        };
        Ok(Settings { config, password_text, acl_text })
    }
}

impl Settings {
    /// The limits as the guest's `mqtt.*` command-line words.
    pub fn cmdline_words(&self) -> String {
        let c = &self.config;
        format!(
            "mqtt.max_connections={} mqtt.max_packet_size={} mqtt.max_queued_messages={} mqtt.max_inflight={} \
             mqtt.max_subscriptions_per_client={} mqtt.max_topic_length={} mqtt.max_topic_levels={} \
             mqtt.allow_anonymous={}{}",
            c.max_connections,
            c.max_packet_size,
            c.max_queued_messages,
            c.max_inflight,
            c.max_subscriptions_per_client,
            c.topic_limits.max_len,
            c.topic_limits.max_levels,
            u8::from(c.allow_anonymous),
            c.server_keep_alive.map(|k| format!(" mqtt.server_keep_alive={k}")).unwrap_or_default()
        )
    }

    /// The password and ACL files as the guest's configuration blob
    /// (`mqvisor_boot_abi::config_blob`).
    pub fn config_blob(&self) -> Vec<u8> {
        let mut blob = Vec::new();
        for text in [&self.password_text, &self.acl_text] {
            match text {
                None => blob.push(0),
                Some(text) => {
                    blob.push(1);
                    // Bounded by MAX_FILE.
                    blob.extend_from_slice(&u32::try_from(text.len()).unwrap_or(u32::MAX).to_le_bytes());
                    blob.extend_from_slice(text.as_bytes());
                }
            }
        }
        blob
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
        assert_eq!(s.config_blob(), vec![0, 0]);
    }

    #[test]
    fn flags_override_the_file_and_paths_are_relative_to_it() {
        let conf = temp("a.toml", "max_connections = 5\nmax_inflight = 3\nacl_file = \"acl\"\n");
        std::fs::write(conf.with_file_name("acl"), "topic read x\n").unwrap();
        let flags = BrokerFlags { config: Some(conf), max_inflight: Some(7), ..BrokerFlags::default() };
        let s = flags.resolve().unwrap();
        assert_eq!((s.config.max_connections, s.config.max_inflight), (5, 7));
        assert!(s.config.acl.is_some());
        assert!(s.cmdline_words().contains("mqtt.max_inflight=7"));
    }

    #[test]
    fn zero_limits_and_oversize_files_are_refused() {
        let err = BrokerFlags { max_inflight: Some(0), ..BrokerFlags::default() }.resolve().unwrap_err();
        assert!(err.contains("max inflight"), "{err}");
        let err = BrokerFlags { max_topic_levels: Some(0), ..BrokerFlags::default() }.resolve().unwrap_err();
        assert!(err.contains("topic length and level"), "{err}");
        let big = temp("big", &"#".repeat(usize::try_from(MAX_FILE).unwrap() + 1));
        let err = BrokerFlags { acl_file: Some(big), ..BrokerFlags::default() }.resolve().unwrap_err();
        assert!(err.contains("at most"), "{err}");
    }

    #[test]
    fn bad_files_are_named() {
        let conf = temp("b.toml", "max_conections = 5\n");
        let err = BrokerFlags { config: Some(conf), ..BrokerFlags::default() }.resolve().unwrap_err();
        assert!(err.contains("config file") && err.contains("max_conections"), "{err}");
        let err = BrokerFlags { max_packet_size: Some(3), ..BrokerFlags::default() }.resolve().unwrap_err();
        assert!(err.contains("outside"), "{err}");
    }
}
