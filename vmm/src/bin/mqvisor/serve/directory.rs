//! Which tenant a client reaches: by its tenant's name (the `TENANT:`
//! prefix of a CONNECT user name), or by a host name (TLS SNI on the shared
//! TLS ports, the `Host` header on the shared WebSocket port):
//! `NAME.<tls_domain>` is tenant NAME, and a tenant's own `tls_names`
//! (a customer's domain, `mqtt.acme.com`) are that tenant.
//!
//! Owns the table the accept tasks read and the daemon's loop changes as
//! tenants come and go, and the rule that no host name reaches two
//! tenants. Never reads a client's bytes, and never holds a key: which
//! certificate a name is served with is the tenant process's business.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};

/// The shared table (see the module doc).
#[derive(Clone, Default)]
pub struct Directory(Arc<RwLock<Table>>);

#[derive(Default)]
struct Table {
    /// Every tenant's name, failed ones too (their clients are refused,
    /// not told the tenant does not exist).
    tenants: BTreeSet<String>,
    /// Tenants whose process has a certificate: those TLS clients may reach.
    tls: BTreeSet<String>,
    /// Tenants that require a client certificate (`tls_client_ca`): reached
    /// over TLS only, never on a plain or WebSocket port, where a client
    /// would name any user it likes without one.
    certificate_only: BTreeSet<String>,
    /// Each tenant's own host names, to the tenant.
    own_names: BTreeMap<String, String>,
    /// `NAME.<domain>` is tenant NAME.
    domain: Option<String>,
}

/// How a tenant may be reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// Without TLS only (no certificate).
    Plain,
    /// With TLS (it has a certificate) and without.
    Tls,
    /// With TLS and a client certificate only (`tls_client_ca`).
    CertificateOnly,
}

impl Reach {
    /// How the tenant with these settings may be reached.
    pub fn of(run: &crate::settings::TenantRun) -> Reach {
        match (&run.tls_cert, &run.tls_client_ca) {
            (None, _) => Reach::Plain,
            (Some(_), None) => Reach::Tls,
            (Some(_), Some(_)) => Reach::CertificateOnly,
        }
    }
}

/// Which transport a client came by, for [`Directory::by_host`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Over {
    /// TLS (MQTT over TLS, secure WebSockets): only tenants with a
    /// certificate are reached.
    Tls,
    /// Plain WebSockets.
    Plain,
}

impl Directory {
    /// A table with tenants named under `domain` (lower case), if any.
    pub fn new(domain: Option<String>) -> Directory {
        Directory(Arc::new(RwLock::new(Table { domain, ..Table::default() })))
    }

    /// True when `tenant` exists and takes clients without TLS.
    pub fn has(&self, tenant: &str) -> bool {
        self.0.read().is_ok_and(|t| t.tenants.contains(tenant) && !t.certificate_only.contains(tenant))
    }

    /// Enters `tenant` as `reach` says, with its own host names. Refused
    /// (and nothing entered) when one of them reaches another tenant
    /// already, or is the shared domain or lies under it, where names are
    /// the tenants' own.
    pub fn insert(&self, tenant: &str, reach: Reach, own_names: &[String]) -> Result<(), String> {
        let Ok(mut table) = self.0.write() else { return Err("the tenant table is unusable".into()) };
        for name in own_names {
            if let Some(owner) = table.own_names.get(name).filter(|owner| *owner != tenant) {
                return Err(format!("tls_names: {name} is tenant {owner}'s already"));
            }
            if let Some(domain) = &table.domain
                && (name == domain || name.strip_suffix(domain.as_str()).is_some_and(|rest| rest.ends_with('.')))
            {
                return Err(format!(
                    "tls_names: {name} is tls_domain {domain} or lies under it, where each name is the tenant of \
                     that name"
                ));
            }
        }
        table.remove(tenant);
        table.tenants.insert(tenant.to_string());
        if reach != Reach::Plain {
            table.tls.insert(tenant.to_string());
        }
        if reach == Reach::CertificateOnly {
            table.certificate_only.insert(tenant.to_string());
        }
        for name in own_names {
            table.own_names.insert(name.clone(), tenant.to_string());
        }
        Ok(())
    }

    /// Enters tenant `name` with its settings (see [`Directory::insert`]).
    pub fn enter(&self, name: &str, config: &super::config::TenantConfig) -> Result<(), String> {
        self.insert(name, Reach::of(&config.run), &config.tls_names)
    }

    /// Forgets `tenant` and its names.
    pub fn remove(&self, tenant: &str) {
        if let Ok(mut table) = self.0.write() {
            table.remove(tenant);
        }
    }

    /// The tenant `host` (a name in lower case, from SNI or a `Host`
    /// header) reaches over `over`, if any.
    pub fn by_host(&self, host: &str, over: Over) -> Option<String> {
        let table = self.0.read().ok()?;
        let tenant = match table.own_names.get(host) {
            Some(tenant) => tenant.as_str(),
            None => under(host, table.domain.as_deref()?)?,
        };
        let reachable = match over {
            Over::Tls => table.tls.contains(tenant),
            Over::Plain => table.tenants.contains(tenant) && !table.certificate_only.contains(tenant),
        };
        reachable.then(|| tenant.to_string())
    }
}

impl Table {
    fn remove(&mut self, tenant: &str) {
        self.tenants.remove(tenant);
        self.tls.remove(tenant);
        self.certificate_only.remove(tenant);
        self.own_names.retain(|_, owner| owner != tenant);
    }
}

/// The label left of `.domain` in `host`, when it is a single one.
fn under<'a>(host: &'a str, domain: &str) -> Option<&'a str> {
    let label = host.strip_suffix(domain)?.strip_suffix('.')?;
    (!label.is_empty() && !label.contains('.')).then_some(label)
}

/// True for a DNS host name as SNI carries it: dot-separated labels of
/// letters, digits and hyphens, in lower case, 253 bytes at most.
pub fn valid_host_name(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_under_the_domain_and_own_names_reach_their_tenant() {
        let d = Directory::new(Some("mq.example.com".into()));
        d.insert("acme", Reach::Tls, &["mqtt.acme.com".into()]).unwrap();
        d.insert("globex", Reach::Plain, &[]).unwrap();
        assert_eq!(d.by_host("acme.mq.example.com", Over::Tls).as_deref(), Some("acme"));
        assert_eq!(d.by_host("mqtt.acme.com", Over::Tls).as_deref(), Some("acme"));
        // No certificate: not over TLS, but over plain WebSockets.
        assert_eq!(d.by_host("globex.mq.example.com", Over::Tls), None);
        assert_eq!(d.by_host("globex.mq.example.com", Over::Plain).as_deref(), Some("globex"));
        for host in ["nobody.mq.example.com", "mq.example.com", "a.acme.mq.example.com", "xmq.example.com", ""] {
            assert_eq!(d.by_host(host, Over::Plain), None, "{host}");
        }
        d.remove("acme");
        assert_eq!(d.by_host("mqtt.acme.com", Over::Tls), None);
        assert!(!d.has("acme") && d.has("globex"));
    }

    #[test]
    fn a_name_reaches_one_tenant_only() {
        let d = Directory::new(Some("mq.example.com".into()));
        d.insert("acme", Reach::Tls, &["mqtt.acme.com".into()]).unwrap();
        let err = d.insert("globex", Reach::Tls, &["mqtt.acme.com".into()]).unwrap_err();
        assert!(err.contains("is tenant acme's already"), "{err}");
        for under in ["acme.mq.example.com", "a.b.acme.mq.example.com", "mq.example.com"] {
            let err = d.insert("globex", Reach::Tls, &[under.into()]).unwrap_err();
            assert!(err.contains("or lies under it"), "{under}: {err}");
        }
        assert!(!d.has("globex"), "nothing entered");
        // Not under it: a name that only ends the same way.
        d.insert("initech", Reach::Tls, &["xmq.example.com".into()]).unwrap();
        // Entering a tenant again replaces its names.
        d.insert("acme", Reach::Tls, &["mq.acme.com".into()]).unwrap();
        assert_eq!(d.by_host("mqtt.acme.com", Over::Tls), None);
        assert_eq!(d.by_host("mq.acme.com", Over::Tls).as_deref(), Some("acme"));
    }

    #[test]
    fn a_tenant_that_requires_client_certificates_is_reached_over_tls_only() {
        let d = Directory::new(Some("mq.example.com".into()));
        d.insert("acme", Reach::CertificateOnly, &[]).unwrap();
        assert_eq!(d.by_host("acme.mq.example.com", Over::Tls).as_deref(), Some("acme"));
        assert_eq!(d.by_host("acme.mq.example.com", Over::Plain), None);
        assert!(!d.has("acme"), "not by a user-name prefix on the plain port either");
    }

    #[test]
    fn host_names_are_checked() {
        for good in ["a", "mqtt.acme.com", "x-1.example"] {
            assert!(valid_host_name(good), "{good}");
        }
        for bad in ["", "A.com", "a..b", "-a.com", "a-.com", "a_b.com", "*.acme.com", &"a".repeat(64)] {
            assert!(!valid_host_name(bad), "{bad}");
        }
    }
}
