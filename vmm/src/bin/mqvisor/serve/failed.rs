//! Tenants whose settings could not be used at start (a file gone, a
//! setting no VM boots with, a port taken): listed as `failed` with the
//! reason, counted in `/metrics`, answered "server unavailable" and
//! removable, while every other tenant is served. Only the daemon's own
//! settings may stop the daemon.
//!
//! Owns what the daemon does with such a tenant; its settings are read
//! and checked in `config`, and tried again on `mqvisor tenant restart`.

use std::collections::BTreeMap;
use std::path::Path;

use mqvisor_broker::broker::reason;
use mqvisor_broker::packet::{self, Connack, Packet, Version};
use mqvisor_broker::properties::Properties;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use mqvisor::net::ingress::Handed;
use mqvisor::net::tls::hello::alert_record;
use mqvisor::net::websocket::handshake;

use super::config::{FailedTenant, TenantTable};
use super::directory::Directory;
use super::front::{FirstBytes, MAX_FIRST_BYTES};
use super::tenant::{self, Tenant};

/// The one log line for a tenant that failed.
pub fn log(name: &str, failed: &FailedTenant) {
    tracing::error!(
        tenant = %name,
        reason = %failed.reason,
        "failed: its settings cannot be used, so it is not served (`mqvisor tenant restart {name}` tries again)"
    );
}

/// Answers a client of a failed tenant "unavailable", then closes: a plain
/// client (its CONNECT is `first_bytes`) "server unavailable" (v5 0x88,
/// 3.x return code 3), a TLS client an `internal_error` alert (the
/// daemon has no key to say more with), a WebSocket client 503.
pub fn refuse(mut client: TcpStream, first_bytes: FirstBytes) {
    let reply = match first_bytes.kind() {
        Handed::Mqtt => {
            let Ok(Some(frame)) = packet::frame(&first_bytes, MAX_FIRST_BYTES) else { return };
            let Ok(Packet::Connect(connect)) = packet::decode(frame, &first_bytes, Version::V3_1_1) else { return };
            let code = if connect.version == Version::V5 {
                reason::SERVER_UNAVAILABLE
            } else {
                reason::v3::SERVER_UNAVAILABLE
            };
            let mut reply = Vec::new();
            let connack = Connack { session_present: false, code, properties: Properties::default() };
            packet::encode(&Packet::Connack(connack), connect.version, &mut reply);
            reply
        }
        Handed::Tls | Handed::Wss => alert_record(rustls::AlertDescription::InternalError).to_vec(),
        Handed::Ws => handshake::unavailable_response(),
    };
    drop(first_bytes);
    tokio::spawn(async move {
        let _ = client.write_all(&reply).await;
        let _ = client.shutdown().await;
    });
}

/// Removes failed tenant `name`'s files (its settings, its state).
pub fn remove_files(state_dir: &Path, name: &str) {
    for file in tenant::files(state_dir, name) {
        let _ = std::fs::remove_file(file);
    }
    super::users::remove_files(state_dir, name);
}

/// Tries failed tenant `name` again: its settings read and checked anew,
/// its own port (returned, when it has one) and its files and group. It is
/// served from then on; else it stays failed, for the reason returned.
pub async fn start(
    name: &str,
    failed: &mut BTreeMap<String, FailedTenant>,
    defaults: &TenantTable,
    state_dir: &Path,
    directory: &Directory,
) -> Result<(Tenant, Option<TcpListener>), String> {
    let Some(entry) = failed.get_mut(name) else { return Err(format!("no tenant {name:?}")) };
    let started = match entry.config(defaults) {
        Err(reason) => Err(reason),
        Ok(config) => {
            let listener = match config.listen {
                None => Ok(None),
                Some(addr) => {
                    TcpListener::bind(addr).await.map(Some).map_err(|e| format!("cannot listen on {addr}: {e}"))
                }
            };
            listener.and_then(|listener| {
                let tenant = Tenant::new(name, config, state_dir)?;
                if let Err(reason) = directory.enter(name, tenant.config()) {
                    tokio::spawn(tenant.release_group());
                    return Err(reason);
                }
                Ok((tenant, listener))
            })
        }
    };
    match started {
        Ok(started) => {
            failed.remove(name);
            tracing::info!(tenant = %name, "its settings can be used again: served");
            Ok(started)
        }
        Err(reason) => {
            let prefix = format!("tenant {name}: ");
            let error = if reason.starts_with(&prefix) { reason.clone() } else { prefix + &reason };
            entry.reason = reason;
            log(name, entry);
            Err(error)
        }
    }
}
