//! The tenant configuration blob: the broker's settings and the operator's
//! password and ACL files, written by the VMM between the image and the heap
//! ([`crate::BootInfo::config_addr`]) and read by the guest at boot.
//!
//! One codec for both sides: [`write`] and [`read`] walk the same table of
//! fields, so a setting is spelled once here and once in the broker's
//! `Config`. The guest treats the blob as untrusted bytes: every record is
//! bounds-checked, every number range-checked, and the result goes through
//! `Config::validate`; a bad blob is a typed [`BlobError`], never a panic.
//!
//! Layout: [`FORMAT_VERSION`] (one byte), then records until the end, each a
//! tag byte, a little-endian u32 length and that many bytes. Numbers are
//! 8-byte little-endian; texts are UTF-8. Each tag appears at most once;
//! settings that are absent keep the broker's default.
//!
//! A live change of the password and ACL tables ([`write_auth`],
//! [`read_auth`]: the VMM sends it to a running guest as a `streams` `Auth`
//! record) is a blob of the same layout holding only the two files, the
//! records that take a table away, and `allow_anonymous`; it is checked the
//! same way, files parsed by the same parsers.

use alloc::vec::Vec;
use core::fmt;

use mqvisor_broker::auth::{Acl, AuthUpdate, FileError, PasswordFile};
use mqvisor_broker::broker::{Config, ConfigError};
use mqvisor_broker::packet::QoS;

/// Largest blob the VMM writes and the guest accepts.
pub const MAX_LEN: u64 = 1 << 20;
/// The first byte of every blob.
pub const FORMAT_VERSION: u8 = 1;

/// Largest live auth change ([`write_auth`]): with its record header it
/// fits one frame of the link and one datagram of the daemon's handoff
/// socket, so the control API refuses larger files.
pub const MAX_AUTH_LEN: usize = 60 * 1024;

/// Record tags of the two files, and of taking a table away (live changes only).
mod tag {
    pub const PASSWORD_FILE: u8 = 0x80;
    pub const ACL_FILE: u8 = 0x81;
    pub const NO_PASSWORD_FILE: u8 = 0x82;
    pub const NO_ACL_FILE: u8 = 0x83;
    /// `allow_anonymous`, the one setting a live change may carry.
    pub const ALLOW_ANONYMOUS: u8 = 17;
}

/// Why a blob was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobError {
    /// Empty, or a format version this guest does not know.
    Version(Option<u8>),
    /// A record's header or body runs past the end, at this offset.
    Truncated(usize),
    /// A tag no field has.
    UnknownTag(u8),
    /// A tag seen twice.
    Repeated(u8),
    /// A number record that is not 8 bytes, or a value out of its field's range.
    BadValue(u8),
    /// A file that is not UTF-8.
    NotUtf8(u8),
    /// The password file does not parse.
    PasswordFile(FileError),
    /// The ACL file does not parse.
    AclFile(FileError),
    /// The settings decode but the broker cannot work with them.
    Invalid(ConfigError),
    /// A live auth change larger than [`MAX_AUTH_LEN`].
    TooLarge(usize),
}

impl core::error::Error for BlobError {}

impl fmt::Display for BlobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlobError::Version(Some(v)) => write!(f, "configuration format {v}, expected {FORMAT_VERSION}"),
            BlobError::Version(None) => f.write_str("empty configuration"),
            BlobError::Truncated(at) => write!(f, "configuration truncated at byte {at}"),
            BlobError::UnknownTag(t) => write!(f, "unknown configuration record {t:#04x}"),
            BlobError::Repeated(t) => write!(f, "configuration record {t:#04x} appears twice"),
            BlobError::BadValue(t) => write!(f, "configuration record {t:#04x} has a bad value"),
            BlobError::NotUtf8(t) => write!(f, "configuration record {t:#04x} is not UTF-8"),
            BlobError::PasswordFile(e) => write!(f, "password file: {e}"),
            BlobError::AclFile(e) => write!(f, "ACL file: {e}"),
            BlobError::Invalid(e) => write!(f, "broker settings: {e}"),
            BlobError::TooLarge(len) => write!(f, "auth change of {len} bytes, at most {MAX_AUTH_LEN}"),
        }
    }
}

/// A numeric setting: its tag, how to read it from a `Config` (`None`: not
/// written), and how to store it back (`None`: out of range).
struct Field {
    tag: u8,
    get: fn(&Config) -> Option<u64>,
    set: fn(&mut Config, u64) -> Option<()>,
}

/// A numeric field of `Config` (unsigned integers of any width).
macro_rules! number {
    ($tag:literal, $($field:ident).+ : $ty:ty) => {
        Field {
            tag: $tag,
            get: |c| u64::try_from(c.$($field).+).ok(),
            set: |c, v| {
                c.$($field).+ = <$ty>::try_from(v).ok()?;
                Some(())
            },
        }
    };
}

/// Every broker setting that travels to the guest.
const FIELDS: &[Field] = &[
    number!(1, max_connections: usize),
    number!(2, max_packet_size: usize),
    number!(3, max_queued_messages: usize),
    number!(4, max_inflight: u16),
    number!(5, receive_maximum: u16),
    number!(6, topic_limits.max_len: usize),
    number!(7, topic_limits.max_levels: usize),
    number!(8, max_subscriptions_per_client: usize),
    Field {
        tag: 9,
        get: |c| Some(c.max_qos as u64),
        set: |c, v| {
            c.max_qos = match v {
                0 => QoS::AtMostOnce,
                1 => QoS::AtLeastOnce,
                2 => QoS::ExactlyOnce,
                _ => return None,
            };
            Some(())
        },
    },
    Field {
        tag: 10,
        get: |c| Some(u64::from(c.retain_available)),
        set: |c, v| {
            c.retain_available = flag(v)?;
            Some(())
        },
    },
    number!(11, topic_alias_maximum: u16),
    Field {
        tag: 12,
        get: |c| c.max_keep_alive.map(u64::from),
        set: |c, v| {
            c.max_keep_alive = Some(u16::try_from(v).ok()?);
            Some(())
        },
    },
    number!(13, max_session_expiry: u32),
    number!(14, max_pending_output: usize),
    number!(15, sys_interval_ms: u64),
    number!(16, connect_timeout_ms: u64),
    number!(18, max_retained_messages: usize),
    number!(19, max_retained_bytes: usize),
    number!(20, max_sessions: usize),
    number!(21, max_queued_bytes: usize),
    Field {
        tag: 17,
        get: |c| Some(u64::from(c.allow_anonymous)),
        set: |c, v| {
            c.allow_anonymous = flag(v)?;
            Some(())
        },
    },
];

fn flag(v: u64) -> Option<bool> {
    match v {
        0 => Some(false),
        1 => Some(true),
        _ => None,
    }
}

fn record(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    // The VMM bounds files (and so records) far below 4 GiB.
    out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(body);
}

/// The blob for `config` and the text of its password and ACL files (the
/// guest parses the files itself; `config.passwords` and `config.acl` are
/// not written).
pub fn write(config: &Config, password_file: Option<&str>, acl_file: Option<&str>) -> Vec<u8> {
    let mut out = Vec::from([FORMAT_VERSION]);
    for field in FIELDS {
        if let Some(value) = (field.get)(config) {
            record(&mut out, field.tag, &value.to_le_bytes());
        }
    }
    for (tag, text) in [(tag::PASSWORD_FILE, password_file), (tag::ACL_FILE, acl_file)] {
        if let Some(text) = text {
            record(&mut out, tag, text.as_bytes());
        }
    }
    out
}

/// Reads a blob into a checked `Config`, password and ACL files included.
pub fn read(blob: &[u8]) -> Result<Config, BlobError> {
    let mut config = Config::default();
    each_record(blob, |tag, body| {
        match tag {
            tag::PASSWORD_FILE => {
                let text = core::str::from_utf8(body).map_err(|_| BlobError::NotUtf8(tag))?;
                config.passwords = Some(PasswordFile::parse(text).map_err(BlobError::PasswordFile)?);
            }
            tag::ACL_FILE => {
                let text = core::str::from_utf8(body).map_err(|_| BlobError::NotUtf8(tag))?;
                config.acl = Some(Acl::parse(text).map_err(BlobError::AclFile)?);
            }
            _ => {
                let field = FIELDS.iter().find(|f| f.tag == tag).ok_or(BlobError::UnknownTag(tag))?;
                let bytes: [u8; 8] = body.try_into().map_err(|_| BlobError::BadValue(tag))?;
                (field.set)(&mut config, u64::from_le_bytes(bytes)).ok_or(BlobError::BadValue(tag))?;
            }
        }
        Ok(())
    })?;
    config.validate().map_err(BlobError::Invalid)?;
    Ok(config)
}

/// A live auth change, as text: each `Some` replaces the guest's table
/// (`Some(None)`: takes it away), `None` keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthText<'a> {
    /// A `mosquitto_passwd` file's text.
    pub password_file: Option<Option<&'a str>>,
    /// A Mosquitto ACL file's text.
    pub acl_file: Option<Option<&'a str>>,
    /// Whether clients without a user name may connect.
    pub allow_anonymous: Option<bool>,
}

/// The blob of a live auth change (the guest parses the files itself).
pub fn write_auth(change: &AuthText<'_>) -> Vec<u8> {
    let mut out = Vec::from([FORMAT_VERSION]);
    for (file, present, absent) in [
        (change.password_file, tag::PASSWORD_FILE, tag::NO_PASSWORD_FILE),
        (change.acl_file, tag::ACL_FILE, tag::NO_ACL_FILE),
    ] {
        match file {
            Some(Some(text)) => record(&mut out, present, text.as_bytes()),
            Some(None) => record(&mut out, absent, &[]),
            None => {}
        }
    }
    if let Some(allow) = change.allow_anonymous {
        record(&mut out, tag::ALLOW_ANONYMOUS, &u64::from(allow).to_le_bytes());
    }
    out
}

/// Splits a blob into its records, checking the version, every length and
/// that no tag repeats; `on` gets each tag and body.
fn each_record<'a>(blob: &'a [u8], mut on: impl FnMut(u8, &'a [u8]) -> Result<(), BlobError>) -> Result<(), BlobError> {
    let (&version, mut rest) = blob.split_first().ok_or(BlobError::Version(None))?;
    if version != FORMAT_VERSION {
        return Err(BlobError::Version(Some(version)));
    }
    let mut seen = [false; 256];
    while !rest.is_empty() {
        let at = blob.len() - rest.len();
        let (&tag, after_tag) = rest.split_first().ok_or(BlobError::Truncated(at))?;
        let len_bytes: [u8; 4] = after_tag.get(..4).and_then(|b| b.try_into().ok()).ok_or(BlobError::Truncated(at))?;
        let len = usize::try_from(u32::from_le_bytes(len_bytes)).map_err(|_| BlobError::Truncated(at))?;
        let body = after_tag.get(4..).and_then(|b| b.get(..len)).ok_or(BlobError::Truncated(at))?;
        rest = &after_tag[4 + len..];
        if core::mem::replace(&mut seen[usize::from(tag)], true) {
            return Err(BlobError::Repeated(tag));
        }
        on(tag, body)?;
    }
    Ok(())
}

/// Reads a live auth change, checked as the boot blob is: the files parse
/// with the broker's own parsers, nothing else but `allow_anonymous` is
/// accepted, and a table is not both given and taken away.
pub fn read_auth(blob: &[u8]) -> Result<AuthUpdate, BlobError> {
    if blob.len() > MAX_AUTH_LEN {
        return Err(BlobError::TooLarge(blob.len()));
    }
    let mut update = AuthUpdate::default();
    each_record(blob, |tag, body| {
        let text = || core::str::from_utf8(body).map_err(|_| BlobError::NotUtf8(tag));
        let empty = || if body.is_empty() { Ok(()) } else { Err(BlobError::BadValue(tag)) };
        match tag {
            tag::PASSWORD_FILE | tag::NO_PASSWORD_FILE if update.passwords.is_some() => {
                return Err(BlobError::Repeated(tag));
            }
            tag::ACL_FILE | tag::NO_ACL_FILE if update.acl.is_some() => return Err(BlobError::Repeated(tag)),
            tag::PASSWORD_FILE => {
                update.passwords = Some(Some(PasswordFile::parse(text()?).map_err(BlobError::PasswordFile)?));
            }
            tag::ACL_FILE => update.acl = Some(Some(Acl::parse(text()?).map_err(BlobError::AclFile)?)),
            tag::NO_PASSWORD_FILE => {
                empty()?;
                update.passwords = Some(None);
            }
            tag::NO_ACL_FILE => {
                empty()?;
                update.acl = Some(None);
            }
            tag::ALLOW_ANONYMOUS => {
                let bytes: [u8; 8] = body.try_into().map_err(|_| BlobError::BadValue(tag))?;
                update.allow_anonymous = Some(flag(u64::from_le_bytes(bytes)).ok_or(BlobError::BadValue(tag))?);
            }
            other => return Err(BlobError::UnknownTag(other)),
        }
        Ok(())
    })?;
    Ok(update)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqvisor_broker::topic::TopicLimits;

    fn sample() -> Config {
        Config {
            max_connections: 7,
            max_packet_size: 4096,
            max_queued_messages: 9,
            max_queued_bytes: 4321,
            max_inflight: 3,
            receive_maximum: 5,
            topic_limits: TopicLimits { max_len: 100, max_levels: 4 },
            max_subscriptions_per_client: 11,
            max_qos: QoS::AtLeastOnce,
            retain_available: false,
            topic_alias_maximum: 2,
            max_keep_alive: Some(30),
            max_session_expiry: 3600,
            max_pending_output: 1234,
            sys_interval_ms: 0,
            connect_timeout_ms: 500,
            allow_anonymous: false,
            ..Config::default()
        }
    }

    /// Every field, through its `Debug` form (`Config` has no `PartialEq`).
    fn same(a: &Config, b: &Config) -> bool {
        alloc::format!("{a:?}") == alloc::format!("{b:?}")
    }

    #[test]
    fn every_setting_survives_the_round_trip() {
        let config = sample();
        let back = read(&write(&config, None, None)).unwrap();
        assert!(same(&config, &back), "{config:?}\n{back:?}");
        let defaults = read(&write(&Config::default(), None, None)).unwrap();
        assert!(same(&Config::default(), &defaults));
        // Every field has its own tag.
        let mut tags: Vec<u8> = FIELDS.iter().map(|f| f.tag).collect();
        tags.sort_unstable();
        tags.dedup();
        assert_eq!(tags.len(), FIELDS.len());
    }

    #[test]
    fn files_travel_as_text_and_are_parsed_by_the_reader() {
        let blob = write(&Config::default(), Some("alice:$6$c2FsdA==$aGFzaA==\n"), Some("topic read x/#\n"));
        let config = read(&blob).unwrap();
        assert!(config.passwords.is_some() && config.acl.is_some());
        let blob = write(&Config::default(), None, Some("bogus line\n"));
        assert!(matches!(read(&blob), Err(BlobError::AclFile(_))));
    }

    #[test]
    fn hostile_blobs_are_refused_with_a_reason() {
        let good = write(&sample(), None, None);
        assert_eq!(read(&[]).unwrap_err(), BlobError::Version(None));
        assert_eq!(read(&[2]).unwrap_err(), BlobError::Version(Some(2)));
        assert!(matches!(read(&good[..good.len() - 1]), Err(BlobError::Truncated(_))));
        assert!(matches!(read(&[1, 1, 0xff, 0xff, 0xff, 0xff]), Err(BlobError::Truncated(1))));
        let mut unknown = Vec::from([1]);
        record(&mut unknown, 0x7f, &0u64.to_le_bytes());
        assert_eq!(read(&unknown).unwrap_err(), BlobError::UnknownTag(0x7f));
        let mut twice = Vec::from([1]);
        record(&mut twice, 1, &5u64.to_le_bytes());
        record(&mut twice, 1, &5u64.to_le_bytes());
        assert_eq!(read(&twice).unwrap_err(), BlobError::Repeated(1));
        let mut short = Vec::from([1]);
        record(&mut short, 4, &[1, 0]);
        assert_eq!(read(&short).unwrap_err(), BlobError::BadValue(4));
        let mut too_big = Vec::from([1]);
        record(&mut too_big, 4, &70_000u64.to_le_bytes()); // max_inflight is a u16
        assert_eq!(read(&too_big).unwrap_err(), BlobError::BadValue(4));
        let mut not_text = Vec::from([1]);
        record(&mut not_text, tag::ACL_FILE, &[0xff]);
        assert_eq!(read(&not_text).unwrap_err(), BlobError::NotUtf8(tag::ACL_FILE));
        let invalid = write(&Config { max_inflight: 0, ..Config::default() }, None, None);
        assert_eq!(read(&invalid).unwrap_err(), BlobError::Invalid(ConfigError::ZeroWindow));
    }

    #[test]
    fn a_live_auth_change_round_trips_and_is_checked_as_the_boot_blob() {
        let passwd = "alice:$6$c2FsdA==$aGFzaA==\n";
        let change = AuthText { password_file: Some(Some(passwd)), acl_file: Some(None), allow_anonymous: Some(false) };
        let update = read_auth(&write_auth(&change)).unwrap();
        assert!(update.passwords.as_ref().unwrap().as_ref().unwrap().contains("alice"));
        assert_eq!((update.acl, update.allow_anonymous), (Some(None), Some(false)));
        let only_acl =
            read_auth(&write_auth(&AuthText { acl_file: Some(Some("topic read x\n")), ..AuthText::default() }));
        assert!(matches!(only_acl, Ok(AuthUpdate { passwords: None, acl: Some(Some(_)), allow_anonymous: None })));
        assert_eq!(read_auth(&write_auth(&AuthText::default())).unwrap(), AuthUpdate::default());
        // The same refusals as the boot blob's, with the line at fault.
        let bad = write_auth(&AuthText { acl_file: Some(Some("topic read x\nbogus\n")), ..AuthText::default() });
        assert!(matches!(read_auth(&bad), Err(BlobError::AclFile(FileError { line: 2, .. }))));
        let bad = write_auth(&AuthText { password_file: Some(Some("nobody\n")), ..AuthText::default() });
        assert!(matches!(read_auth(&bad), Err(BlobError::PasswordFile(_))));
        assert_eq!(read_auth(&[]).unwrap_err(), BlobError::Version(None));
        let full = write_auth(&change);
        assert!(matches!(read_auth(&full[..full.len() - 1]), Err(BlobError::Truncated(_))));
        // A broker setting other than allow_anonymous is no live change.
        let mut setting = Vec::from([1]);
        record(&mut setting, 1, &5u64.to_le_bytes());
        assert_eq!(read_auth(&setting).unwrap_err(), BlobError::UnknownTag(1));
        // A table given and taken away at once.
        let mut both = Vec::from([1]);
        record(&mut both, tag::ACL_FILE, b"topic read x\n");
        record(&mut both, tag::NO_ACL_FILE, &[]);
        assert_eq!(read_auth(&both).unwrap_err(), BlobError::Repeated(tag::NO_ACL_FILE));
        let mut not_empty = Vec::from([1]);
        record(&mut not_empty, tag::NO_PASSWORD_FILE, b"x");
        assert_eq!(read_auth(&not_empty).unwrap_err(), BlobError::BadValue(tag::NO_PASSWORD_FILE));
        let mut maybe = Vec::from([1]);
        record(&mut maybe, tag::ALLOW_ANONYMOUS, &2u64.to_le_bytes());
        assert_eq!(read_auth(&maybe).unwrap_err(), BlobError::BadValue(tag::ALLOW_ANONYMOUS));
        assert_eq!(read_auth(&alloc::vec![1u8; MAX_AUTH_LEN + 1]).unwrap_err(), BlobError::TooLarge(MAX_AUTH_LEN + 1));
    }
}
