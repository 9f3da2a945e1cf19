//! `mqvisor tenant user ...` and `mqvisor tenant acl ...`: the control
//! socket's client for a tenant's users and ACL ([`super::users`] answers).
//!
//! Owns getting a password without it ever being an argument (a prompt on
//! the terminal with echo off, or the first line of stdin) and reading an
//! ACL file; names are checked here by the daemon's own rules. Never prints
//! a password or a hash.

use std::io::{BufRead, IsTerminal, Read, Write};
use std::process::ExitCode;

use hyper::{Method, StatusCode};

use super::users::{MAX_BODY, check_user_name};
use crate::cli::{AclAction, TenantAction, TenantArgs, UserAction};

/// Runs a `tenant user` or `tenant acl` command.
pub fn command(args: &TenantArgs) -> ExitCode {
    match ask(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mqvisor: {e}");
            ExitCode::FAILURE
        }
    }
}

fn ask(args: &TenantArgs) -> Result<(), String> {
    let name = match &args.action {
        TenantAction::User(
            UserAction::List { name } | UserAction::Add { name, .. } | UserAction::Remove { name, .. },
        )
        | TenantAction::Acl(AclAction::Show { name } | AclAction::Set { name, .. } | AclAction::Remove { name }) => {
            name
        }
        _ => return Err("not a user or ACL command".into()),
    };
    if !super::config::valid_tenant_name(name) {
        return Err(super::config::ServeConfigError::TenantName(name.clone()).to_string());
    }
    let (method, path, body) = match &args.action {
        TenantAction::User(UserAction::List { .. }) => (Method::GET, format!("/tenants/{name}/users"), String::new()),
        TenantAction::User(UserAction::Add { user, password_stdin, .. }) => {
            check_user_name(user).map_err(|r| r.message)?;
            let password = if *password_stdin { password_from_stdin()? } else { password_from_terminal()? };
            let body = serde_json::json!({ "password": password }).to_string();
            (Method::PUT, format!("/tenants/{name}/users/{user}"), body)
        }
        TenantAction::User(UserAction::Remove { user, .. }) => {
            check_user_name(user).map_err(|r| r.message)?;
            (Method::DELETE, format!("/tenants/{name}/users/{user}"), String::new())
        }
        TenantAction::Acl(AclAction::Show { .. }) => (Method::GET, format!("/tenants/{name}/acl"), String::new()),
        TenantAction::Acl(AclAction::Set { file, .. }) => {
            let mut text = Vec::new();
            let (read, from) = match file {
                Some(path) => (
                    std::fs::File::open(path).and_then(|f| f.take(MAX_BODY as u64 + 1).read_to_end(&mut text)),
                    path.display().to_string(),
                ),
                None => (std::io::stdin().take(MAX_BODY as u64 + 1).read_to_end(&mut text), "stdin".into()),
            };
            read.map_err(|e| format!("{from}: {e}"))?;
            if text.len() > MAX_BODY {
                return Err(format!("{from}: an ACL must be at most {} KiB", MAX_BODY / 1024));
            }
            let text = String::from_utf8(text).map_err(|_| format!("{from}: an ACL must be UTF-8 text"))?;
            (Method::PUT, format!("/tenants/{name}/acl"), text)
        }
        TenantAction::Acl(AclAction::Remove { .. }) => (Method::DELETE, format!("/tenants/{name}/acl"), String::new()),
        _ => return Err("not a user or ACL command".into()),
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    let (status, text) = runtime.block_on(super::client::request(&args.control.socket, method, &path, body))?;
    if !status.is_success() {
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or(text);
        return Err(message);
    }
    match &args.action {
        TenantAction::User(UserAction::List { .. }) if args.control.json => print!("{text}"),
        TenantAction::User(UserAction::List { .. }) => {
            let names: Vec<String> = serde_json::from_str(&text).map_err(|e| format!("the daemon's answer: {e}"))?;
            for user in names {
                println!("{user}");
            }
        }
        TenantAction::Acl(AclAction::Show { .. }) => print!("{text}"),
        TenantAction::User(UserAction::Add { .. }) if status == StatusCode::CREATED => println!("added"),
        TenantAction::User(UserAction::Add { .. }) => println!("password changed"),
        TenantAction::User(UserAction::Remove { .. }) | TenantAction::Acl(AclAction::Remove { .. }) => {
            println!("removed")
        }
        _ => println!("done"),
    }
    Ok(())
}

/// The first line of stdin, without its line end.
fn password_from_stdin() -> Result<String, String> {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).map_err(|e| format!("stdin: {e}"))?;
    let password = line.strip_suffix('\n').unwrap_or(&line);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        return Err("no password on stdin".into());
    }
    Ok(password.to_string())
}

/// Asks for the password twice on the terminal, not echoed.
fn password_from_terminal() -> Result<String, String> {
    if !std::io::stdin().is_terminal() {
        return Err("no terminal to ask for the password on: use --password-stdin".into());
    }
    let first = prompt("Password: ")?;
    let again = prompt("Password again: ")?;
    if first != again {
        return Err("the passwords differ".into());
    }
    if first.is_empty() {
        return Err("the password is empty".into());
    }
    Ok(first)
}

/// One line from the terminal on stdin with echo off (restored after,
/// whatever happens), `text` said on stderr first.
fn prompt(text: &str) -> Result<String, String> {
    eprint!("{text}");
    let _ = std::io::stderr().flush();
    // SAFETY: a zeroed termios is a valid value for tcgetattr to fill.
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: fd 0 is stdin, a terminal (checked by the caller); `saved`
    // is a valid termios to write into.
    if unsafe { libc::tcgetattr(0, &mut saved) } != 0 {
        return Err(format!("the terminal: {}", std::io::Error::last_os_error()));
    }
    let mut quiet = saved;
    quiet.c_lflag &= !libc::ECHO;
    quiet.c_lflag |= libc::ECHONL;
    // SAFETY: as above; `quiet` is the terminal's own settings, echo off.
    if unsafe { libc::tcsetattr(0, libc::TCSANOW, &quiet) } != 0 {
        return Err(format!("the terminal: {}", std::io::Error::last_os_error()));
    }
    let mut line = String::new();
    let read = std::io::stdin().lock().read_line(&mut line);
    // SAFETY: as above; puts back what tcgetattr read.
    unsafe { libc::tcsetattr(0, libc::TCSANOW, &saved) };
    read.map_err(|e| format!("the terminal: {e}"))?;
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}
