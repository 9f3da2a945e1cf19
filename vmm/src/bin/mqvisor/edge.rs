//! `mqvisor run`'s listeners beyond plain MQTT: MQTT over TLS
//! (`--listen-tls`, `--tls-cert`, `--tls-key`, `--tls-client-ca`), over
//! WebSockets (`--listen-ws`) and over both (`--listen-wss`), also as keys
//! of the `--config` file; and `--listen none` for no plain listener at all.
//!
//! Owns checking them before anything starts (each failure one line
//! naming the flag or file) and turning them into the VM's
//! [`Edge`](mqvisor::vm::Edge); for a process fed by `mqvisor serve`, the
//! tenant's TLS files instead, which serve the clients handed over
//! ([`EdgeFlags::resolve_handoff`]), never a listener. The TLS files are read here first; SIGHUP
//! reads the same files again (`mqvisor::vm`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mqvisor::net::ingress::{HandoffEdge, ListenOn};
use mqvisor::net::tls::{Alpn, NamedCert, ServerTls, TlsFiles};
use mqvisor::net::websocket::WsLimits;
use mqvisor::vm::Edge;
use serde::Deserialize;

/// The `--config` keys that are these flags (the broker's settings refuse them).
pub const CONFIG_KEYS: &[&str] =
    &["listen_tls", "listen_ws", "listen_wss", "tls_cert", "tls_key", "tls_client_ca", "tls_identity_as_user"];

/// `--listen`: an address, or `none` for no plain listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listen {
    At(SocketAddr),
    None,
}

impl std::str::FromStr for Listen {
    type Err = String;

    fn from_str(text: &str) -> Result<Listen, String> {
        if text == "none" {
            return Ok(Listen::None);
        }
        text.parse().map(Listen::At).map_err(|e| format!("`{text}`: {e} (an address such as 127.0.0.1:1883, or none)"))
    }
}

/// The TLS flags of `mqvisor run`, and the same keys of its `--config` file.
#[derive(clap::Args, Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeFlags {
    /// Also serve MQTT over TLS (1.2 and 1.3, ALPN `mqtt`) on this address;
    /// needs --tls-cert and --tls-key
    #[arg(long, value_name = "ADDR")]
    pub listen_tls: Option<SocketAddr>,
    /// Also serve MQTT over WebSockets (MQTT 5 section 6: paths / and /mqtt,
    /// subprotocol mqtt) on this address
    #[arg(long, value_name = "ADDR")]
    pub listen_ws: Option<SocketAddr>,
    /// Also serve MQTT over secure WebSockets (TLS, ALPN http/1.1) on this
    /// address, with --tls-cert and --tls-key
    #[arg(long, value_name = "ADDR")]
    pub listen_wss: Option<SocketAddr>,
    /// PEM certificate chain of the TLS listeners, their own certificate first
    #[arg(long, value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1; not encrypted)
    #[arg(long, value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates: every TLS client must present a certificate
    /// that chains to one of them (mutual TLS)
    #[arg(long, value_name = "PEM")]
    pub tls_client_ca: Option<PathBuf>,
    /// On --listen-tls, the client certificate's common name (CN) becomes
    /// the CONNECT's user name, and its password is dropped (Mosquitto's
    /// use_identity_as_username; ACLs apply to it). Needs --tls-client-ca
    #[arg(long)]
    #[serde(default)]
    pub tls_identity_as_user: bool,
    /// A `serve` tenant's own certificate for its own host names, beside
    /// `tls_cert` for every other name (no flag: from its settings file).
    #[arg(skip)]
    #[serde(skip)]
    pub tls_named: Option<NamedCert>,
}

impl EdgeFlags {
    /// These flags over the config file's keys (`file`, paths relative to
    /// `base`), checked, with the TLS files read. WebSocket frames are held
    /// to what `max_packet` needs.
    pub fn resolve(&self, file: toml::Table, base: &Path, listen: Listen, max_packet: usize) -> Result<Edge, String> {
        let identity =
            self.tls_identity_as_user || file.get("tls_identity_as_user").and_then(toml::Value::as_bool) == Some(true);
        let file: EdgeFlags = file.try_into().map_err(|e| format!("config file: {e}"))?;
        let from_file = |path: Option<PathBuf>| path.map(|p| base.join(p));
        let listen_tls = self.listen_tls.or(file.listen_tls);
        let listen_wss = self.listen_wss.or(file.listen_wss);
        let listen_ws = self.listen_ws.or(file.listen_ws);
        let cert = self.tls_cert.clone().or(from_file(file.tls_cert));
        let key = self.tls_key.clone().or(from_file(file.tls_key));
        let client_ca = self.tls_client_ca.clone().or(from_file(file.tls_client_ca));
        let ws = Some(WsLimits::for_max_packet(max_packet));
        if identity && (client_ca.is_none() || listen_tls.is_none()) {
            return Err("--tls-identity-as-user needs --listen-tls and --tls-client-ca".into());
        }
        if identity && listen_wss.is_some() {
            // Its clients would choose their own user names: refused, not a surprise.
            return Err("--tls-identity-as-user applies to --listen-tls only, not yet to --listen-wss: \
                        serve wss on its own"
                .into());
        }
        let mut more = Vec::new();
        if listen_tls.is_some() || listen_wss.is_some() {
            let (Some(cert), Some(key)) = (cert, key) else {
                return Err("--listen-tls and --listen-wss need --tls-cert and --tls-key".into());
            };
            let load = |alpn| {
                let files =
                    TlsFiles { cert: cert.clone(), key: key.clone(), client_ca: client_ca.clone(), alpn, named: None };
                ServerTls::load(files).map(Arc::new).map_err(|e| e.to_string())
            };
            if let Some(addr) = listen_tls {
                let identity_max = identity.then_some(max_packet);
                more.push(ListenOn { addr, tls: Some(load(Alpn::Mqtt)?), ws: None, identity_max });
            }
            if let Some(addr) = listen_wss {
                more.push(ListenOn { addr, tls: Some(load(Alpn::Http11)?), ws, identity_max: None });
            }
        } else if cert.is_some() || key.is_some() || client_ca.is_some() {
            return Err("--tls-cert, --tls-key and --tls-client-ca need --listen-tls or --listen-wss".into());
        }
        if let Some(addr) = listen_ws {
            more.push(ListenOn { addr, tls: None, ws, identity_max: None });
        }
        let no_plain = listen == Listen::None;
        if no_plain && more.is_empty() {
            return Err("--listen none leaves no listener: give --listen-tls, --listen-ws or --listen-wss too".into());
        }
        Ok(Edge { no_plain, more, handoff: HandoffEdge::default() })
    }

    /// For a process fed by `mqvisor serve` (`--handoff-fd`): how it
    /// serves the clients handed over beyond plain MQTT. The daemon
    /// listens, so no listener is resolved here; the TLS files (a tenant's
    /// settings, paths absolute) are read now. With a certificate and key,
    /// MQTT over TLS (ALPN `mqtt`) and secure WebSockets (ALPN `http/1.1`)
    /// are served; WebSockets always, frames held to what `max_packet`
    /// needs; the identity as user name applies to MQTT over TLS only.
    pub fn resolve_handoff(&self, max_packet: usize) -> Result<Edge, String> {
        if self.listen_tls.is_some() || self.listen_ws.is_some() || self.listen_wss.is_some() {
            return Err("--listen-tls, --listen-ws and --listen-wss are not for --handoff-fd: \
                        mqvisor serve listens"
                .into());
        }
        let identity = self.tls_identity_as_user;
        if identity && self.tls_client_ca.is_none() {
            return Err("tls_identity_as_user needs tls_client_ca".into());
        }
        let ws = Some(WsLimits::for_max_packet(max_packet));
        let handoff = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                let load = |alpn| {
                    let files = TlsFiles {
                        cert: cert.clone(),
                        key: key.clone(),
                        client_ca: self.tls_client_ca.clone(),
                        alpn,
                        named: self.tls_named.clone(),
                    };
                    ServerTls::load(files).map(Arc::new).map_err(|e| e.to_string())
                };
                HandoffEdge {
                    tls: Some(load(Alpn::Mqtt)?),
                    wss_tls: Some(load(Alpn::Http11)?),
                    ws,
                    identity_max: identity.then_some(max_packet),
                }
            }
            (None, None) if self.tls_client_ca.is_none() => HandoffEdge { ws, ..HandoffEdge::default() },
            _ => return Err("TLS for handed-over clients needs tls_cert and tls_key".into()),
        };
        Ok(Edge { no_plain: false, more: Vec::new(), handoff })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(flags: &EdgeFlags, file: &str, listen: Listen) -> Result<Edge, String> {
        flags.resolve(toml::from_str(file).unwrap(), Path::new(""), listen, 1 << 20)
    }

    #[test]
    fn listen_parses_an_address_or_none() {
        assert_eq!("none".parse::<Listen>(), Ok(Listen::None));
        assert_eq!("127.0.0.1:1".parse::<Listen>(), Ok(Listen::At(SocketAddr::from(([127, 0, 0, 1], 1)))));
        assert!("nowhere".parse::<Listen>().unwrap_err().contains("or none"));
    }

    #[test]
    fn incomplete_or_contradictory_settings_are_refused_in_one_line() {
        let plain = Listen::At(SocketAddr::from(([127, 0, 0, 1], 0)));
        let none = EdgeFlags::default();
        assert!(resolve(&none, "", plain).unwrap().more.is_empty());
        assert!(resolve(&none, "", Listen::None).unwrap_err().contains("--listen none leaves no listener"));
        let cert_only = EdgeFlags { tls_cert: Some("c.pem".into()), ..EdgeFlags::default() };
        assert!(resolve(&cert_only, "", plain).unwrap_err().contains("need --listen-tls or --listen-wss"));
        let addr = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        let no_key = EdgeFlags { listen_tls: addr, tls_cert: Some("c.pem".into()), ..EdgeFlags::default() };
        assert!(resolve(&no_key, "", plain).unwrap_err().contains("need --tls-cert and --tls-key"));
        let identity = EdgeFlags { listen_tls: addr, tls_identity_as_user: true, ..EdgeFlags::default() };
        assert!(resolve(&identity, "", plain).unwrap_err().contains("--tls-identity-as-user needs"));
        let identity_wss = EdgeFlags { listen_wss: addr, tls_client_ca: Some("ca.pem".into()), ..identity.clone() };
        assert!(resolve(&identity_wss, "", plain).unwrap_err().contains("not yet to --listen-wss"));
        // The file's keys count as the flags do.
        assert!(resolve(&none, "tls_key = \"k.pem\"", plain).unwrap_err().contains("need --listen-tls"));
        assert!(resolve(&none, "listen_wss = \"127.0.0.1:0\"", plain).unwrap_err().contains("--tls-cert"));
        // A plain WebSocket listener needs no file, and may stand alone.
        let ws = resolve(&none, "listen_ws = \"127.0.0.1:0\"", Listen::None).unwrap();
        assert!(ws.no_plain && ws.more.len() == 1 && ws.more[0].ws.is_some() && ws.more[0].tls.is_none());
    }

    #[test]
    fn a_handoff_edge_serves_tls_and_wss_with_the_tenant_files_and_no_listener() {
        let dir = std::env::temp_dir().join(format!("mqvisor-edge-handoff-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["acme.example".to_string()]).unwrap().self_signed(&key).unwrap();
        let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();

        // No TLS files: WebSockets only, nothing read, no listener.
        let plain = EdgeFlags::default().resolve_handoff(1 << 20).unwrap();
        assert!(plain.more.is_empty() && !plain.no_plain);
        assert!(plain.handoff.tls.is_none() && plain.handoff.wss_tls.is_none());
        assert_eq!(plain.handoff.ws, Some(WsLimits::for_max_packet(1 << 20)));

        let flags = EdgeFlags { tls_cert: Some(cert_path.clone()), tls_key: Some(key_path), ..EdgeFlags::default() };
        let edge = flags.resolve_handoff(4096).unwrap().handoff;
        let alpn = |tls: &Option<Arc<ServerTls>>| tls.as_ref().map(|tls| tls.files().alpn);
        assert_eq!((alpn(&edge.tls), alpn(&edge.wss_tls)), (Some(Alpn::Mqtt), Some(Alpn::Http11)));
        assert_eq!((edge.ws, edge.identity_max), (Some(WsLimits::for_max_packet(4096)), None));
        // The identity as user name: MQTT over TLS only, and with a client CA.
        let identity =
            EdgeFlags { tls_client_ca: Some(cert_path.clone()), tls_identity_as_user: true, ..flags.clone() };
        assert_eq!(identity.resolve_handoff(4096).unwrap().handoff.identity_max, Some(4096));
        let no_ca = EdgeFlags { tls_identity_as_user: true, ..flags.clone() };
        assert!(no_ca.resolve_handoff(4096).unwrap_err().contains("needs tls_client_ca"));

        // Half a pair, a listener, a file that is not there: one line each,
        // never the listener checks of `mqvisor run`.
        let cert_only = EdgeFlags { tls_cert: Some(cert_path), ..EdgeFlags::default() };
        assert!(cert_only.resolve_handoff(4096).unwrap_err().contains("needs tls_cert and tls_key"));
        let listener = EdgeFlags { listen_ws: Some(SocketAddr::from(([127, 0, 0, 1], 0))), ..EdgeFlags::default() };
        assert!(listener.resolve_handoff(4096).unwrap_err().contains("not for --handoff-fd"));
        let missing = EdgeFlags { tls_key: Some(dir.join("gone.pem")), ..flags };
        assert!(missing.resolve_handoff(4096).unwrap_err().contains("gone.pem"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
