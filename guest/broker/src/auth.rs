//! Who may connect, and what they may publish and subscribe to.
//!
//! Owns two Mosquitto-compatible formats so that operators can bring their
//! existing files:
//! - password files as written by `mosquitto_passwd`: `user:$7$iter$salt$hash`
//!   (PBKDF2-HMAC-SHA512) or `user:$6$salt$hash` (SHA-512 of password+salt),
//!   salt and hash in base64;
//! - ACL files: `user NAME` starts a user's section; `topic [read|write|readwrite|deny] FILTER`
//!   grants within it (before any `user` line: for anonymous clients);
//!   `pattern [access] FILTER` applies to everyone, with `%u` / `%c`
//!   replaced by the user name / client id.
//!
//! Passwords are compared in constant time; a file that does not parse is an
//! error naming the line, never a silently open broker.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha2::{Digest, Sha512};

/// A parse error: the 1-based line and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileError {
    pub line: usize,
    pub why: String,
}

impl core::error::Error for FileError {}

impl core::fmt::Display for FileError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "line {}: {}", self.line, self.why)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Hash {
    Pbkdf2Sha512 { iterations: u32, salt: Vec<u8>, hash: Vec<u8> },
    Sha512 { salt: Vec<u8>, hash: Vec<u8> },
}

/// Users and their password hashes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PasswordFile {
    users: Vec<(String, Hash)>,
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl PasswordFile {
    /// Parses a `mosquitto_passwd` file. Blank lines and `#` comments are skipped.
    pub fn parse(text: &str) -> Result<PasswordFile, FileError> {
        let mut users = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |why: &str| FileError { line: i + 1, why: why.to_string() };
            let (user, hash) = line.split_once(':').ok_or_else(|| err("expected user:hash"))?;
            let b64 = |s: &str| BASE64.decode(s).map_err(|_| err("salt or hash is not base64"));
            let parts: Vec<&str> = hash.split('$').collect();
            let hash = match parts.as_slice() {
                ["", "7", iterations, salt, hash] => Hash::Pbkdf2Sha512 {
                    iterations: iterations.parse().ok().filter(|&n| n > 0).ok_or_else(|| err("bad iteration count"))?,
                    salt: b64(salt)?,
                    hash: b64(hash)?,
                },
                ["", "6", salt, hash] => Hash::Sha512 { salt: b64(salt)?, hash: b64(hash)? },
                _ => return Err(err("unsupported hash (expected $7$ or $6$, as mosquitto_passwd writes)")),
            };
            if user.is_empty() {
                return Err(err("empty user name"));
            }
            users.push((user.to_string(), hash));
        }
        Ok(PasswordFile { users })
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// The users' names, in the file's order (never their hashes).
    pub fn users(&self) -> impl Iterator<Item = &str> {
        self.users.iter().map(|(name, _)| name.as_str())
    }

    /// True if `user` has a line in the file.
    pub fn contains(&self, user: &str) -> bool {
        self.users.iter().any(|(name, _)| name == user)
    }

    /// True if `user` exists and `password` is theirs.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        let Some((_, hash)) = self.users.iter().find(|(name, _)| name == user) else { return false };
        match hash {
            Hash::Pbkdf2Sha512 { iterations, salt, hash } => {
                let mut out = alloc::vec![0u8; hash.len()];
                pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, *iterations, &mut out);
                constant_time_eq(&out, hash)
            }
            Hash::Sha512 { salt, hash } => {
                let mut digest = Sha512::new();
                digest.update(password);
                digest.update(salt);
                constant_time_eq(&digest.finalize(), hash)
            }
        }
    }
}

/// Iterations `mosquitto_passwd` (Mosquitto 2.0) uses for `$7$` hashes,
/// and so what [`pbkdf2_sha512_hash`] writes: the broker verifies a
/// password with each CONNECT, so the count is what every CONNECT costs.
pub const PBKDF2_ITERATIONS: u32 = 101;

/// The hash part of a password file line for `password`, in the format
/// `mosquitto_passwd` writes by default: `$7$ITERATIONS$SALT$HASH`
/// (PBKDF2-HMAC-SHA512, a 64-byte hash, salt and hash in base64). The
/// caller brings a random `salt` (12 bytes, as Mosquitto's).
pub fn pbkdf2_sha512_hash(password: &[u8], salt: &[u8], iterations: u32) -> String {
    let mut hash = [0u8; 64];
    pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, iterations, &mut hash);
    format!("$7${iterations}${}${}", BASE64.encode(salt), BASE64.encode(hash))
}

/// A live change of the tables a broker authenticates and authorises with
/// (`Broker::update_auth`): each part that is `Some` replaces the broker's,
/// `Some(None)` taking the table away; `None` keeps the broker's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthUpdate {
    pub passwords: Option<Option<PasswordFile>>,
    pub acl: Option<Option<Acl>>,
    pub allow_anonymous: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
    ReadWrite,
    Deny,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    access: Access,
    filter: String,
}

/// ACL rules by user, for anonymous clients, and patterns for everyone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    anonymous: Vec<Rule>,
    users: Vec<(String, Vec<Rule>)>,
    patterns: Vec<Rule>,
}

/// What a client wants to do with a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Publish to a topic name.
    Publish,
    /// Receive messages: subscribe to a topic filter (a rule must cover the
    /// whole filter), or be sent a message on a topic name.
    Read,
}

/// True if every topic `sub` can match is matched by `rule` (both filters).
fn covers(rule: &str, sub: &str) -> bool {
    let mut r = rule.split('/');
    let mut s = sub.split('/');
    loop {
        match (r.next(), s.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(level)) if level != "#" => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Why `filter` is no MQTT topic filter: `#` must be a whole level and the
/// last one, `+` a whole level (MQTT 4.7.1). A `#` in the middle would
/// otherwise match everything after it, granting more than the line says.
fn malformed_filter(filter: &str) -> Option<&'static str> {
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return Some("`#` may only be a whole level, and the last");
        }
        if level.contains('+') && level != "+" {
            return Some("`+` may only be a whole level");
        }
    }
    None
}

impl Acl {
    /// Parses a Mosquitto ACL file (the subset described in the module docs).
    pub fn parse(text: &str) -> Result<Acl, FileError> {
        let mut acl = Acl::default();
        let mut current: Option<usize> = None;
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |why: String| FileError { line: i + 1, why };
            let (keyword, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            let rest = rest.trim();
            match keyword {
                "user" => {
                    if rest.is_empty() {
                        return Err(err("`user` needs a name".into()));
                    }
                    acl.users.push((rest.to_string(), Vec::new()));
                    current = Some(acl.users.len() - 1);
                }
                "topic" | "pattern" => {
                    if matches!(rest, "read" | "write" | "readwrite" | "deny") {
                        return Err(err(format!("`{keyword} {rest}` needs a topic filter")));
                    }
                    let (access, filter) = match rest.split_once(char::is_whitespace) {
                        Some(("read", f)) => (Access::Read, f),
                        Some(("write", f)) => (Access::Write, f),
                        Some(("readwrite", f)) => (Access::ReadWrite, f),
                        Some(("deny", f)) => (Access::Deny, f),
                        // A typo such as `raed` would otherwise become part
                        // of a filter that matches nothing (Mosquitto
                        // refuses it too).
                        Some((word, _)) => {
                            return Err(err(format!("unknown access `{word}`: use read, write, readwrite or deny")));
                        }
                        None => (Access::ReadWrite, rest),
                    };
                    let filter = filter.trim();
                    if filter.is_empty() {
                        return Err(err(format!("`{keyword}` needs a topic filter")));
                    }
                    if let Some(why) = malformed_filter(filter) {
                        return Err(err(format!("topic filter `{filter}`: {why}")));
                    }
                    let rule = Rule { access, filter: filter.to_string() };
                    match (keyword, current) {
                        ("pattern", _) => acl.patterns.push(rule),
                        (_, Some(u)) => acl.users[u].1.push(rule),
                        (_, None) => acl.anonymous.push(rule),
                    }
                }
                other => return Err(err(format!("unknown keyword `{other}`"))),
            }
        }
        Ok(acl)
    }

    /// May `user` (None: anonymous) with `client_id` do `want` on `topic`?
    /// Deny rules win; otherwise some matching rule must grant the access.
    pub fn allows(&self, user: Option<&str>, client_id: &str, want: Want, topic: &str) -> bool {
        let own = match user {
            Some(name) => self.users.iter().filter(|(n, _)| n == name).flat_map(|(_, r)| r.iter()).collect::<Vec<_>>(),
            None => self.anonymous.iter().collect(),
        };
        // A user name or client id with a wildcard would widen a pattern to
        // other users' topics (`users/%u/#` with user `#`): such a client is
        // refused whatever the rules say, as Mosquitto does.
        let wild = |value: &str| value.contains(['+', '#']);
        let widens = |rule: &Rule| {
            (rule.filter.contains("%u") && wild(user.unwrap_or(""))) || (rule.filter.contains("%c") && wild(client_id))
        };
        if self.patterns.iter().any(widens) {
            return false;
        }
        let patterns = self.patterns.iter().map(|rule| Rule {
            access: rule.access,
            filter: rule.filter.replace("%c", client_id).replace("%u", user.unwrap_or("")),
        });
        let rules: Vec<Rule> = own.into_iter().cloned().chain(patterns).collect();
        let applies = |rule: &Rule| match want {
            Want::Publish => crate::topic::matches(&rule.filter, topic),
            Want::Read => covers(&rule.filter, topic),
        };
        if rules.iter().any(|r| r.access == Access::Deny && applies(r)) {
            return false;
        }
        rules.iter().any(|r| {
            let grants = match want {
                Want::Publish => matches!(r.access, Access::Write | Access::ReadWrite),
                Want::Read => matches!(r.access, Access::Read | Access::ReadWrite),
            };
            grants && applies(r)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written by `mosquitto_passwd` (Mosquitto 2.0): alice/s3cret with the
    /// default PBKDF2-SHA512, carol/pa55 with `-H sha512`.
    const FILE: &str = "\
alice:$7$101$UdmVFG4Cfxk2O1VO$rSNLgEwwuKSNj861LvltavG18Kq8wv1IQbj67BhI+jBe6eA9T8etGURdw69SZ2LTo1aWIS2XT9CsGfKLIiqCdg==
# a comment
carol:$6$kzh82Fxp04vs5MHw$Af9HpxJnHhSz4amwiN5oS21VmWmPTe7Z+VTzQ3TavvJyTxL6J8VhKL/RfUsfBe+Ojir25OApzPJzLgJOtFlLoA==
";

    #[test]
    fn mosquitto_passwd_hashes_verify() {
        let file = PasswordFile::parse(FILE).unwrap();
        assert!(file.verify("alice", b"s3cret"));
        assert!(!file.verify("alice", b"s3cret "));
        assert!(file.verify("carol", b"pa55"));
        assert!(!file.verify("carol", b"pa56"));
        assert!(!file.verify("mallory", b"s3cret"));
    }

    #[test]
    fn written_hashes_verify_and_list_by_name() {
        let line = alloc::format!("dave:{}\n", pbkdf2_sha512_hash(b"pw", b"0123456789ab", PBKDF2_ITERATIONS));
        assert!(line.starts_with("dave:$7$101$MDEyMzQ1Njc4OWFi$"), "{line}");
        let file = PasswordFile::parse(&alloc::format!("{FILE}{line}")).unwrap();
        assert!(file.verify("dave", b"pw"));
        assert!(!file.verify("dave", b"pw2"));
        assert_eq!(file.users().collect::<Vec<_>>(), ["alice", "carol", "dave"]);
        assert!(file.contains("carol") && !file.contains("mallory"));
    }

    #[test]
    fn bad_password_files_name_the_line() {
        assert_eq!(PasswordFile::parse("alice\n").unwrap_err().line, 1);
        assert_eq!(PasswordFile::parse("\nbob:$1$x$y\n").unwrap_err().line, 2);
        assert!(PasswordFile::parse("bob:$7$0$AA==$AA==").is_err());
        assert!(PasswordFile::parse("bob:$6$!!$AA==").is_err());
    }

    #[test]
    fn acl_rules_per_user_anonymous_and_patterns() {
        let acl = Acl::parse(
            "topic read public/#\n\
             user alice\n\
             topic readwrite alice/#\n\
             topic deny alice/secret/#\n\
             topic write sensors/+\n\
             pattern readwrite clients/%c/#\n",
        )
        .unwrap();
        let alice = Some("alice");
        assert!(acl.allows(alice, "c1", Want::Publish, "alice/x"));
        assert!(!acl.allows(alice, "c1", Want::Publish, "alice/secret/x"));
        assert!(acl.allows(alice, "c1", Want::Publish, "sensors/t1"));
        assert!(!acl.allows(alice, "c1", Want::Read, "sensors/t1"));
        assert!(acl.allows(alice, "c1", Want::Read, "alice/+/y"));
        assert!(!acl.allows(alice, "c1", Want::Read, "#"));
        assert!(acl.allows(alice, "c1", Want::Publish, "clients/c1/status"));
        assert!(!acl.allows(alice, "c1", Want::Publish, "clients/c2/status"));
        // Anonymous: only the rules before the first `user` line.
        assert!(acl.allows(None, "x", Want::Read, "public/news"));
        assert!(!acl.allows(None, "x", Want::Publish, "public/news"));
        assert!(!acl.allows(None, "x", Want::Read, "alice/x"));
    }

    /// A user named `#` must not turn `users/%u/#` into `users/#/#`.
    #[test]
    fn wildcards_in_a_user_name_or_client_id_never_widen_a_pattern() {
        let acl =
            Acl::parse("user alice\ntopic readwrite alice/#\npattern readwrite users/%u/#\npattern read c/%c/#\n")
                .unwrap();
        assert!(acl.allows(Some("bob"), "x", Want::Read, "users/bob/inbox"));
        for user in ["#", "users/+", "a+b"] {
            assert!(!acl.allows(Some(user), "x", Want::Read, "users/#"), "{user}");
            assert!(!acl.allows(Some(user), "x", Want::Publish, "users/alice/secret"), "{user}");
        }
        assert!(!acl.allows(Some("bob"), "#", Want::Read, "c/#"));
        assert!(!acl.allows(Some("bob"), "+", Want::Read, "c/other/x"));
    }

    #[test]
    fn filter_coverage_for_subscriptions() {
        assert!(covers("a/#", "a/b/#"));
        assert!(covers("a/+", "a/+"));
        assert!(!covers("a/+", "a/#"));
        assert!(!covers("a/b", "a/+"));
        assert!(covers("#", "x/+/y"));
    }

    #[test]
    fn bad_acl_files_name_the_line() {
        assert_eq!(Acl::parse("user\n").unwrap_err().line, 1);
        assert_eq!(Acl::parse("topic read a\nbogus x\n").unwrap_err().line, 2);
        assert_eq!(Acl::parse("topic read\n").unwrap_err().line, 1);
        // A `#` mid-filter (it would match everything after it) and stray
        // wildcards are refused, as Mosquitto refuses them.
        for bad in ["a/+/#/c", "a/#/b", "a/b#", "q+/x", "#/x"] {
            let e = Acl::parse(&format!("user alice\ntopic readwrite {bad}\n")).unwrap_err();
            assert_eq!(e.line, 2, "{bad}");
            assert!(e.why.contains(bad), "{bad}: {}", e.why);
        }
        for good in ["#", "a/#", "+/+/c", "+", "users/%u/#"] {
            assert!(Acl::parse(&format!("topic {good}\n")).is_ok(), "{good}");
            assert!(Acl::parse(&format!("pattern read {good}\n")).is_ok(), "{good}");
        }
        assert!(Acl::parse("topic read a b/c\n").is_ok(), "a filter may hold a space");
        // An unknown access word is a typo, not a filter.
        let e = Acl::parse("topic raed x/#\n").unwrap_err();
        assert!(e.why.contains("unknown access `raed`"), "{}", e.why);
    }
}
