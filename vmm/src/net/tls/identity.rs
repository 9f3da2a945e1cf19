//! The user name a client certificate stands for: the first common name (CN,
//! OID 2.5.4.3) of its subject, as Mosquitto's `use_identity_as_username`.
//!
//! Owns: a minimal DER walk of X.509 (RFC 5280 §4.1) from the certificate to
//! its subject's attributes, and the checks that make a CN a user name
//! (MQTT 5 §1.5.4: UTF-8, no U+0000, at most 65,535 bytes; here also no
//! control characters). A full X.509 parser would double this crate's TLS
//! build time for one field; the certificate has already been verified by
//! webpki when this reads it.
//!
//! Must never: panic or read past the input on any bytes, take a name from
//! anywhere but the subject (not the issuer, not an extension), or turn a
//! certificate without a usable CN into an empty or guessed user name.

use rustls::pki_types::CertificateDer;
use rustls::server::ServerConnection;

/// DER tags met on the way (X.690 §8).
const TAG_INTEGER: u8 = 0x02;
const TAG_OID: u8 = 0x06;
const TAG_SEQUENCE: u8 = 0x30;
const TAG_SET: u8 = 0x31;
/// `[0] EXPLICIT Version` of `TBSCertificate`.
const TAG_VERSION: u8 = 0xa0;
/// String types a `DirectoryString` may use (RFC 5280 §4.1.2.4).
const TAG_UTF8_STRING: u8 = 0x0c;
const TAG_PRINTABLE_STRING: u8 = 0x13;
const TAG_IA5_STRING: u8 = 0x16;
const TAG_BMP_STRING: u8 = 0x1e;
/// The DER contents of OID 2.5.4.3, id-at-commonName.
const OID_COMMON_NAME: [u8; 3] = [0x55, 0x04, 0x03];
/// Longest MQTT UTF-8 string (a two-byte length).
const MAX_USER_NAME: usize = 65_535;

/// Why a client's certificate gives no user name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("the client presented no certificate")]
    NoCertificate,
    #[error("the client certificate could not be read (DER)")]
    Malformed,
    #[error("the client certificate's subject has no common name (CN)")]
    NoCommonName,
    #[error(
        "the client certificate's common name uses a string type other than UTF8String, PrintableString, IA5String or BMPString"
    )]
    UnsupportedString,
    #[error(
        "the client certificate's common name is not a usable MQTT user name (empty, bad encoding, a control character, or too long)"
    )]
    BadCommonName,
}

/// The user name of a connection's verified client certificate.
///
/// Call it once the handshake is done, on a connection whose config requires
/// client certificates ([`super::TlsFiles::client_ca`]): only then is the
/// certificate verified.
pub fn identity_user_name(conn: &ServerConnection) -> Result<String, IdentityError> {
    let cert = conn.peer_certificates().and_then(|chain| chain.first()).ok_or(IdentityError::NoCertificate)?;
    common_name(cert)
}

/// The first common name in a DER certificate's subject.
pub fn common_name(cert: &CertificateDer<'_>) -> Result<String, IdentityError> {
    let subject = subject(cert.as_ref()).ok_or(IdentityError::Malformed)?;
    let (tag, value) = first_common_name(subject)?;
    let name = decode_string(tag, value)?;
    let usable = !name.is_empty() && name.len() <= MAX_USER_NAME && !name.chars().any(char::is_control);
    if usable { Ok(name) } else { Err(IdentityError::BadCommonName) }
}

/// `Certificate` → `tbsCertificate` → `subject` (the contents of its
/// `Name` SEQUENCE).
fn subject(cert: &[u8]) -> Option<&[u8]> {
    let (certificate, _) = expect(cert, TAG_SEQUENCE)?;
    let (tbs, _) = expect(certificate, TAG_SEQUENCE)?;
    let (tag, _, after) = tlv(tbs)?;
    let rest = if tag == TAG_VERSION { after } else { tbs };
    let (_serial, rest) = expect(rest, TAG_INTEGER)?;
    let (_signature, rest) = expect(rest, TAG_SEQUENCE)?;
    let (_issuer, rest) = expect(rest, TAG_SEQUENCE)?;
    let (_validity, rest) = expect(rest, TAG_SEQUENCE)?;
    let (subject, _) = expect(rest, TAG_SEQUENCE)?;
    Some(subject)
}

/// The tag and contents of the first CN value in a `Name`: a SEQUENCE OF
/// `RelativeDistinguishedName` (a SET OF `AttributeTypeAndValue`).
fn first_common_name(mut rdns: &[u8]) -> Result<(u8, &[u8]), IdentityError> {
    while !rdns.is_empty() {
        let (mut rdn, rest) = expect(rdns, TAG_SET).ok_or(IdentityError::Malformed)?;
        rdns = rest;
        while !rdn.is_empty() {
            let (attribute, rest) = expect(rdn, TAG_SEQUENCE).ok_or(IdentityError::Malformed)?;
            rdn = rest;
            let (oid, value) = expect(attribute, TAG_OID).ok_or(IdentityError::Malformed)?;
            if oid == OID_COMMON_NAME {
                let (tag, value, _) = tlv(value).ok_or(IdentityError::Malformed)?;
                return Ok((tag, value));
            }
        }
    }
    Err(IdentityError::NoCommonName)
}

fn decode_string(tag: u8, value: &[u8]) -> Result<String, IdentityError> {
    match tag {
        TAG_UTF8_STRING => String::from_utf8(value.to_vec()).map_err(|_| IdentityError::BadCommonName),
        TAG_PRINTABLE_STRING | TAG_IA5_STRING if value.is_ascii() => {
            Ok(value.iter().copied().map(char::from).collect())
        }
        TAG_PRINTABLE_STRING | TAG_IA5_STRING => Err(IdentityError::BadCommonName),
        TAG_BMP_STRING => {
            let pairs = value.chunks_exact(2);
            if !pairs.remainder().is_empty() {
                return Err(IdentityError::BadCommonName);
            }
            let units = pairs.map(|pair| u16::from_be_bytes([pair[0], pair[1]]));
            char::decode_utf16(units).collect::<Result<String, _>>().map_err(|_| IdentityError::BadCommonName)
        }
        _ => Err(IdentityError::UnsupportedString),
    }
}

/// The contents of a TLV with tag `tag` at the start of `input`, and what
/// follows it.
fn expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (found, contents, rest) = tlv(input)?;
    (found == tag).then_some((contents, rest))
}

/// One DER tag-length-value: its tag, its contents and what follows it.
/// Only single-byte tags and definite lengths of up to four bytes, which is
/// all a certificate's path to its subject uses.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let (bytes, rest) = rest.split_at(count);
        (bytes.iter().fold(0usize, |len, &byte| (len << 8) | usize::from(byte)), rest)
    };
    if rest.len() < len {
        return None;
    }
    let (contents, rest) = rest.split_at(len);
    Some((tag, contents, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tlv_refuses_what_it_cannot_bound() {
        assert_eq!(tlv(&[]), None);
        assert_eq!(tlv(&[0x30]), None);
        assert_eq!(tlv(&[0x30, 0x80]), None, "indefinite length");
        assert_eq!(tlv(&[0x30, 0x85, 1, 1, 1, 1, 1]), None, "five length bytes");
        assert_eq!(tlv(&[0x30, 0x82, 0x01]), None, "length cut short");
        assert_eq!(tlv(&[0x30, 0x03, 1, 2]), None, "contents cut short");
        assert_eq!(tlv(&[0x1f, 0x01, 0]), None, "multi-byte tag");
        assert_eq!(tlv(&[0x30, 0x81, 0x01, 7, 8]), Some((0x30, &[7u8][..], &[8u8][..])));
    }

    #[test]
    fn strings_decode_or_refuse() {
        assert_eq!(decode_string(TAG_UTF8_STRING, "Zoë".as_bytes()), Ok("Zoë".into()));
        assert_eq!(decode_string(TAG_UTF8_STRING, &[0xff]), Err(IdentityError::BadCommonName));
        assert_eq!(decode_string(TAG_PRINTABLE_STRING, b"alice"), Ok("alice".into()));
        assert_eq!(decode_string(TAG_IA5_STRING, &[0xe9]), Err(IdentityError::BadCommonName));
        assert_eq!(decode_string(TAG_BMP_STRING, &[0x00, 0x5a, 0x00, 0xeb]), Ok("Zë".into()));
        assert_eq!(decode_string(TAG_BMP_STRING, &[0x00]), Err(IdentityError::BadCommonName));
        assert_eq!(decode_string(TAG_BMP_STRING, &[0xd8, 0x00]), Err(IdentityError::BadCommonName), "lone surrogate");
        assert_eq!(decode_string(0x14, b"teletex"), Err(IdentityError::UnsupportedString));
    }

    #[test]
    fn garbage_is_malformed_and_never_panics() {
        for len in 0u8..64 {
            let bytes: Vec<u8> = (0..len).map(|i| i.wrapping_mul(37).wrapping_add(0x30)).collect();
            assert!(common_name(&CertificateDer::from(bytes)).is_err());
        }
        let truncated = [0x30, 0x82, 0x10, 0x00, 0x30];
        assert_eq!(common_name(&CertificateDer::from(&truncated[..])), Err(IdentityError::Malformed));
    }
}
