//! `mqvisor serve`: many tenants on one host behind one port. Each tenant is
//! a VM in its own process, booted on its first client; clients reach it on
//! the shared port by CONNECT user name `TENANT:USER`, or on the tenant's
//! own port without a prefix.
//!
//! Owns the listeners, the routing tasks and the tenants' table. The front
//! ([`front`]) decides where a client goes; the tenant ([`tenant`]) owns its
//! process. Nothing here reads a client's traffic past its CONNECT: the
//! client's socket itself is handed to the tenant's process.

pub mod config;
pub mod front;
pub mod tenant;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use config::ServeConfig;
use front::Route;
use tenant::{Exited, Tenant};

/// A client the front has routed.
struct Routed {
    tenant: String,
    client: TcpStream,
    first_bytes: Vec<u8>,
}

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Config(#[from] config::ServeConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("state directory {path}: {source}")]
    State { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Runtime(std::io::Error),
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn serve(config_path: &Path, exe: &Path) -> Result<(), ServeError> {
    let config = ServeConfig::load(config_path)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(ServeError::Runtime)?;
    runtime.block_on(run(config, exe.to_path_buf()))
}

async fn run(config: ServeConfig, exe: PathBuf) -> Result<(), ServeError> {
    let state_error = |source| ServeError::State { path: config.state_dir.clone(), source };
    let mut tenants = BTreeMap::new();
    for (name, tenant) in &config.tenants {
        tenants.insert(name.clone(), Tenant::new(name, tenant.clone(), &config.state_dir).map_err(state_error)?);
    }
    let (routed_tx, mut routed) = mpsc::unbounded_channel::<Routed>();
    let names: std::sync::Arc<Vec<String>> = std::sync::Arc::new(config.tenants.keys().cloned().collect());
    let bind =
        |addr| async move { TcpListener::bind(addr).await.map_err(|source| ServeError::Listen { addr, source }) };
    let shared = bind(config.listen).await?;
    tracing::info!(listen = %shared.local_addr().map_err(ServeError::Runtime)?, tenants = tenants.len(), "serving");
    eprintln!("mqvisor: serve listening on {}", shared.local_addr().map_err(ServeError::Runtime)?);
    tokio::spawn(accept_loop(shared, None, names.clone(), routed_tx.clone()));
    for (name, tenant) in &config.tenants {
        if let Some(addr) = tenant.listen {
            let own = bind(addr).await?;
            tracing::info!(tenant = %name, listen = %addr, "tenant port");
            tokio::spawn(accept_loop(own, Some(name.clone()), names.clone(), routed_tx.clone()));
        }
    }
    let (exited_tx, mut exited) = mpsc::unbounded_channel::<Exited>();
    let mut terminate = signal(SignalKind::terminate()).map_err(ServeError::Runtime)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(ServeError::Runtime)?;
    loop {
        let next_restart = tenants.values().filter_map(|t| t.restart_at).min();
        let restart_delay = next_restart.map(|t| t.saturating_duration_since(std::time::Instant::now()));
        tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            Some(r) = routed.recv() => {
                if let Some(tenant) = tenants.get_mut(&r.tenant) {
                    tenant.hand(r.client, r.first_bytes, &exe, &exited_tx);
                }
            }
            Some(e) = exited.recv() => {
                if let Some(tenant) = tenants.get_mut(&e.tenant) {
                    tenant.on_exit(e.pid, &e.status);
                }
            }
            () = mqvisor::net::paced::sleep_or_forever(restart_delay) => {
                for tenant in tenants.values_mut() {
                    tenant.restart_if_due(&exe, &exited_tx);
                }
            }
        }
    }
    tracing::info!("stopping every tenant");
    for tenant in tenants.values_mut() {
        tenant.stop();
    }
    // Let the tenants close their clients cleanly before the daemon goes
    // (their processes die with it otherwise).
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

/// Accepts clients on one port and routes each from its own task, so a slow
/// or silent client never holds up another.
async fn accept_loop(
    listener: TcpListener,
    tenant: Option<String>,
    names: std::sync::Arc<Vec<String>>,
    routed: mpsc::UnboundedSender<Routed>,
) {
    loop {
        let Ok((mut client, _)) = listener.accept().await else {
            // Out of descriptors, most likely: let some close.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let (tenant, names, routed) = (tenant.clone(), names.clone(), routed.clone());
        tokio::spawn(async move {
            let _ = client.set_nodelay(true);
            let Some(bytes) = front::read_first_packet(&mut client).await else { return };
            match front::route(&bytes, tenant.as_deref(), |t| names.iter().any(|n| n == t)) {
                Route::Tenant { tenant, first_bytes } => {
                    let _ = routed.send(Routed { tenant, client, first_bytes });
                }
                Route::Refuse { reply } => {
                    use tokio::io::AsyncWriteExt;
                    let _ = client.write_all(&reply).await;
                    let _ = client.shutdown().await;
                }
                Route::Drop => {}
            }
        });
    }
}
