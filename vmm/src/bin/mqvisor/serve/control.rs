//! The daemon's control plane: HTTP/JSON on a unix socket (as Firecracker's
//! API is) and `/metrics` in the Prometheus text format on a TCP address.
//! The socket's client, `mqvisor tenant ...`, is [`super::client`].
//!
//! Owns the HTTP surface and its wording. Every request becomes a
//! [`Command`] for the daemon's loop, which owns the tenants; nothing here
//! touches a tenant directly.
//!
//! | request | answer |
//! |---|---|
//! | `GET /tenants` | JSON array of tenants |
//! | `GET /tenants/NAME` | one tenant |
//! | `PUT /tenants/NAME` (body: its TOML table) | add it (kept in `state_dir`) |
//! | `DELETE /tenants/NAME` | stop and remove it (kept in `state_dir`) |
//! | `POST /tenants/NAME/restart` | restart its VM |
//! | `GET /tenants/NAME/users` | JSON array of its user names (never their hashes) |
//! | `PUT /tenants/NAME/users/USER` (body: `{"password": "..."}`) | add the user or set their password, live |
//! | `DELETE /tenants/NAME/users/USER` | remove the user; their connections end, live |
//! | `GET /tenants/NAME/acl` | its ACL, Mosquitto's text |
//! | `PUT /tenants/NAME/acl` (body: the ACL text) | replace its ACL, live |
//! | `DELETE /tenants/NAME/acl` | no ACL: every topic open, live |
//!
//! | `GET /nodes` | a fleet's live nodes (`[cluster]` only) |
//! | `POST /nodes/NODE/drain` | move NODE's tenants away, place none there |
//! | `DELETE /nodes/NODE/drain` | place tenants on NODE again |
//!
//! Users and ACL requests are [`super::users`]'s to answer.
//! | `GET /tenants/NAME/usage` | what it used, for billing ([`super::usage`]) |

use std::convert::Infallible;
use std::path::PathBuf;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, oneshot};

use mqvisor::net::metrics::{Counters, Kind};

use super::cluster::FleetStats;
use super::config::{ServeConfigError, valid_tenant_name};
use super::front::FrontStats;
use super::usage::Usage;
use super::users;

/// Largest request body (a tenant's TOML table).
const MAX_BODY: usize = 64 * 1024;
/// What `/metrics` is: OpenMetrics text, which ends in `# EOF` (Prometheus 3
/// refuses a scrape whose format is not named).
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The Prometheus text format, which has no `# EOF`.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// One tenant as the control plane shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct TenantView {
    pub name: String,
    /// `stopped`, `running`, `crashed`, or `failed`: its settings could not
    /// be used at start (see `error`), so it is not served.
    pub state: String,
    /// Why a failed tenant failed.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    pub pid: Option<u32>,
    pub boots: u64,
    pub crashes: u64,
    pub restarts: u64,
    pub memory_mib: u32,
    /// What its VM last reported counting (`mqvisor::net::metrics`),
    /// each counter a field of its own.
    #[serde(flatten)]
    pub counters: Counters,
    /// What its guest did wrong on its link: refused descriptor chains,
    /// ring faults, bad stream frames and records.
    #[serde(default)]
    pub guest_faults: u64,
    /// CFS periods in which its CPU limit ran out (0 without one).
    #[serde(default)]
    pub cpu_throttled_periods: u64,
    /// Its processes the kernel killed at its memory limit.
    #[serde(default)]
    pub memory_limit_kills: u64,
    /// Proportional set size of its process, bytes (0 when stopped).
    pub pss_bytes: u64,
    /// Disk blocks its state file uses, bytes (0 without persistence).
    #[serde(default)]
    pub state_bytes: u64,
    /// Seconds from spawning each of its VMs to the guest's link being up.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub boot_seconds: Vec<f64>,
    /// What it used since counting began, for billing: kept across its
    /// restarts and the daemon's.
    #[serde(default)]
    pub usage: Usage,
    /// In a fleet (`[cluster]`): the node that owns it, null while none
    /// does. Absent outside a fleet.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub node: Option<Option<String>>,
}

impl TenantView {
    /// A tenant whose settings failed for `reason`: nothing runs, so every
    /// figure is zero.
    pub fn failed(name: &str, reason: &str) -> TenantView {
        TenantView {
            name: name.to_string(),
            state: "failed".into(),
            error: Some(reason.to_string()),
            pid: None,
            boots: 0,
            crashes: 0,
            restarts: 0,
            memory_mib: 0,
            counters: Counters::default(),
            guest_faults: 0,
            cpu_throttled_periods: 0,
            memory_limit_kills: 0,
            pss_bytes: 0,
            state_bytes: 0,
            boot_seconds: Vec::new(),
            usage: Usage { tenant: name.to_string(), ..Usage::default() },
            node: None,
        }
    }
}

/// What a request asks of the daemon.
pub enum Command {
    List(oneshot::Sender<Vec<TenantView>>),
    Add {
        name: String,
        table: String,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Remove {
        name: String,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Restart {
        name: String,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// A fleet's nodes: list, drain, undrain (`super::cluster`).
    Node {
        request: super::cluster::NodeRequest,
        reply: oneshot::Sender<Result<Vec<super::cluster::NodeView>, String>>,
    },
    /// A users or ACL request (`super::users`).
    Auth {
        name: String,
        request: users::Request,
        reply: oneshot::Sender<Result<users::Answer, users::Refused>>,
    },
}

fn respond(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

fn json(value: &impl Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_string_pretty(value) {
        Ok(text) => respond(StatusCode::OK, text + "\n"),
        Err(e) => respond(StatusCode::INTERNAL_SERVER_ERROR, format!("{{\"error\": \"{e}\"}}\n")),
    }
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    respond(status, serde_json::json!({ "error": message }).to_string() + "\n")
}

async fn ask<T>(
    commands: &mpsc::UnboundedSender<Command>,
    make: impl FnOnce(oneshot::Sender<T>) -> Command,
) -> Option<T> {
    let (reply, answer) = oneshot::channel();
    commands.send(make(reply)).ok()?;
    answer.await.ok()
}

/// `segment` with its `%XX` escapes decoded; `None` for a malformed escape
/// or bytes that are not UTF-8.
fn percent_decoded(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

async fn handle(request: Request<Incoming>, commands: mpsc::UnboundedSender<Command>) -> Response<Full<Bytes>> {
    // Taken as sent: a query, a trailing or doubled '/' or an escaped
    // character would make another tenant's name out of it (`victim?keep`
    // is not `victim`).
    let path = request.uri().path().to_string();
    if request.uri().query().is_some() {
        return error(StatusCode::BAD_REQUEST, &format!("no request here takes a query: {}", request.uri()));
    }
    let parts: Vec<&str> = path.split('/').skip(1).collect();
    if let ["tenants", name, ..] = parts.as_slice()
        && !valid_tenant_name(name)
    {
        return error(StatusCode::BAD_REQUEST, &ServeConfigError::TenantName((*name).to_string()).to_string());
    }
    let gone = || error(StatusCode::SERVICE_UNAVAILABLE, "the daemon is stopping");
    let done = |result: Option<Result<(), String>>, ok: StatusCode| match result {
        Some(Ok(())) => respond(ok, String::new()),
        Some(Err(e)) if e.starts_with("no tenant") => error(StatusCode::NOT_FOUND, &e),
        Some(Err(e)) => error(StatusCode::BAD_REQUEST, &e),
        None => gone(),
    };
    match (request.method().clone(), parts.as_slice()) {
        (Method::GET, ["tenants"]) => match ask(&commands, Command::List).await {
            Some(list) => json(&list),
            None => gone(),
        },
        (Method::GET, ["tenants", name]) => match ask(&commands, Command::List).await {
            Some(list) => match list.into_iter().find(|t| t.name == *name) {
                Some(tenant) => json(&tenant),
                None => error(StatusCode::NOT_FOUND, &format!("no tenant {name:?}")),
            },
            None => gone(),
        },
        (Method::GET, ["tenants", name, "usage"]) => match ask(&commands, Command::List).await {
            Some(list) => match list.into_iter().find(|t| t.name == *name) {
                Some(tenant) => json(&tenant.usage),
                None => error(StatusCode::NOT_FOUND, &format!("no tenant {name:?}")),
            },
            None => gone(),
        },
        (Method::PUT, ["tenants", name]) => {
            let name = name.to_string();
            let body = match Limited::new(request.into_body(), MAX_BODY).collect().await {
                Ok(body) => body.to_bytes(),
                Err(_) => return error(StatusCode::PAYLOAD_TOO_LARGE, "the body must be at most 64 KiB"),
            };
            let Ok(table) = String::from_utf8(body.to_vec()) else {
                return error(StatusCode::BAD_REQUEST, "the body must be UTF-8 TOML");
            };
            done(ask(&commands, |reply| Command::Add { name, table, reply }).await, StatusCode::CREATED)
        }
        (Method::DELETE, ["tenants", name]) => {
            let name = name.to_string();
            done(ask(&commands, |reply| Command::Remove { name, reply }).await, StatusCode::NO_CONTENT)
        }
        (Method::POST, ["tenants", name, "restart"]) => {
            let name = name.to_string();
            done(ask(&commands, |reply| Command::Restart { name, reply }).await, StatusCode::NO_CONTENT)
        }
        (method @ (Method::GET | Method::POST | Method::DELETE), ["nodes", rest @ ..]) => {
            use super::cluster::NodeRequest;
            let request = match (method, rest) {
                (Method::GET, []) => NodeRequest::List,
                (Method::POST, [node, "drain"]) if valid_tenant_name(node) => NodeRequest::Drain(node.to_string()),
                (Method::DELETE, [node, "drain"]) if valid_tenant_name(node) => NodeRequest::Undrain(node.to_string()),
                _ => return error(StatusCode::NOT_FOUND, &format!("no such request: {path}")),
            };
            match ask(&commands, |reply| Command::Node { request, reply }).await {
                Some(Ok(nodes)) => json(&nodes),
                Some(Err(e)) if e.starts_with("no node") => error(StatusCode::NOT_FOUND, &e),
                Some(Err(e)) => error(StatusCode::CONFLICT, &e),
                None => gone(),
            }
        }
        (method, ["tenants", name, "users" | "acl", rest @ ..]) => {
            let (name, what) = (name.to_string(), parts[2]);
            // A user name is percent-decoded (`encodeURIComponent` sends
            // `@` as `%40`); what it decodes to is checked as any user name.
            let Some(rest) = rest.iter().map(|s| percent_decoded(s)).collect::<Option<Vec<String>>>() else {
                return error(StatusCode::BAD_REQUEST, &format!("a malformed %-escape in {path}"));
            };
            auth(method, name, what, &rest, request.into_body(), &commands).await
        }
        _ => error(StatusCode::NOT_FOUND, &format!("no such request: {} {path}", request.method())),
    }
}

/// A users or ACL request (`what`: `users` or `acl`, `rest` the path after
/// it), its body bounded by what one live change carries.
async fn auth(
    method: Method,
    name: String,
    what: &str,
    rest: &[String],
    body: Incoming,
    commands: &mpsc::UnboundedSender<Command>,
) -> Response<Full<Bytes>> {
    let body = match Limited::new(body, users::MAX_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            let most = users::MAX_BODY / 1024;
            return error(StatusCode::PAYLOAD_TOO_LARGE, &format!("the body must be at most {most} KiB"));
        }
    };
    let request = match (method, what, rest) {
        (Method::GET, "users", []) => users::Request::ListUsers,
        (Method::PUT, "users", [user]) => {
            match users::check_user_name(user).and_then(|()| users::password_from_body(&body)) {
                Ok(password) => users::Request::PutUser { user: user.clone(), password },
                Err(refused) => return refused_answer(refused),
            }
        }
        (Method::DELETE, "users", [user]) => match users::check_user_name(user) {
            Ok(()) => users::Request::DeleteUser { user: user.clone() },
            Err(refused) => return refused_answer(refused),
        },
        (Method::GET, "acl", []) => users::Request::GetAcl,
        (Method::PUT, "acl", []) => match String::from_utf8(body.to_vec()) {
            Ok(text) => users::Request::PutAcl { text },
            Err(_) => return error(StatusCode::BAD_REQUEST, "the ACL must be UTF-8 text"),
        },
        (Method::DELETE, "acl", []) => users::Request::DeleteAcl,
        (method, _, _) => {
            return error(
                StatusCode::NOT_FOUND,
                &format!("no such request: {method} /tenants/{name}/{what}/{}", rest.join("/")),
            );
        }
    };
    match ask(commands, |reply| Command::Auth { name, request, reply }).await {
        Some(Ok(users::Answer::Users(names))) => json(&names),
        Some(Ok(users::Answer::Acl(text))) => respond(StatusCode::OK, text),
        Some(Ok(users::Answer::Created)) => respond(StatusCode::CREATED, String::new()),
        Some(Ok(users::Answer::Done)) => respond(StatusCode::NO_CONTENT, String::new()),
        Some(Err(refused)) => refused_answer(refused),
        None => error(StatusCode::SERVICE_UNAVAILABLE, "the daemon is stopping"),
    }
}

fn refused_answer(refused: users::Refused) -> Response<Full<Bytes>> {
    error(StatusCode::from_u16(refused.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), &refused.message)
}

/// Serves the control API on `path` (replacing a stale socket file), to
/// the daemon's own user and root only: whoever may add a tenant chooses the
/// files it reads and the user it runs as.
pub async fn serve_control(path: PathBuf, commands: mpsc::UnboundedSender<Command>) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    // Connecting needs write permission on the socket, whatever the umask was.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    // SAFETY: geteuid has no preconditions.
    let owner = unsafe { libc::geteuid() };
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            // A second check, should the socket's mode be changed under it.
            if !stream.peer_cred().is_ok_and(|peer| peer.uid() == owner || peer.uid() == 0) {
                continue;
            }
            let commands = commands.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let commands = commands.clone();
                    async move { Ok::<_, Infallible>(handle(request, commands).await) }
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    Ok(())
}

/// A series of `/metrics` that is not one of the VM's [`Counters`]: its
/// name (after the prefix), help, kind and value.
type Series<T> = (&'static str, &'static str, Kind, fn(&T) -> u64);

/// A tenant's series beside its VM's counters.
const TENANT_SERIES: &[Series<TenantView>] = &[
    ("up", "1 while the tenant's VM runs", Kind::Gauge, |t| u64::from(t.state == "running")),
    ("failed", "1 while the tenant's settings cannot be used: it is not served", Kind::Gauge, |t| {
        u64::from(t.state == "failed")
    }),
    ("pss_bytes", "Proportional set size of the tenant's process", Kind::Gauge, |t| t.pss_bytes),
    ("memory_bytes", "Guest RAM the tenant's VM is given", Kind::Gauge, |t| u64::from(t.memory_mib) << 20),
    ("state_bytes", "Disk blocks the tenant's state file uses", Kind::Gauge, |t| t.state_bytes),
    ("boots", "VM boots", Kind::Counter, |t| t.boots),
    ("crashes", "Unexpected ends of the VM's process", Kind::Counter, |t| t.crashes),
    ("restarts", "Restarts after a crash or on request", Kind::Counter, |t| t.restarts),
    ("guest_faults", "Protocol violations of the tenant's guest at its VMM", Kind::Counter, |t| t.guest_faults),
    ("cpu_throttled_periods", "CFS periods in which the tenant's CPU limit ran out", Kind::Counter, |t| {
        t.cpu_throttled_periods
    }),
    ("memory_limit_kills", "The tenant's VMM processes killed at its memory limit", Kind::Counter, |t| {
        t.memory_limit_kills
    }),
];

/// A tenant's usage for billing (`mqvisor_tenant_usage_*`): kept across
/// its restarts and the daemon's, so its counters never go back to 0.
const USAGE_SERIES: &[Series<Usage>] = &[
    ("usage_messages_in", "PUBLISH packets from the tenant's clients, for billing", Kind::Counter, |u| u.messages_in),
    ("usage_messages_out", "PUBLISH packets to the tenant's clients, for billing", Kind::Counter, |u| u.messages_out),
    ("usage_bytes_in", "Bytes read from the tenant's clients, for billing", Kind::Counter, |u| u.bytes_in),
    ("usage_bytes_out", "Bytes written to the tenant's clients, for billing", Kind::Counter, |u| u.bytes_out),
    ("usage_peak_connections", "The most clients the tenant had connected at once", Kind::Gauge, |u| {
        u.peak_connections
    }),
];

/// The same in seconds, not whole (name, help, value).
type SecondsSeries = (&'static str, &'static str, fn(&Usage) -> f64);

const USAGE_SECONDS: &[SecondsSeries] = &[
    ("usage_connection_seconds", "The tenant's client connections times the seconds they were open", |u| {
        u.connection_seconds
    }),
    ("usage_state_byte_seconds", "The tenant's state file's bytes times the seconds they were kept", |u| {
        u.state_byte_seconds
    }),
];

/// A gauge of the shared front (no labels): name, help, value.
type FrontGauge = (&'static str, &'static str, fn(&FrontStats) -> u64);

/// The shared front's gauges.
const FRONT_GAUGES: &[FrontGauge] = &[
    ("pending_clients", "Clients still sending their first packet", |f| f.pending_clients),
    ("pending_bytes", "Bytes of first packets held for clients and tenants", |f| f.pending_bytes),
];

/// A reason the front dropped clients before their CONNECT reached a
/// tenant (the `reason` label of `mqvisor_front_clients_dropped`), and
/// how many it dropped for it.
type DropReason = (&'static str, fn(&FrontStats) -> u64);

/// Every reason the front drops clients for.
const FRONT_DROPS: &[DropReason] = &[
    ("byte_budget", |f| f.dropped_over_budget),
    ("oldest_silent", |f| f.dropped_oldest),
    ("too_large", |f| f.dropped_too_large),
    ("timeout", |f| f.dropped_timeout),
    ("not_mqtt", |f| f.dropped_not_mqtt),
    ("not_tls", |f| f.refused_not_tls),
    ("no_server_name", |f| f.refused_no_server_name),
    ("unknown_server_name", |f| f.refused_unknown_server_name),
    ("bad_websocket_request", |f| f.refused_ws_request),
];

type Labels = Vec<(String, String)>;

/// Registers `name` in `registry` and sets it for every `(labels, value)`.
fn register(
    registry: &mut Registry,
    (name, help, kind): (&str, &str, Kind),
    values: impl Iterator<Item = (Labels, u64)>,
) {
    match kind {
        Kind::Gauge => {
            let family = Family::<Labels, Gauge>::default();
            for (labels, value) in values {
                family.get_or_create(&labels).set(i64::try_from(value).unwrap_or(i64::MAX));
            }
            registry.register(name, help, family);
        }
        Kind::Counter => {
            let family = Family::<Labels, Counter>::default();
            for (labels, value) in values {
                family.get_or_create(&labels).inc_by(value);
            }
            registry.register(name, help, family);
        }
    }
}

/// The Prometheus text for `tenants`, every series labelled `tenant`, and
/// for the shared front (`mqvisor_front_*`), which belongs to no tenant;
/// in a fleet, for this node (`mqvisor_fleet_*`, labelled `node`), and for
/// the tenants run on this node only (another node shows its own).
pub fn metrics_text(tenants: &[TenantView], front: FrontStats, fleet: Option<FleetStats>) -> String {
    let here: Vec<TenantView>;
    let tenants = match &fleet {
        None => tenants,
        Some(fleet) => {
            here = tenants.iter().filter(|t| t.node == Some(Some(fleet.node.clone()))).cloned().collect();
            &here[..]
        }
    };
    let mut root = Registry::with_prefix("mqvisor");
    let registry = root.sub_registry_with_prefix("tenant");
    let label = |t: &TenantView| vec![("tenant".to_string(), t.name.clone())];
    for &(name, help, kind, get) in TENANT_SERIES {
        register(registry, (name, help, kind), tenants.iter().map(|t| (label(t), get(t))));
    }
    for counter in Counters::TABLE {
        let values = tenants.iter().map(|t| (label(t), (counter.get)(&t.counters)));
        register(registry, (counter.name, counter.help, counter.kind), values);
    }
    for &(name, help, kind, get) in USAGE_SERIES {
        register(registry, (name, help, kind), tenants.iter().map(|t| (label(t), get(&t.usage))));
    }
    for &(name, help, get) in USAGE_SECONDS {
        let family = Family::<Labels, Counter<f64, std::sync::atomic::AtomicU64>>::default();
        for t in tenants {
            family.get_or_create(&label(t)).inc_by(get(&t.usage));
        }
        registry.register(name, help, family);
    }
    let boot = Family::<Labels, Histogram>::new_with_constructor(|| {
        Histogram::new([0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0])
    });
    for t in tenants {
        let histogram = boot.get_or_create(&label(t));
        for &seconds in &t.boot_seconds {
            histogram.observe(seconds);
        }
    }
    registry.register("boot_seconds", "From spawning the VM to its guest's link being up", boot);
    let front_registry = root.sub_registry_with_prefix("front");
    for &(name, help, get) in FRONT_GAUGES {
        let gauge = Gauge::<i64>::default();
        gauge.set(i64::try_from(get(&front)).unwrap_or(i64::MAX));
        front_registry.register(name, help, gauge);
    }
    let drops =
        FRONT_DROPS.iter().map(|&(reason, get)| (vec![("reason".to_string(), reason.to_string())], get(&front)));
    register(
        front_registry,
        (
            "clients_dropped",
            "Clients dropped before their first bytes (CONNECT, TLS ClientHello, WebSocket upgrade) reached a tenant",
            Kind::Counter,
        ),
        drops,
    );
    if let Some(fleet) = fleet {
        let fleet_registry = root.sub_registry_with_prefix("fleet");
        let node = || std::iter::once(vec![("node".to_string(), fleet.node.clone())]);
        let owned = u64::try_from(tenants.len()).unwrap_or(u64::MAX);
        register(
            fleet_registry,
            ("tenants_owned", "Tenants this node owns and runs", Kind::Gauge),
            node().map(|l| (l, owned)),
        );
        let relayed = ("relayed_connections", "Clients relayed to the node that owns their tenant", Kind::Counter);
        register(fleet_registry, relayed, node().map(|l| (l, fleet.relayed_connections)));
        let bytes =
            ("relayed_bytes", "Bytes copied both ways for relayed clients, counted as each ends", Kind::Counter);
        register(fleet_registry, bytes, node().map(|l| (l, fleet.relayed_bytes)));
        let refused =
            ("relay_refused", "Connections to the relay port closed for want of the fleet's relay key", Kind::Counter);
        register(fleet_registry, refused, node().map(|l| (l, fleet.relay_refused)));
    }
    let mut text = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut text, &root);
    text
}

/// Serves `GET /metrics` on `listener`.
pub fn serve_metrics(listener: TcpListener, commands: mpsc::UnboundedSender<Command>) {
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let commands = commands.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let commands = commands.clone();
                    async move {
                        if request.uri().path() != "/metrics" {
                            return Ok::<_, Infallible>(error(StatusCode::NOT_FOUND, "only /metrics is here"));
                        }
                        Ok(match ask(&commands, Command::List).await {
                            Some(list) => {
                                let text = metrics_text(&list, super::front::stats(), super::cluster::stats());
                                let format = if text.ends_with("# EOF\n") { OPENMETRICS } else { PROMETHEUS_TEXT };
                                let mut response = respond(StatusCode::OK, text);
                                response.headers_mut().insert(
                                    hyper::header::CONTENT_TYPE,
                                    hyper::header::HeaderValue::from_static(format),
                                );
                                response
                            }
                            None => error(StatusCode::SERVICE_UNAVAILABLE, "the daemon is stopping"),
                        })
                    }
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names_in_paths_are_percent_decoded_and_bad_escapes_refused() {
        assert_eq!(percent_decoded("dev%40acme").as_deref(), Some("dev@acme"));
        assert_eq!(percent_decoded("plain").as_deref(), Some("plain"));
        assert_eq!(percent_decoded("%2Fx").as_deref(), Some("/x"), "decoded, then refused as a user name");
        for bad in ["%", "%4", "%zz", "%ff", "%+1"] {
            assert_eq!(percent_decoded(bad), None, "{bad}");
        }
    }

    #[test]
    fn metrics_label_every_series_with_its_tenant() {
        let tenant = TenantView {
            name: "acme".into(),
            state: "running".into(),
            error: None,
            pid: Some(7),
            boots: 2,
            crashes: 1,
            restarts: 1,
            memory_mib: 64,
            counters: Counters {
                connections: 3,
                bytes_in: 10,
                bytes_out: 20,
                messages_in: 5,
                messages_out: 6,
                vm_exits: 9,
                shed_clients: 11,
                silent_clients_dropped: 12,
                disk_io_errors: 13,
                disk_ring_faults: 14,
                ..Counters::default()
            },
            guest_faults: 0,
            cpu_throttled_periods: 0,
            memory_limit_kills: 0,
            pss_bytes: 4096,
            state_bytes: 8192,
            boot_seconds: vec![0.004, 0.012],
            usage: Usage {
                tenant: "acme".into(),
                messages_in: 105,
                bytes_out: 2020,
                connection_seconds: 12.5,
                peak_connections: 40,
                since: 1,
                ..Usage::default()
            },
            node: None,
        };
        let front = FrontStats {
            pending_clients: 2,
            pending_bytes: 40,
            dropped_over_budget: 3,
            dropped_oldest: 4,
            dropped_too_large: 5,
            dropped_timeout: 6,
            dropped_not_mqtt: 7,
            refused_unknown_server_name: 8,
            ..FrontStats::default()
        };
        let text = metrics_text(&[tenant], front, None);
        assert!(text.contains("mqvisor_tenant_up{tenant=\"acme\"} 1"), "{text}");
        assert!(text.contains("mqvisor_tenant_failed{tenant=\"acme\"} 0"), "{text}");
        assert!(text.contains("mqvisor_tenant_connections{tenant=\"acme\"} 3"), "{text}");
        assert!(text.contains("mqvisor_tenant_crashes_total{tenant=\"acme\"} 1"), "{text}");
        assert!(text.contains("mqvisor_tenant_client_bytes_out_total{tenant=\"acme\"} 20"), "{text}");
        assert!(text.contains("mqvisor_tenant_messages_in_total{tenant=\"acme\"} 5"), "{text}");
        assert!(text.contains("mqvisor_tenant_boot_seconds_count{tenant=\"acme\"} 2"), "{text}");
        assert!(text.contains("mqvisor_tenant_state_bytes{tenant=\"acme\"} 8192"), "{text}");
        // The drop counters of the VM's link and disk.
        assert!(text.contains("mqvisor_tenant_shed_clients_total{tenant=\"acme\"} 11"), "{text}");
        assert!(text.contains("mqvisor_tenant_silent_clients_dropped_total{tenant=\"acme\"} 12"), "{text}");
        assert!(text.contains("mqvisor_tenant_disk_io_errors_total{tenant=\"acme\"} 13"), "{text}");
        assert!(text.contains("mqvisor_tenant_disk_ring_faults_total{tenant=\"acme\"} 14"), "{text}");
        // Usage for billing, kept across restarts.
        assert!(text.contains("mqvisor_tenant_usage_messages_in_total{tenant=\"acme\"} 105"), "{text}");
        assert!(text.contains("mqvisor_tenant_usage_bytes_out_total{tenant=\"acme\"} 2020"), "{text}");
        assert!(text.contains("mqvisor_tenant_usage_connection_seconds_total{tenant=\"acme\"} 12.5"), "{text}");
        assert!(text.contains("mqvisor_tenant_usage_peak_connections{tenant=\"acme\"} 40"), "{text}");
        assert!(text.contains("mqvisor_tenant_usage_state_byte_seconds_total{tenant=\"acme\"} 0.0"), "{text}");
        // Every counter of the VM, each once.
        for counter in Counters::TABLE {
            assert_eq!(text.matches(&format!("# HELP mqvisor_tenant_{} ", counter.name)).count(), 1, "{text}");
        }
        let series = text.lines().filter(|l| l.starts_with("mqvisor_tenant"));
        assert!(series.clone().count() >= 9);
        assert!(series.clone().all(|l| l.contains("tenant=\"acme\"")), "{text}");
        // The front belongs to no tenant.
        assert!(text.contains("mqvisor_front_pending_clients 2"), "{text}");
        assert!(text.contains("mqvisor_front_pending_bytes 40"), "{text}");
        assert!(text.contains("mqvisor_front_clients_dropped_total{reason=\"byte_budget\"} 3"), "{text}");
        assert!(text.contains("mqvisor_front_clients_dropped_total{reason=\"oldest_silent\"} 4"), "{text}");
        assert!(text.contains("mqvisor_front_clients_dropped_total{reason=\"too_large\"} 5"), "{text}");
        assert!(text.contains("mqvisor_front_clients_dropped_total{reason=\"timeout\"} 6"), "{text}");
        assert!(text.contains("mqvisor_front_clients_dropped_total{reason=\"not_mqtt\"} 7"), "{text}");
        assert!(text.contains("mqvisor_front_clients_dropped_total{reason=\"unknown_server_name\"} 8"), "{text}");
        assert_eq!(text.matches("# EOF").count(), 1, "{text}");
    }
}
