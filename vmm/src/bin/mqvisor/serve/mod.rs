//! `mqvisor serve`: many tenants on one host behind one port. Each tenant is
//! a VM in its own process, booted on its first client; clients reach it on
//! the shared port by CONNECT user name `TENANT:USER`, on the tenant's own
//! port without a prefix, and on the shared TLS and WebSocket ports by the
//! host name they asked for (`NAME.<tls_domain>`, or the tenant's own
//! `tls_names`).
//!
//! Owns the listeners, the routing tasks and the tenants' table. The front
//! ([`front`]) decides where a client goes, by the [`directory`]; the
//! tenant ([`tenant`]) owns its process. Nothing here reads a client's
//! traffic past its CONNECT (or its ClientHello, or its upgrade request):
//! the client's socket itself is handed to the tenant's process, which
//! alone holds the tenant's TLS key.

pub mod client;
pub mod cluster;
pub mod config;
pub mod control;
pub mod directory;
pub mod etcd;
pub mod failed;
pub mod front;
pub mod proxy_header;
pub mod relay;
pub mod spare;
pub mod standby;
pub mod tenant;
pub mod usage;
pub mod users;
pub mod users_client;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};

use config::{Again, FailedTenant, ServeConfig, TenantConfig, TenantTable, valid_tenant_name};
use control::Command;
use directory::Directory;
use front::{Expect, FirstBytes, Pending, Route};
use mqvisor::net::ingress::Handed;
use tenant::{Exited, Tenant};

/// A client the front has routed.
struct Routed {
    tenant: String,
    client: TcpStream,
    first_bytes: FirstBytes,
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
    // Clients wait here for their CONNECT before their tenant takes them:
    // as many as half the descriptors, and no more than MAX_PENDING_CLIENTS.
    let descriptors = usize::try_from(crate::fd_limit::raise()).unwrap_or(usize::MAX);
    let pending = Pending::new((descriptors / 2).clamp(16, front::MAX_PENDING_CLIENTS));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(ServeError::Runtime)?;
    runtime.block_on(run(config, exe.to_path_buf(), pending))
}

/// Tenants added or removed while serving, kept in `state_dir` so that a
/// restarted daemon has the same tenants.
struct Changes {
    /// `NAME.toml`: the table of a tenant added while serving.
    added: PathBuf,
    /// `NAME`: a marker for a tenant of the file removed while serving.
    removed: PathBuf,
}

impl Changes {
    fn new(state_dir: &Path) -> std::io::Result<Changes> {
        let changes = Changes { added: state_dir.join("added"), removed: state_dir.join("removed") };
        std::fs::create_dir_all(&changes.added)?;
        std::fs::create_dir_all(&changes.removed)?;
        Ok(changes)
    }

    /// The file's tenants with the changes made while serving applied; an
    /// added tenant whose settings fail is failed, as one of the file.
    fn apply(
        &self,
        tenants: &mut BTreeMap<String, TenantConfig>,
        failed: &mut BTreeMap<String, FailedTenant>,
        defaults: &TenantTable,
    ) -> Result<(), String> {
        for entry in std::fs::read_dir(&self.removed).map_err(|e| e.to_string())?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            tenants.remove(&name);
            failed.remove(&name);
        }
        for entry in std::fs::read_dir(&self.added).map_err(|e| e.to_string())?.flatten() {
            let path = entry.path();
            let Some(name) = path.file_stem().map(|n| n.to_string_lossy().into_owned()) else { continue };
            if !valid_tenant_name(&name) {
                tracing::warn!(file = %path.display(), "not a tenant's name: ignored");
                continue;
            }
            let in_file = |e: String| format!("{}: {e}", path.display());
            let table = std::fs::read_to_string(&path)
                .map_err(|e| in_file(e.to_string()))
                .and_then(|text| toml::from_str::<toml::Table>(&text).map_err(|e| in_file(e.message().to_string())));
            tenants.remove(&name);
            failed.remove(&name);
            let (reason, again) = match table {
                Err(reason) => (reason, Again::Never),
                Ok(table) => match defaults.tenant(table.clone(), &self.added) {
                    Ok(tenant) => {
                        tenants.insert(name, tenant);
                        continue;
                    }
                    Err(e) => (in_file(e), Again::Read(table, self.added.clone())),
                },
            };
            failed.insert(name, FailedTenant { reason, again });
        }
        Ok(())
    }

    fn add(&self, name: &str, table: &str) -> std::io::Result<()> {
        let _ = std::fs::remove_file(self.removed.join(name));
        std::fs::write(self.added.join(format!("{name}.toml")), table)
    }

    fn remove(&self, name: &str) -> std::io::Result<()> {
        let _ = std::fs::remove_file(self.added.join(format!("{name}.toml")));
        std::fs::write(self.removed.join(name), "")
    }
}

async fn run(mut config: ServeConfig, exe: PathBuf, pending: Pending) -> Result<(), ServeError> {
    let state_error = |source| ServeError::State { path: config.state_dir.clone(), source };
    std::fs::create_dir_all(&config.state_dir).map_err(state_error)?;
    let changes = Changes::new(&config.state_dir).map_err(state_error)?;
    let usage_writer = usage::Writer::start(&config.state_dir).map_err(state_error)?;
    // Tenants whose settings fail are not served; the others are.
    let mut failed = std::mem::take(&mut config.failed);
    if config.cluster.is_none() {
        changes
            .apply(&mut config.tenants, &mut failed, &config.defaults)
            .map_err(|e| ServeError::State { path: config.state_dir.clone(), source: std::io::Error::other(e) })?;
    }
    let mut tenants = BTreeMap::new();
    for (name, tenant) in &config.tenants {
        match Tenant::new(name, tenant.clone(), &config.state_dir) {
            Ok(started) => {
                tenants.insert(name.clone(), started);
            }
            Err(reason) => {
                failed.insert(name.clone(), FailedTenant { reason, again: Again::Start(Box::new(tenant.clone())) });
            }
        }
    }
    let (routed_tx, mut routed) = mpsc::unbounded_channel::<Routed>();
    let directory = Directory::new(config.tls_domain.clone());
    // A host name two tenants of the file claim is neither's: which one the
    // operator meant is not for the order of their names to decide.
    let mut claims: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (name, tenant) in &tenants {
        for host in &tenant.config().tls_names {
            claims.entry(host.as_str()).or_default().push(name.as_str());
        }
    }
    let disputed: BTreeMap<String, String> = claims
        .into_iter()
        .filter(|(_, claimants)| claimants.len() > 1)
        .flat_map(|(host, claimants)| {
            let reason = format!("tls_names: {host} is claimed by tenants {}: give it to one", claimants.join(", "));
            claimants.into_iter().map(move |name| (name.to_string(), reason.clone()))
        })
        .collect();
    for (name, tenant) in std::mem::take(&mut tenants) {
        let entered = match disputed.get(&name) {
            Some(reason) => Err(reason.clone()),
            None => directory.enter(&name, tenant.config()),
        };
        match entered {
            Ok(()) => {
                tenants.insert(name, tenant);
            }
            Err(reason) => {
                let again = Again::Start(Box::new(tenant.config().clone()));
                tokio::spawn(tenant.release_group());
                failed.insert(name, FailedTenant { reason, again });
            }
        }
    }
    for name in failed.keys() {
        // Known, so that its clients are told it is unavailable.
        let _ = directory.insert(name, directory::Reach::Plain, &[]);
    }
    let (commands_tx, mut commands) = mpsc::unbounded_channel::<Command>();
    control::serve_control(config.control_socket.clone(), commands_tx.clone())
        .await
        .map_err(|source| ServeError::State { path: config.control_socket.clone(), source })?;
    tracing::info!(socket = %config.control_socket.display(), "control API");
    if let Some(addr) = config.metrics_listen {
        let listener = TcpListener::bind(addr).await.map_err(|source| ServeError::Listen { addr, source })?;
        tracing::info!(listen = %addr, "metrics");
        control::serve_metrics(listener, commands_tx.clone());
    }
    let bind =
        |addr| async move { TcpListener::bind(addr).await.map_err(|source| ServeError::Listen { addr, source }) };
    let shared = bind(config.listen).await?;
    tracing::info!(listen = %shared.local_addr().map_err(ServeError::Runtime)?, tenants = tenants.len(), "serving");
    eprintln!("mqvisor: serve listening on {}", shared.local_addr().map_err(ServeError::Runtime)?);
    // The first cold tenant then starts without waiting for a process.
    spare::keep_spare(&exe);
    // A fleet on etcd: the lease's keeper and the fleet's loop, and the
    // relay port other nodes send this node's tenants' clients to.
    let (to_daemon_tx, mut to_daemon) = mpsc::unbounded_channel::<cluster::ToDaemon>();
    let (lease_tx, lease) = watch::channel::<Option<i64>>(None);
    let mut fleet: Option<mpsc::UnboundedSender<cluster::Request>> = None;
    let mut fleet_etcd: Option<etcd::Etcd> = None;
    let steering = config.cluster.as_ref().map(|_| cluster::Steering::default());
    if let (Some(cluster_config), Some(steering)) = (&config.cluster, &steering) {
        let etcd = etcd::Etcd::new(&cluster_config.etcd).map_err(|e| {
            ServeError::Config(config::ServeConfigError::Syntax { path: "[cluster]".into(), message: e })
        })?;
        let (requests_tx, requests) = mpsc::unbounded_channel();
        let etcd_for_stop = etcd.clone();
        tokio::spawn(cluster::keep_lease(etcd.clone(), cluster_config.clone(), lease_tx, to_daemon_tx.clone()));
        tokio::spawn(cluster::sync(
            etcd,
            cluster_config.clone(),
            config.defaults.clone(),
            config.state_dir.clone(),
            lease.clone(),
            to_daemon_tx.clone(),
            requests,
            steering.clone(),
            directory.clone(),
        ));
        standby::keep_copies_in(&config.state_dir);
        let relay = bind(cluster_config.relay_listen).await?;
        tracing::info!(node = %cluster_config.node, relay = %cluster_config.relay_listen, "fleet node");
        tokio::spawn(accept_loop(relay, Port::Relay, directory.clone(), routed_tx.clone(), pending.clone(), None));
        fleet = Some(requests_tx);
        fleet_etcd = Some(etcd_for_stop);
    }
    let accept = |listener, port| {
        tokio::spawn(accept_loop(
            listener,
            port,
            directory.clone(),
            routed_tx.clone(),
            pending.clone(),
            steering.clone(),
        ))
    };
    accept(shared, Port::Mqtt(None));
    for (addr, port, what) in [
        (config.listen_tls, Port::Tls, "MQTT over TLS"),
        (config.listen_ws, Port::Ws, "MQTT over WebSockets"),
        (config.listen_wss, Port::Wss, "MQTT over secure WebSockets"),
    ] {
        let Some(addr) = addr else { continue };
        let listener = bind(addr).await?;
        let local = listener.local_addr().map_err(ServeError::Runtime)?;
        tracing::info!(listen = %local, "{what}");
        eprintln!("mqvisor: serve listening for {what} on {local}");
        accept(listener, port);
    }
    for (name, tenant) in &config.tenants {
        let Some(addr) = tenant.listen.filter(|_| tenants.contains_key(name)) else { continue };
        match TcpListener::bind(addr).await {
            Ok(own) => {
                tracing::info!(tenant = %name, listen = %addr, "tenant port");
                accept(own, Port::Mqtt(Some(name.clone())));
            }
            Err(e) => {
                if let Some(unserved) = tenants.remove(name) {
                    tokio::spawn(unserved.release_group());
                }
                let reason = format!("cannot listen on {addr}: {e}");
                failed.insert(name.clone(), FailedTenant { reason, again: Again::Start(Box::new(tenant.clone())) });
            }
        }
    }
    for (name, tenant) in &failed {
        failed::log(name, tenant);
    }
    let (exited_tx, mut exited) = mpsc::unbounded_channel::<Exited>();
    let mut terminate = signal(SignalKind::terminate()).map_err(ServeError::Runtime)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(ServeError::Runtime)?;
    let mut hangup = signal(SignalKind::hangup()).map_err(ServeError::Runtime)?;
    let mut idle_check = tokio::time::interval(Duration::from_secs(1));
    let mut usage_save = tokio::time::interval(usage::SAVE_EVERY);
    loop {
        let next_restart = tenants.values().filter_map(|t| t.restart_at).min();
        let restart_delay = next_restart.map(|t| t.saturating_duration_since(std::time::Instant::now()));
        tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = hangup.recv() => {
                tracing::info!("SIGHUP: every running tenant reads its TLS files again");
                for tenant in tenants.values() {
                    tenant.reload_tls();
                }
            }
            _ = idle_check.tick() => {
                for tenant in tenants.values_mut() {
                    tenant.stop_if_idle();
                }
                spare::check(&exe);
            }
            _ = usage_save.tick() => save_usage(&tenants, &usage_writer),
            Some(r) = routed.recv() => {
                if let Some(tenant) = tenants.get_mut(&r.tenant) {
                    tenant.hand(r.client, r.first_bytes, &exe, &exited_tx);
                } else if failed.contains_key(&r.tenant) || fleet.is_some() {
                    // In a fleet: not run here (yet, or any more).
                    failed::refuse(r.client, r.first_bytes);
                }
            }
            Some(e) = exited.recv() => {
                if let Some(tenant) = tenants.get_mut(&e.tenant) {
                    tenant.on_exit(e.pid, &e.status, &exe, &exited_tx);
                }
            }
            Some(message) = to_daemon.recv() => match message {
                cluster::ToDaemon::Own { name, table, lease: owned_under, state, standby, reply } => {
                    let owned = if *lease.borrow() != Some(owned_under) {
                        Err("the lease it was claimed under is gone".to_string())
                    } else {
                        let [_, state_file] = tenant::files(&config.state_dir, &name);
                        if state != cluster::StateFrom::Kept {
                            // Another node ran it since this one last did:
                            // what is here is not its state now.
                            let _ = std::fs::rename(&state_file, state_file.with_extension("state.previous"));
                        }
                        let copied = match state {
                            cluster::StateFrom::Copy(epoch) => {
                                standby::take(&config.state_dir, &name, epoch, &state_file)
                                    .map_err(|e| format!("cannot take the standby copy: {e}"))
                            }
                            _ => Ok(()),
                        };
                        directory.remove(&name);
                        let base = config.state_dir.clone();
                        copied
                            .and_then(|()| add_tenant(&mut tenants, &name, &table, &config, None, &base, &directory))
                            .and_then(|()| match tenants.get_mut(&name) {
                                Some(tenant) => {
                                    let mirrored = standby.is_some() && tenant.mirrored();
                                    tenant.set_standby(standby)?;
                                    // Its state reaches its standby now, not
                                    // on its first client: its owner may go
                                    // before any client comes.
                                    if mirrored {
                                        tenant.boot_now(&exe, &exited_tx);
                                    }
                                    Ok(())
                                }
                                None => Ok(()),
                            })
                    };
                    if matches!(state, cluster::StateFrom::Copy(_)) && owned.is_ok() {
                        tracing::info!(tenant = %name, "taken over from its standby copy here");
                    }
                    if owned.is_err() {
                        let _ = directory.insert(&name, directory::Reach::Plain, &[]);
                    }
                    let _ = reply.send(owned);
                }
                cluster::ToDaemon::Standby { name, target, connection } => {
                    if let Some(tenant) = tenants.get_mut(&name) {
                        if let Err(e) = tenant.set_standby(Some(target)) {
                            tracing::warn!(tenant = %name, "{e}");
                        }
                        if !tenant.offer_standby(connection) && tenant.mirrored() {
                            // No process to hand it to: one boots, and sends
                            // its state to that standby itself.
                            tenant.boot_now(&exe, &exited_tx);
                        }
                    }
                }
                cluster::ToDaemon::Disown { name, removed } => {
                    if let Some(mut tenant) = tenants.remove(&name) {
                        if removed {
                            let _ = usage_writer.retire(&name, tenant.usage_record()).await;
                            tenant.remove();
                        } else {
                            tenant.stop();
                            tokio::spawn(tenant.release_group());
                        }
                        directory.remove(&name);
                        if !removed {
                            let _ = directory.insert(&name, directory::Reach::Plain, &[]);
                        }
                        tracing::info!(tenant = %name, "no longer run here");
                    }
                }
                cluster::ToDaemon::Fence => {
                    for (name, mut tenant) in std::mem::take(&mut tenants) {
                        tenant.kill();
                        tokio::spawn(tenant.release_group());
                        directory.remove(&name);
                        let _ = directory.insert(&name, directory::Reach::Plain, &[]);
                    }
                }
            },
            Some(command) = commands.recv() => match (command, &fleet) {
                (command, Some(requests)) => fleet_command(command, requests, &mut tenants, &exe, &exited_tx),
                (Command::List(reply), None) => {
                    let mut views: Vec<_> = tenants.values().map(Tenant::view).collect();
                    views.extend(failed.iter().map(|(name, f)| control::TenantView {
                        usage: usage::peek(&config.state_dir, name),
                        ..control::TenantView::failed(name, &f.reason)
                    }));
                    views.sort_by(|a, b| a.name.cmp(&b.name));
                    let _ = reply.send(views);
                }
                (Command::Add { name, table, reply }, None) => {
                    let added = if failed.contains_key(&name) {
                        Err(format!("tenant {name:?} exists"))
                    } else {
                        add_tenant(&mut tenants, &name, &table, &config, Some(&changes), &changes.added, &directory)
                    };
                    let _ = reply.send(added);
                }
                (Command::Remove { name, reply }, None) => {
                    let removed = match tenants.remove(&name) {
                        None if failed.remove(&name).is_some() => {
                            failed::remove_files(&config.state_dir, &name);
                            let _ = usage_writer.retire(&name, None).await;
                            directory.remove(&name);
                            tracing::info!(tenant = %name, "removed");
                            changes.remove(&name).map_err(|e| format!("keeping the removal: {e}"))
                        }
                        None => Err(format!("no tenant {name:?}")),
                        Some(tenant) => {
                            let _ = usage_writer.retire(&name, tenant.usage_record()).await;
                            tenant.remove();
                            directory.remove(&name);
                            tracing::info!(tenant = %name, "removed");
                            changes.remove(&name).map_err(|e| format!("keeping the removal: {e}"))
                        }
                    };
                    let _ = reply.send(removed);
                }
                (Command::Node { reply, .. }, None) => {
                    let _ = reply.send(Err("this daemon is not a node of a fleet (no [cluster] in its configuration)".into()));
                }
                (Command::Auth { name, request, reply }, None) => {
                    // A failed tenant has no settings to check a change against.
                    let answer = match tenants.get_mut(&name) {
                        None if failed.contains_key(&name) => Err(users::Refused {
                            status: 409,
                            message: format!("tenant {name} is failed: fix its settings (tenant restart) first"),
                        }),
                        tenant => users::handle(tenant, &name, &config.state_dir, request),
                    };
                    let _ = reply.send(answer);
                }
                (Command::Restart { name, reply }, None) => {
                    let restarted = match tenants.get_mut(&name) {
                        None if failed.contains_key(&name) => {
                            match failed::start(&name, &mut failed, &config.defaults, &config.state_dir, &directory).await {
                                Ok((tenant, own)) => {
                                    if let Some(own) = own {
                                        accept(own, Port::Mqtt(Some(name.clone())));
                                    }
                                    tenants.insert(name, tenant);
                                    Ok(())
                                }
                                Err(reason) => Err(reason),
                            }
                        }
                        None => Err(format!("no tenant {name:?}")),
                        Some(tenant) => tenant.restart(&exe, &exited_tx).map_err(|e| e.to_string()),
                    };
                    let _ = reply.send(restarted);
                }
            },
            () = mqvisor::net::paced::sleep_or_forever(restart_delay) => {
                for tenant in tenants.values_mut() {
                    tenant.restart_if_due(&exe, &exited_tx);
                }
            }
        }
    }
    let _ = std::fs::remove_file(&config.control_socket);
    tracing::info!("stopping every tenant");
    for tenant in tenants.values_mut() {
        tenant.stop();
    }
    spare::discard().await;
    // Let the tenants close their clients cleanly before the daemon goes
    // (their processes die with it otherwise).
    tokio::time::sleep(Duration::from_millis(200)).await;
    usage::stopping();
    save_usage(&tenants, &usage_writer);
    usage_writer.finish();
    let releases: Vec<_> = tenants.into_values().map(|t| tokio::spawn(t.release_group())).collect();
    for release in releases {
        let _ = release.await;
    }
    // A fleet node's tenants are stopped: its lease goes now, so that the
    // others take them at once, not a TTL from now.
    let held = *lease.borrow();
    if let (Some(etcd), Some(id)) = (&fleet_etcd, held) {
        let _ = tokio::time::timeout(Duration::from_secs(1), etcd.revoke(id)).await;
    }
    Ok(())
}

/// A control API request in a fleet: tenants are added, removed and listed
/// in etcd by the fleet's loop; a restart is for the node that runs it.
fn fleet_command(
    command: Command,
    requests: &mpsc::UnboundedSender<cluster::Request>,
    tenants: &mut BTreeMap<String, Tenant>,
    exe: &Path,
    exited_tx: &mpsc::UnboundedSender<Exited>,
) {
    match command {
        Command::List(reply) => {
            let views: Vec<_> = tenants.values().map(Tenant::view).collect();
            let _ = requests.send(cluster::Request::List { local: views, reply });
        }
        Command::Add { name, table, reply } => {
            let _ = requests.send(cluster::Request::Add { name, table, reply });
        }
        Command::Remove { name, reply } => {
            let _ = requests.send(cluster::Request::Remove { name, reply });
        }
        Command::Node { request, reply } => {
            let _ = requests.send(cluster::Request::Node { request, reply });
        }
        Command::Auth { reply, .. } => {
            let _ = reply.send(Err(users::Refused {
                status: 409,
                message: "users and ACLs through the control API are not available in a fleet yet: \
                          use password_file and acl_file in the tenant's table"
                    .into(),
            }));
        }
        Command::Restart { name, reply } => {
            let restarted = match tenants.get_mut(&name) {
                Some(tenant) => tenant.restart(exe, exited_tx).map_err(|e| e.to_string()),
                None => Err(format!("no tenant {name:?} runs on this node: ask its node")),
            };
            let _ = reply.send(restarted);
        }
    }
}

/// Has every tenant's usage that changed written (`usage::SAVE_EVERY`, and
/// at a clean stop).
fn save_usage(tenants: &BTreeMap<String, Tenant>, writer: &usage::Writer) {
    for (name, tenant) in tenants {
        if let Some(record) = tenant.usage_changes() {
            writer.save(name, record);
        }
    }
}

/// Adds tenant `name` from its TOML `table` while serving, and keeps it.
fn add_tenant(
    tenants: &mut BTreeMap<String, Tenant>,
    name: &str,
    table: &str,
    config: &ServeConfig,
    changes: Option<&Changes>,
    base: &Path,
    directory: &Directory,
) -> Result<(), String> {
    if !valid_tenant_name(name) {
        return Err(format!("tenant name {name:?}: use 1 to 64 of a-z, 0-9, '-' and '_'"));
    }
    if tenants.contains_key(name) {
        return Err(format!("tenant {name:?} exists"));
    }
    let parsed: toml::Table = toml::from_str(table).map_err(|e| format!("tenant {name}: {}", e.message()))?;
    let tenant_config = config.defaults.added(parsed, base).map_err(|e| format!("tenant {name}: {e}"))?;
    if tenant_config.listen.is_some() {
        return Err(format!("tenant {name}: a port of its own can only be set in the configuration file"));
    }
    let tenant = Tenant::new(name, tenant_config, &config.state_dir)?;
    let kept =
        directory.enter(name, tenant.config()).map_err(|e| format!("tenant {name}: {e}")).and_then(
            |()| match changes {
                // In a fleet, etcd keeps it.
                None => Ok(()),
                Some(changes) => changes.add(name, table).map_err(|e| format!("keeping the tenant: {e}")),
            },
        );
    if let Err(e) = kept {
        directory.remove(name);
        tokio::spawn(tenant.release_group());
        return Err(e);
    }
    tenants.insert(name.to_string(), tenant);
    tracing::info!(tenant = %name, "added");
    Ok(())
}

/// What a port's clients speak, and so how the front routes them.
#[derive(Clone)]
enum Port {
    /// Plain MQTT: by the CONNECT's `TENANT:` prefix, or a tenant's own port.
    Mqtt(Option<String>),
    /// MQTT over TLS: by SNI.
    Tls,
    /// MQTT over WebSockets: by `Host`.
    Ws,
    /// MQTT over secure WebSockets: by SNI.
    Wss,
    /// A fleet's relay port: plain MQTT from another node, after a PROXY
    /// protocol v2 header; routed to a tenant run here, never onwards.
    Relay,
}

/// Accepts clients on one port and routes each from its own task, so a slow
/// or silent client never holds up another.
async fn accept_loop(
    listener: TcpListener,
    port: Port,
    directory: Directory,
    routed: mpsc::UnboundedSender<Routed>,
    pending: Pending,
    steering: Option<cluster::Steering>,
) {
    loop {
        let Ok((mut client, _)) = listener.accept().await else {
            // Out of descriptors, most likely: let some close.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let (mut port, directory, routed, waiting) = (port.clone(), directory.clone(), routed.clone(), pending.clone());
        let steering = steering.clone();
        let id = pending.admit();
        // Runs only once this loop awaits again (one thread), after `started`.
        let task = tokio::spawn(async move {
            let _ = client.set_nodelay(true);
            if matches!(port, Port::Relay) {
                // Relayed by another node: routed as this node's port for
                // what the client speaks would (the accept loop of the
                // relay port has no steering: never relayed again).
                let handed = match relay::read_header(&mut client, front::FIRST_PACKET_DEADLINE).await {
                    Some(relay::Relayed::Client(Some(byte))) => Handed::from_byte(byte),
                    Some(relay::Relayed::Client(None)) => Some(Handed::Mqtt),
                    Some(relay::Relayed::Replica(of)) => {
                        waiting.done(id);
                        standby::accept(client, of);
                        return;
                    }
                    None => None,
                };
                port = match handed {
                    Some(Handed::Mqtt) => Port::Relay,
                    Some(Handed::Tls) => Port::Tls,
                    Some(Handed::Ws) => Port::Ws,
                    Some(Handed::Wss) => Port::Wss,
                    None => {
                        waiting.done(id);
                        return;
                    }
                };
            }
            let expect = match port {
                Port::Mqtt(_) | Port::Relay => Expect::Connect,
                Port::Tls => Expect::ClientHello { ws: false },
                Port::Wss => Expect::ClientHello { ws: true },
                Port::Ws => Expect::Upgrade,
            };
            let first = front::read_first(&mut client, expect).await;
            waiting.done(id);
            let Some(mut bytes) = first else { return };
            // In a fleet, where a tenant owned by another node is relayed.
            let owner = |tenant: &str| match steering.as_ref().and_then(|s| s.place(tenant)) {
                Some(cluster::Place::There(owner)) => Some(owner),
                _ => None,
            };
            // Decided once for a CONNECT, whose rewriting depends on it.
            let mut decided: Option<Option<std::net::SocketAddr>> = None;
            let tenant = match &port {
                Port::Mqtt(_) | Port::Relay => {
                    let own = if let Port::Mqtt(own) = &port { own.as_deref() } else { None };
                    match front::route(&bytes, own, |t| directory.has(t)) {
                        Route::Tenant { tenant, first_bytes } => {
                            // A tenant owned elsewhere gets the CONNECT as
                            // the client sent it (relayed below).
                            let to = owner(&tenant);
                            if to.is_none() {
                                bytes.replace(first_bytes);
                            }
                            decided = Some(to);
                            Ok(tenant)
                        }
                        Route::Refuse { reply } => Err(reply),
                        Route::Drop => {
                            front::dropped_not_mqtt();
                            return;
                        }
                    }
                }
                Port::Tls | Port::Wss => front::route_hello(&bytes, &directory),
                Port::Ws => front::route_upgrade(&bytes, &directory),
            };
            match tenant {
                Ok(tenant) => {
                    if let Some(owner) = decided.unwrap_or_else(|| owner(&tenant)) {
                        relay::relay(client, bytes, owner).await;
                        return;
                    }
                    let _ = routed.send(Routed { tenant, client, first_bytes: bytes });
                }
                Err(reply) => front::answer(&mut client, &reply).await,
            }
        });
        pending.started(id, task.abort_handle());
    }
}
