//! `mqvisor tenant ...`: the control socket's client. Each command is one
//! request to the daemon's control API ([`super::control`]), answered as a
//! table, as JSON (`--json`) or as one line; a refusal is one line and
//! exit status 1. Tenant names are checked here by the daemon's own rule.

use std::path::Path;
use std::process::ExitCode;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

use crate::cli::{NodeAction, NodeArgs, TenantAction, TenantArgs};

/// `mqvisor tenant ...`: one request to the daemon's control socket.
pub fn tenant_command(args: TenantArgs) -> ExitCode {
    // The server's rule: any other name would be read as a path of its own
    // (`victim?keep` as `victim`, `anon/` as `anon`).
    if let TenantAction::Show { name }
    | TenantAction::Add { name, .. }
    | TenantAction::Remove { name }
    | TenantAction::Restart { name }
    | TenantAction::Usage { name } = &args.action
        && !super::config::valid_tenant_name(name)
    {
        eprintln!("mqvisor: {}", super::config::ServeConfigError::TenantName(name.clone()));
        return ExitCode::FAILURE;
    }
    let (method, path, body) = match &args.action {
        TenantAction::List => (Method::GET, "/tenants".to_string(), String::new()),
        TenantAction::Show { name } => (Method::GET, format!("/tenants/{name}"), String::new()),
        TenantAction::Add { name, settings } => {
            let body = match settings.as_deref().map(super::config::settings_file_body).transpose() {
                Ok(body) => body.unwrap_or_default(),
                Err(e) => {
                    eprintln!("mqvisor: tenant add: the settings file {e}");
                    return ExitCode::FAILURE;
                }
            };
            (Method::PUT, format!("/tenants/{name}"), body)
        }
        TenantAction::Remove { name } => (Method::DELETE, format!("/tenants/{name}"), String::new()),
        TenantAction::Restart { name } => (Method::POST, format!("/tenants/{name}/restart"), String::new()),
        TenantAction::Usage { name } => (Method::GET, format!("/tenants/{name}/usage"), String::new()),
        TenantAction::User(_) | TenantAction::Acl(_) => return super::users_client::command(&args),
    };
    let Some((status, text)) = answer(&args.control.socket, method, &path, body) else { return ExitCode::FAILURE };
    if let TenantAction::Usage { .. } = &args.action {
        return print_usage(&text, args.control.json);
    }
    let views: Option<Vec<super::control::TenantView>> = match &args.action {
        TenantAction::List => serde_json::from_str(&text).ok(),
        TenantAction::Show { .. } => serde_json::from_str(&text).ok().map(|t| vec![t]),
        _ => None,
    };
    match views {
        Some(_) if args.control.json => print!("{text}"),
        Some(views) => {
            // In a fleet, which node owns each (figures are the owner's).
            let fleet = views.iter().any(|t| t.node.is_some());
            let node_of = |t: &super::control::TenantView| match &t.node {
                Some(Some(node)) => format!(" {node}"),
                Some(None) => " -".to_string(),
                None => String::new(),
            };
            println!(
                "{:<24} {:<8} {:>8} {:>11} {:>8} {:>10} {:>6}{}",
                "TENANT",
                "STATE",
                "PID",
                "CONNECTIONS",
                "MEMORY",
                "PSS",
                "BOOTS",
                if fleet { " NODE" } else { "" }
            );
            for t in &views {
                let pid = t.pid.map_or_else(|| "-".to_string(), |p| p.to_string());
                let pss = format!("{:.1} MiB", t.pss_bytes as f64 / f64::from(1 << 20));
                let memory = if t.memory_mib > 0 { format!("{} MiB", t.memory_mib) } else { "-".into() };
                println!(
                    "{:<24} {:<8} {:>8} {:>11} {:>8} {:>10} {:>6}{}",
                    t.name,
                    t.state,
                    pid,
                    t.counters.connections,
                    memory,
                    pss,
                    t.boots,
                    node_of(t)
                );
            }
            // Why a failed tenant is not served.
            for t in &views {
                if let Some(error) = &t.error {
                    println!("{}: {error}", t.name);
                }
            }
        }
        None if status == StatusCode::CREATED => println!("added"),
        None => println!("done"),
    }
    ExitCode::SUCCESS
}

/// The daemon's answer to one request (its status and body), when it
/// succeeded; otherwise the error (the daemon's own message when it gave
/// one) is said on stderr.
fn answer(socket: &Path, method: Method, path: &str, body: String) -> Option<(StatusCode, String)> {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("mqvisor: {e}");
            return None;
        }
    };
    let (status, text) = match runtime.block_on(request(socket, method, path, body)) {
        Ok(answer) => answer,
        Err(e) => {
            eprintln!("mqvisor: {e}");
            return None;
        }
    };
    if !status.is_success() {
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or(text);
        eprintln!("mqvisor: {message}");
        return None;
    }
    Some((status, text))
}

/// `mqvisor node ...`: one request to a fleet node's control socket.
pub fn node_command(args: NodeArgs) -> ExitCode {
    if let NodeAction::Drain { node } | NodeAction::Undrain { node } = &args.action
        && !super::config::valid_tenant_name(node)
    {
        eprintln!("mqvisor: node name {node:?}: use 1 to 64 of a-z, 0-9, '-' and '_'");
        return ExitCode::FAILURE;
    }
    let (method, path) = match &args.action {
        NodeAction::List => (Method::GET, "/nodes".to_string()),
        NodeAction::Drain { node } => (Method::POST, format!("/nodes/{node}/drain")),
        NodeAction::Undrain { node } => (Method::DELETE, format!("/nodes/{node}/drain")),
    };
    let Some((_, text)) = answer(&args.control.socket, method, &path, String::new()) else { return ExitCode::FAILURE };
    match (&args.action, serde_json::from_str::<Vec<super::cluster::NodeView>>(&text)) {
        (NodeAction::List, _) if args.control.json => print!("{text}"),
        (NodeAction::List, Ok(nodes)) => {
            println!("{:<24} {:<22} {:>8} {:>8} {:>8}", "NODE", "ADVERTISE", "CAPACITY", "TENANTS", "DRAINED");
            for n in &nodes {
                let drained = if n.drained { "yes" } else { "no" };
                println!("{:<24} {:<22} {:>8} {:>8} {:>8}", n.name, n.advertise, n.capacity, n.tenants, drained);
            }
        }
        (NodeAction::List, Err(e)) => {
            eprintln!("mqvisor: the daemon's answer is no node list ({e}): {text}");
            return ExitCode::FAILURE;
        }
        _ => println!("done"),
    }
    ExitCode::SUCCESS
}

/// `tenant usage`: the daemon's JSON, or one figure a line.
fn print_usage(text: &str, json: bool) -> ExitCode {
    if json {
        print!("{text}");
        return ExitCode::SUCCESS;
    }
    let Ok(u) = serde_json::from_str::<super::usage::Usage>(text) else {
        eprintln!("mqvisor: the daemon's answer is no usage record: {text}");
        return ExitCode::FAILURE;
    };
    println!("tenant              {}", u.tenant);
    println!("since               {}", super::usage::rfc3339(u.since));
    println!("messages in         {}", u.messages_in);
    println!("messages out        {}", u.messages_out);
    println!("bytes in            {}", u.bytes_in);
    println!("bytes out           {}", u.bytes_out);
    println!("connection-seconds  {:.1}", u.connection_seconds);
    println!("peak connections    {}", u.peak_connections);
    println!("state bytes         {}", u.state_bytes);
    println!("state byte-seconds  {:.0}", u.state_byte_seconds);
    ExitCode::SUCCESS
}

/// One request to the daemon on `socket`; returns the
/// status and body, or a one-line error when nothing answers.
pub async fn request(socket: &Path, method: Method, path: &str, body: String) -> Result<(StatusCode, String), String> {
    let stream = UnixStream::connect(socket).await.map_err(|e| {
        format!(
            "no mqvisor serve answers on {} ({e}); is it running, and is --socket its control socket?",
            socket.display()
        )
    })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("talking to {}: {e}", socket.display()))?;
    tokio::spawn(connection);
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "mqvisor")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let response = sender.send_request(request).await.map_err(|e| format!("talking to {}: {e}", socket.display()))?;
    let status = response.status();
    let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
