//! A tenant's users and ACL, kept by the daemon and changed through the
//! control API (`/tenants/NAME/users`, `/tenants/NAME/acl`) while its VM
//! serves.
//!
//! Owns the two files in `state_dir` (`tenants/NAME.passwd`, as
//! `mosquitto_passwd` writes it, and `tenants/NAME.acl`, Mosquitto's ACL
//! text; mode 0600, replaced whole by rename), the rules for user names and
//! passwords, and the change a running VM is sent
//! (`config_blob::write_auth`: every table this module manages, whole).
//! A tenant's process is started with these files as its `password_file`
//! and `acl_file`, so the next boot reads what the API wrote.
//!
//! Never writes a file the operator gave a tenant (`password_file`,
//! `acl_file` in its settings): the API refuses with 409 and names it.
//! Never returns a password hash, and never accepts a change the guest
//! would refuse: the text is checked with the broker's own parsers, and
//! its size against what one live change carries.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use mqvisor_boot_abi::config_blob::{self, AuthText};
use mqvisor_broker::auth::{Acl, PBKDF2_ITERATIONS, PasswordFile, pbkdf2_sha512_hash};

use super::tenant::Tenant;

/// Longest user name, bytes.
pub const MAX_USER_LEN: usize = 64;
/// Longest password, bytes.
pub const MAX_PASSWORD_LEN: usize = 1024;
/// Largest request body of these requests: a password file and an ACL
/// together travel to the VM as one change of at most this much.
pub const MAX_BODY: usize = config_blob::MAX_AUTH_LEN;
/// Salt bytes per password, as `mosquitto_passwd` uses.
const SALT_LEN: usize = 12;

/// What is asked about a tenant's users or ACL.
#[derive(Debug)]
pub enum Request {
    ListUsers,
    PutUser { user: String, password: String },
    DeleteUser { user: String },
    GetAcl,
    PutAcl { text: String },
    DeleteAcl,
}

/// A successful answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// User names, in the file's order.
    Users(Vec<String>),
    /// The ACL's text.
    Acl(String),
    /// A user or an ACL was created.
    Created,
    /// Changed or removed.
    Done,
}

/// A refusal: the HTTP status it is answered with, and why.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused {
    pub status: u16,
    pub message: String,
}

fn refused(status: u16, message: impl Into<String>) -> Refused {
    Refused { status, message: message.into() }
}

/// A user name the API accepts: 1 to [`MAX_USER_LEN`] of ASCII letters,
/// digits and `. _ - @`. Narrower than MQTT allows, so that a name means
/// the same in a URL path, the password file (`user:hash`), the ACL
/// (`user NAME`), serve's `TENANT:USER` and a topic pattern's `%u`.
pub fn check_user_name(user: &str) -> Result<(), Refused> {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@');
    if (1..=MAX_USER_LEN).contains(&user.len()) && user.bytes().all(allowed) {
        Ok(())
    } else {
        Err(refused(
            400,
            format!("user name {user:?}: use 1 to {MAX_USER_LEN} of A-Z, a-z, 0-9, '.', '_', '-' and '@'"),
        ))
    }
}

/// The password of a `PUT /tenants/NAME/users/USER` body
/// (`{"password": "..."}`), checked.
pub fn password_from_body(body: &[u8]) -> Result<String, Refused> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        password: String,
    }
    let body: Body = serde_json::from_slice(body)
        .map_err(|e| refused(400, format!("the body must be JSON {{\"password\": \"...\"}}: {e}")))?;
    if body.password.is_empty() {
        return Err(refused(400, "the password is empty"));
    }
    if body.password.len() > MAX_PASSWORD_LEN {
        return Err(refused(400, format!("the password is longer than {MAX_PASSWORD_LEN} bytes")));
    }
    Ok(body.password)
}

/// Tenant `name`'s users and ACL files in `state_dir`.
pub fn files(state_dir: &Path, name: &str) -> [PathBuf; 2] {
    let dir = state_dir.join("tenants");
    [dir.join(format!("{name}.passwd")), dir.join(format!("{name}.acl"))]
}

/// Removes them (the tenant is removed: one added later under the same
/// name starts without users).
pub fn remove_files(state_dir: &Path, name: &str) {
    for file in files(state_dir, name) {
        let _ = std::fs::remove_file(file);
    }
}

/// Points a tenant's broker settings at the files the API keeps for it,
/// where they exist and the operator gave it none of its own.
pub fn adopt(state_dir: &Path, name: &str, broker: &mut crate::settings::BrokerFlags) {
    let [passwd, acl] = files(state_dir, name);
    if broker.password_file.is_none() && passwd.exists() {
        broker.password_file = Some(passwd);
    }
    if broker.acl_file.is_none() && acl.exists() {
        broker.acl_file = Some(acl);
    }
}

/// Writes `text` to `path` whole (a temporary file, mode 0600, synced,
/// then renamed over it), so a reader never sees half a file.
pub fn write_file(path: &Path, text: &str) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn read_file(path: &Path) -> Result<Option<String>, Refused> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(refused(500, format!("{}: {e}", path.display()))),
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Refused + '_ {
    move |e| refused(500, format!("{}: {e}", path.display()))
}

/// `password`'s line for `user`: `user:$7$...`, with a fresh random salt.
fn password_line(user: &str, password: &str) -> Result<String, Refused> {
    let mut salt = [0u8; SALT_LEN];
    // SAFETY: getrandom(2) writes at most `salt.len()` bytes into the
    // buffer it is given, which lives across the call.
    let got = unsafe { libc::getrandom(salt.as_mut_ptr().cast(), salt.len(), 0) };
    if usize::try_from(got).ok() != Some(salt.len()) {
        return Err(refused(500, format!("no random salt: {}", std::io::Error::last_os_error())));
    }
    Ok(format!("{user}:{}\n", pbkdf2_sha512_hash(password.as_bytes(), &salt, PBKDF2_ITERATIONS)))
}

/// The user name of a password file line (`None`: blank or comment).
fn line_user(line: &str) -> Option<&str> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    Some(line.split_once(':').map_or(line, |(user, _)| user))
}

/// Answers `request` for tenant `name` (`None`: no such tenant), writing
/// its files under `state_dir` and sending its running VM the change.
pub fn handle(tenant: Option<&mut Tenant>, name: &str, state_dir: &Path, request: Request) -> Result<Answer, Refused> {
    let Some(tenant) = tenant else { return Err(refused(404, format!("no tenant {name:?}"))) };
    let [passwd_path, acl_path] = files(state_dir, name);
    let broker = &tenant.config().run.broker;
    let own = |given: &Option<PathBuf>, managed: &Path| given.as_ref().filter(|p| p.as_path() != managed).cloned();
    let (own_passwd, own_acl) = (own(&broker.password_file, &passwd_path), own(&broker.acl_file, &acl_path));
    let users_request = matches!(request, Request::ListUsers | Request::PutUser { .. } | Request::DeleteUser { .. });
    match (users_request, &own_passwd, &own_acl) {
        (true, Some(path), _) => {
            return Err(refused(
                409,
                format!("tenant {name}'s users come from its password_file {}; manage that file", path.display()),
            ));
        }
        (false, _, Some(path)) => {
            return Err(refused(
                409,
                format!("tenant {name}'s ACL comes from its acl_file {}; manage that file", path.display()),
            ));
        }
        _ => {}
    }
    let mut passwd = read_file(&passwd_path)?;
    let mut acl = read_file(&acl_path)?;
    let answer = match request {
        Request::ListUsers => {
            let text = passwd.unwrap_or_default();
            let users = PasswordFile::parse(&text)
                .map_err(|e| refused(500, format!("{}: {e}", passwd_path.display())))?
                .users()
                .map(str::to_string)
                .collect();
            return Ok(Answer::Users(users));
        }
        Request::GetAcl => {
            return acl
                .map(Answer::Acl)
                .ok_or_else(|| refused(404, format!("tenant {name} has no ACL: its clients may use every topic")));
        }
        Request::PutUser { user, password } => {
            check_user_name(&user)?;
            let text = passwd.take().unwrap_or_default();
            let mut existed = false;
            let mut lines: String = text
                .lines()
                .filter(|line| {
                    let theirs = line_user(line) == Some(user.as_str());
                    existed |= theirs;
                    !theirs
                })
                .map(|line| format!("{line}\n"))
                .collect();
            lines.push_str(&password_line(&user, &password)?);
            passwd = Some(lines);
            if existed { Answer::Done } else { Answer::Created }
        }
        Request::DeleteUser { user } => {
            check_user_name(&user)?;
            let text = passwd.take().unwrap_or_default();
            let mut found = false;
            let kept: String = text
                .lines()
                .filter(|line| {
                    let theirs = line_user(line) == Some(user.as_str());
                    found |= theirs;
                    !theirs
                })
                .map(|line| format!("{line}\n"))
                .collect();
            if !found {
                return Err(refused(404, format!("tenant {name} has no user {user:?}")));
            }
            passwd = Some(kept);
            Answer::Done
        }
        Request::PutAcl { text } => {
            Acl::parse(&text).map_err(|e| refused(400, format!("ACL {e}")))?;
            let created = acl.is_none();
            acl = Some(text);
            if created { Answer::Created } else { Answer::Done }
        }
        Request::DeleteAcl => {
            if acl.take().is_none() {
                return Err(refused(404, format!("tenant {name} has no ACL")));
            }
            Answer::Done
        }
    };
    // Every table the API manages, whole: the latest change is all a VM needs.
    let passwords = if own_passwd.is_some() { None } else { Some(passwd.as_deref()) };
    let allow_anonymous = passwords.map(|table| broker.allow_anonymous.unwrap_or(table.is_none()));
    let change = config_blob::write_auth(&AuthText {
        password_file: passwords,
        acl_file: if own_acl.is_some() { None } else { Some(acl.as_deref()) },
        allow_anonymous,
    });
    if change.len() > config_blob::MAX_AUTH_LEN {
        return Err(refused(
            413,
            format!(
                "tenant {name}'s password file and ACL together would be {} bytes; at most {} fit",
                change.len(),
                config_blob::MAX_AUTH_LEN
            ),
        ));
    }
    // As the guest will check it: never send what it would refuse.
    config_blob::read_auth(&change).map_err(|e| refused(500, format!("tenant {name}: {e}")))?;
    if own_passwd.is_none()
        && let Some(text) = &passwd
    {
        write_file(&passwd_path, text).map_err(io(&passwd_path))?;
    }
    if own_acl.is_none() {
        match &acl {
            Some(text) => write_file(&acl_path, text).map_err(io(&acl_path))?,
            None => match std::fs::remove_file(&acl_path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&acl_path)(e)),
            },
        }
    }
    let password_file = own_passwd.or_else(|| passwd.is_some().then_some(passwd_path));
    let acl_file = own_acl.or_else(|| acl.is_some().then_some(acl_path));
    tenant.auth_changed(password_file, acl_file, change).map_err(|e| refused(500, e))?;
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names_that_would_mean_something_else_somewhere_are_refused() {
        for good in ["alice", "a", "dev-01.sensor_x@acme", &"x".repeat(MAX_USER_LEN)] {
            assert!(check_user_name(good).is_ok(), "{good}");
        }
        for bad in ["", "acme:alice", "a b", "#alice", "a+", "a/b", "é", "a\nb", "a%41", &"x".repeat(MAX_USER_LEN + 1)]
        {
            assert_eq!(check_user_name(bad).unwrap_err().status, 400, "{bad:?}");
        }
    }

    #[test]
    fn passwords_come_from_json_never_empty() {
        assert_eq!(password_from_body(br#"{"password": "s3cret"}"#).unwrap(), "s3cret");
        for bad in [&br#"{"password": ""}"#[..], b"s3cret", br#"{"pw": "x"}"#, br#"{"password": "x", "extra": 1}"#] {
            assert_eq!(password_from_body(bad).unwrap_err().status, 400);
        }
        let long = format!("{{\"password\": \"{}\"}}", "x".repeat(MAX_PASSWORD_LEN + 1));
        assert_eq!(password_from_body(long.as_bytes()).unwrap_err().status, 400);
    }

    #[test]
    fn a_written_line_verifies_and_lines_are_found_by_user() {
        let line = password_line("alice", "s3cret").unwrap();
        let file = PasswordFile::parse(&line).unwrap();
        assert!(file.verify("alice", b"s3cret"));
        assert_ne!(line, password_line("alice", "s3cret").unwrap(), "a fresh salt each time");
        assert_eq!(line_user(&line), Some("alice"));
        assert_eq!(line_user("# alice:x"), None);
        assert_eq!(line_user("  "), None);
    }

    #[test]
    fn files_are_written_whole_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("mqvisor-users-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.passwd");
        write_file(&path, "one\n").unwrap();
        write_file(&path, "two\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two\n");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
