//! `mqvisor run`'s rate quotas (`--max-publish-rate`,
//! `--max-client-publish-rate`, `--max-ingress-bytes-rate`,
//! `--max-egress-bytes-rate`, `--max-connection-rate`), also as keys of
//! its `--config` file and of a `serve` tenant's settings.
//!
//! Owns reading them into the VMM's [`Quotas`]. They are the VMM's
//! settings, enforced by its proxy (`mqvisor::net::quota`): never the
//! broker's, so the broker's settings must never see these keys (they are
//! taken out of the config file first, [`CONFIG_KEYS`]).

use mqvisor::net::quota::Quotas;
use serde::Deserialize;

/// The `--config` keys that are these flags (the broker's settings refuse them).
pub const CONFIG_KEYS: &[&str] = &[
    "max_publish_rate",
    "max_client_publish_rate",
    "max_ingress_bytes_rate",
    "max_egress_bytes_rate",
    "max_connection_rate",
];

/// The quota flags of `mqvisor run`, and the same keys of its `--config`
/// file. 0 or absent: no limit.
#[derive(clap::Args, Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaFlags {
    /// PUBLISH packets per second into the tenant, all clients together;
    /// past it clients are not read until tokens come (they wait, nothing
    /// is dropped) [default: no limit]
    #[arg(long, value_name = "N")]
    pub max_publish_rate: Option<u64>,
    /// PUBLISH packets per second from any one client [default: no limit]
    #[arg(long, value_name = "N")]
    pub max_client_publish_rate: Option<u64>,
    /// Bytes per second read from the tenant's clients, together [default: no limit]
    #[arg(long, value_name = "BYTES")]
    pub max_ingress_bytes_rate: Option<u64>,
    /// Bytes per second written to the tenant's clients, together [default: no limit]
    #[arg(long, value_name = "BYTES")]
    pub max_egress_bytes_rate: Option<u64>,
    /// New client connections per second; past it new clients wait to be
    /// taken [default: no limit]
    #[arg(long, value_name = "N")]
    pub max_connection_rate: Option<u64>,
}

impl QuotaFlags {
    /// These flags over the config file's keys (`file`, those of
    /// [`CONFIG_KEYS`] it had).
    pub fn resolve(&self, file: toml::Table) -> Result<Quotas, String> {
        let file: QuotaFlags = file.try_into().map_err(|e| format!("config file: {e}"))?;
        let pick = |flag: Option<u64>, key: Option<u64>| flag.or(key).unwrap_or(0);
        Ok(Quotas {
            max_publish_rate: pick(self.max_publish_rate, file.max_publish_rate),
            max_client_publish_rate: pick(self.max_client_publish_rate, file.max_client_publish_rate),
            max_ingress_bytes_rate: pick(self.max_ingress_bytes_rate, file.max_ingress_bytes_rate),
            max_egress_bytes_rate: pick(self.max_egress_bytes_rate, file.max_egress_bytes_rate),
            max_connection_rate: pick(self.max_connection_rate, file.max_connection_rate),
        })
    }

    /// These settings over `under`: every one given here wins.
    pub fn over(&self, under: &QuotaFlags) -> QuotaFlags {
        QuotaFlags {
            max_publish_rate: self.max_publish_rate.or(under.max_publish_rate),
            max_client_publish_rate: self.max_client_publish_rate.or(under.max_client_publish_rate),
            max_ingress_bytes_rate: self.max_ingress_bytes_rate.or(under.max_ingress_bytes_rate),
            max_egress_bytes_rate: self.max_egress_bytes_rate.or(under.max_egress_bytes_rate),
            max_connection_rate: self.max_connection_rate.or(under.max_connection_rate),
        }
    }

    /// Takes these keys out of a `serve` tenant's table (errors begin with
    /// `context`).
    pub fn take_from(table: &mut toml::Table, context: &str) -> Result<QuotaFlags, String> {
        let mut quotas = toml::Table::new();
        for key in CONFIG_KEYS {
            if let Some(value) = table.remove(*key) {
                if value.as_integer().is_none_or(|n| n < 0) {
                    return Err(format!(
                        "{context}: {key} must be a whole number of at least 0, per second (0: no limit), not {value}"
                    ));
                }
                quotas.insert((*key).to_string(), value);
            }
        }
        quotas.try_into().map_err(|e: toml::de::Error| format!("{context}: {}", e.message()))
    }

    /// The flags that give `quotas` (a `serve` tenant's).
    pub fn of(quotas: Quotas) -> QuotaFlags {
        let given = |n: u64| (n > 0).then_some(n);
        QuotaFlags {
            max_publish_rate: given(quotas.max_publish_rate),
            max_client_publish_rate: given(quotas.max_client_publish_rate),
            max_ingress_bytes_rate: given(quotas.max_ingress_bytes_rate),
            max_egress_bytes_rate: given(quotas.max_egress_bytes_rate),
            max_connection_rate: given(quotas.max_connection_rate),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_and_absent_is_no_limit() {
        let file: toml::Table = toml::from_str("max_publish_rate = 100\nmax_connection_rate = 5\n").unwrap();
        let flags = QuotaFlags { max_publish_rate: Some(7), ..QuotaFlags::default() };
        let quotas = flags.resolve(file).unwrap();
        assert_eq!(quotas, Quotas { max_publish_rate: 7, max_connection_rate: 5, ..Quotas::default() });
        assert!(QuotaFlags::default().resolve(toml::Table::new()).unwrap().is_unlimited());
        let bad: toml::Table = toml::from_str("max_publish_rate = -1\n").unwrap();
        assert!(QuotaFlags::default().resolve(bad).is_err());
        assert_eq!(QuotaFlags::of(quotas).resolve(toml::Table::new()).unwrap(), quotas);
    }
}
