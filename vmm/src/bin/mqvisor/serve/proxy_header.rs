//! The PROXY protocol version 2 header (HAProxy's `proxy-protocol.txt`,
//! section 2.2): the binary header a relaying node writes before a client's
//! bytes so that the owning node knows the client's real address.
//!
//! Owns encoding and checking that header, sans I/O: [`encode`] for TCP
//! over IPv4 or IPv6, [`parse`] from the bytes read so far. One TLV of
//! mqvisor's own ([`TLV_HANDED`], in the range the specification leaves to
//! applications, section 2.2.7) says what the client speaks: plain MQTT,
//! TLS, WebSockets; another ([`TLV_RELAY_KEY`]) carries the fleet's relay
//! key, without which the relay port takes no one; a third
//! ([`TLV_REPLICA`]) says the connection is no client but a tenant's state
//! shipped to its standby (`mqvisor::replica`). Never reads a socket, and never accepts a header
//! longer than [`MAX_HEADER`]: the length comes from the network; a TLV
//! that runs past the header is refused, not read.

use std::net::{IpAddr, SocketAddr};

/// The 12 bytes every version 2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The fixed part: signature, version and command, family, length.
pub const FIXED: usize = 16;
/// Offsets in the fixed part.
const VERSION_COMMAND: usize = 12;
const FAMILY: usize = 13;
const LENGTH: usize = 14;
/// Version 2, command PROXY (a relayed connection) or LOCAL (a health check).
const V2_PROXY: u8 = 0x21;
const V2_LOCAL: u8 = 0x20;
/// TCP over IPv4 and over IPv6.
const TCP4: u8 = 0x11;
const TCP6: u8 = 0x21;
/// Address block lengths for TCP over IPv4 and IPv6.
const ADDRESSES4: usize = 12;
const ADDRESSES6: usize = 36;
/// mqvisor's TLV: one byte, what the client speaks
/// (`mqvisor::net::ingress::Handed::to_byte`). 0xE0 is `PP2_TYPE_MIN_CUSTOM`.
pub const TLV_HANDED: u8 = 0xE0;
/// mqvisor's TLV: the fleet's relay key ([`RelayKey`]), the proof that a
/// relayed connection comes from a node of the fleet.
pub const TLV_RELAY_KEY: u8 = 0xE1;
/// The fleet's relay key: random bytes every node reads from etcd.
pub type RelayKey = [u8; 32];
/// mqvisor's TLV: the connection ships tenant state to its standby; the
/// value is the owner's epoch (8 bytes, little-endian) and the tenant's name.
pub const TLV_REPLICA: u8 = 0xE2;

/// Whose state a replica connection ships, and under which ownership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaOf {
    /// The etcd revision that created the owner's claim: a newer owner's
    /// shipments have a larger one.
    pub epoch: u64,
    pub tenant: String,
}

/// mqvisor's TLVs in a header.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Tlvs {
    /// What the client speaks ([`TLV_HANDED`]).
    pub handed: Option<u8>,
    /// The fleet's relay key ([`TLV_RELAY_KEY`]).
    pub key: Option<RelayKey>,
    /// A replica connection ([`TLV_REPLICA`]).
    pub replica: Option<ReplicaOf>,
}

/// Never the key: a header may be logged.
impl std::fmt::Debug for Tlvs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tlvs")
            .field("handed", &self.handed)
            .field("key", &self.key.map(|_| "(given)"))
            .field("replica", &self.replica)
            .finish()
    }
}

/// A TLV's type and length, before its value.
const TLV_HEAD: usize = 3;

/// The longest header accepted: the fixed part and the longest address
/// block of the specification (216 bytes, UNIX addresses), TLVs included.
pub const MAX_HEADER: usize = FIXED + 216;

/// What a header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Header {
    /// A relayed connection: the client's address, the one it reached,
    /// and mqvisor's TLVs.
    Proxy { source: SocketAddr, destination: SocketAddr, tlvs: Tlvs },
    /// No client behind it (a health check) or a family not carried here.
    Local,
}

/// Why bytes are no header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("not a PROXY protocol v2 header")]
    NotV2,
    #[error("a PROXY v2 header of {0} bytes (at most {MAX_HEADER})")]
    TooLong(usize),
    #[error("a PROXY v2 address block too short for its family")]
    Short,
    #[error("a PROXY v2 TLV that runs past the header")]
    Tlv,
}

/// The header for a client at `source` that reached `destination`; both of
/// one family (an IPv4 address in IPv6 form is written as IPv4), with
/// `tlvs`.
pub fn encode(source: SocketAddr, destination: SocketAddr, tlvs: &Tlvs) -> Vec<u8> {
    let mut tlv_bytes = Vec::new();
    let mut tlv = |kind: u8, value: &[u8]| {
        tlv_bytes.push(kind);
        tlv_bytes.extend_from_slice(&u16::try_from(value.len()).unwrap_or(0).to_be_bytes());
        tlv_bytes.extend_from_slice(value);
    };
    if let Some(byte) = tlvs.handed {
        tlv(TLV_HANDED, &[byte]);
    }
    if let Some(key) = &tlvs.key {
        tlv(TLV_RELAY_KEY, key);
    }
    if let Some(replica) = &tlvs.replica {
        let mut value = replica.epoch.to_le_bytes().to_vec();
        value.extend_from_slice(replica.tenant.as_bytes());
        tlv(TLV_REPLICA, &value);
    }
    let tlvs = tlv_bytes.len();
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (source, destination) = (canonical(source), canonical(destination));
    let mut out = SIGNATURE.to_vec();
    match (source.ip(), destination.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.extend_from_slice(&[V2_PROXY, TCP4]);
            out.extend_from_slice(&u16::try_from(ADDRESSES4 + tlvs).unwrap_or(0).to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.extend_from_slice(&[V2_PROXY, TCP6]);
            out.extend_from_slice(&u16::try_from(ADDRESSES6 + tlvs).unwrap_or(0).to_be_bytes());
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
        }
    }
    out.extend_from_slice(&source.port().to_be_bytes());
    out.extend_from_slice(&destination.port().to_be_bytes());
    out.extend_from_slice(&tlv_bytes);
    out
}

/// mqvisor's TLVs among `tlvs` (the bytes after the addresses); a TLV
/// running past them is an error, one of ours of the wrong shape is
/// ignored.
fn mqvisor_tlvs(mut tlvs: &[u8]) -> Result<Tlvs, HeaderError> {
    let mut found = Tlvs::default();
    while !tlvs.is_empty() {
        let head = tlvs.get(..TLV_HEAD).ok_or(HeaderError::Tlv)?;
        let len = usize::from(u16::from_be_bytes([head[1], head[2]]));
        let value = tlvs.get(TLV_HEAD..TLV_HEAD + len).ok_or(HeaderError::Tlv)?;
        match head[0] {
            TLV_HANDED if len == 1 => found.handed = Some(value[0]),
            TLV_RELAY_KEY => found.key = RelayKey::try_from(value).ok(),
            TLV_REPLICA if len > 8 => {
                let (epoch, tenant) = value.split_at(8);
                found.replica = std::str::from_utf8(tenant).ok().map(|tenant| ReplicaOf {
                    epoch: u64::from_le_bytes(epoch.try_into().unwrap_or_default()),
                    tenant: tenant.to_string(),
                });
            }
            _ => {}
        }
        tlvs = &tlvs[TLV_HEAD + len..];
    }
    Ok(found)
}

/// How long the whole header is, from its fixed part (`bytes` holding at
/// least [`FIXED`] bytes): checked against [`MAX_HEADER`] before anything
/// more is read.
pub fn length(bytes: &[u8]) -> Result<usize, HeaderError> {
    let fixed = bytes.get(..FIXED).ok_or(HeaderError::NotV2)?;
    if fixed[..SIGNATURE.len()] != SIGNATURE || !matches!(fixed[VERSION_COMMAND], V2_PROXY | V2_LOCAL) {
        return Err(HeaderError::NotV2);
    }
    let total = FIXED + usize::from(u16::from_be_bytes([fixed[LENGTH], fixed[LENGTH + 1]]));
    if total > MAX_HEADER {
        return Err(HeaderError::TooLong(total));
    }
    Ok(total)
}

/// The header in `bytes` (exactly the [`length`] it announces).
pub fn parse(bytes: &[u8]) -> Result<Header, HeaderError> {
    let total = length(bytes)?;
    let block = bytes.get(FIXED..total).ok_or(HeaderError::Short)?;
    if bytes[VERSION_COMMAND] == V2_LOCAL {
        return Ok(Header::Local);
    }
    let port = |at: usize| u16::from_be_bytes([block[at], block[at + 1]]);
    match bytes[FAMILY] {
        TCP4 if block.len() >= ADDRESSES4 => {
            let ip = |at: usize| IpAddr::from([block[at], block[at + 1], block[at + 2], block[at + 3]]);
            Ok(Header::Proxy {
                source: SocketAddr::new(ip(0), port(8)),
                destination: SocketAddr::new(ip(4), port(10)),
                tlvs: mqvisor_tlvs(&block[ADDRESSES4..])?,
            })
        }
        TCP6 if block.len() >= ADDRESSES6 => {
            let ip = |at: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&block[at..at + 16]);
                IpAddr::from(octets).to_canonical()
            };
            Ok(Header::Proxy {
                source: SocketAddr::new(ip(0), port(32)),
                destination: SocketAddr::new(ip(16), port(34)),
                tlvs: mqvisor_tlvs(&block[ADDRESSES6..])?,
            })
        }
        TCP4 | TCP6 => Err(HeaderError::Short),
        // UDP, UNIX or unspecified: nothing this daemon relays.
        _ => Ok(Header::Local),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handed(byte: u8) -> Tlvs {
        Tlvs { handed: Some(byte), ..Tlvs::default() }
    }

    #[test]
    fn golden_ipv4_header() {
        let source: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        let destination: SocketAddr = "198.51.100.2:1883".parse().unwrap();
        let bytes = encode(source, destination, &Tlvs::default());
        let mut golden = SIGNATURE.to_vec();
        golden.extend_from_slice(&[0x21, 0x11, 0, 12, 192, 0, 2, 1, 198, 51, 100, 2, 0x13, 0x88, 0x07, 0x5b]);
        assert_eq!(bytes, golden);
        assert_eq!(length(&bytes), Ok(28));
        assert_eq!(parse(&bytes), Ok(Header::Proxy { source, destination, tlvs: Tlvs::default() }));
        // With what the client speaks: one TLV more, counted in the length.
        let bytes = encode(source, destination, &handed(3));
        golden[15] = 16;
        golden.extend_from_slice(&[0xe0, 0, 1, 3]);
        assert_eq!(bytes, golden);
        assert_eq!(parse(&bytes), Ok(Header::Proxy { source, destination, tlvs: handed(3) }));
        // And the relay key: 35 bytes more.
        let key = [7u8; 32];
        let bytes = encode(source, destination, &Tlvs { key: Some(key), ..handed(3) });
        golden[15] = 16 + 35;
        golden.extend_from_slice(&[0xe1, 0, 32]);
        golden.extend_from_slice(&key);
        assert_eq!(bytes, golden);
        assert_eq!(
            parse(&bytes),
            Ok(Header::Proxy { source, destination, tlvs: Tlvs { key: Some(key), ..handed(3) } })
        );
        assert!(!format!("{:?}", parse(&bytes).unwrap()).contains("7, 7"), "a logged header shows no key");
    }

    #[test]
    fn a_replica_header_round_trips() {
        let (source, destination) = ("1.2.3.4:1".parse().unwrap(), "5.6.7.8:2".parse().unwrap());
        let replica = ReplicaOf { epoch: 1234, tenant: "acme".into() };
        let tlvs = Tlvs { handed: None, key: Some([1; 32]), replica: Some(replica) };
        assert_eq!(parse(&encode(source, destination, &tlvs)), Ok(Header::Proxy { source, destination, tlvs }));
    }

    #[test]
    fn a_relay_key_of_another_length_is_no_key() {
        let (source, destination) = ("1.2.3.4:1".parse().unwrap(), "5.6.7.8:2".parse().unwrap());
        let mut bytes = encode(source, destination, &Tlvs::default());
        bytes[LENGTH + 1] += 3 + 31;
        bytes.extend_from_slice(&[0xe1, 0, 31]);
        bytes.extend_from_slice(&[7u8; 31]);
        assert_eq!(parse(&bytes), Ok(Header::Proxy { source, destination, tlvs: Tlvs::default() }));
    }

    #[test]
    fn ipv6_round_trips_and_mixed_families_are_ipv6() {
        let source: SocketAddr = "[2001:db8::1]:40000".parse().unwrap();
        let destination: SocketAddr = "10.0.0.1:1883".parse().unwrap();
        let bytes = encode(source, destination, &handed(1));
        assert_eq!(bytes.len(), FIXED + ADDRESSES6 + 4);
        assert_eq!(parse(&bytes), Ok(Header::Proxy { source, destination, tlvs: handed(1) }));
    }

    #[test]
    fn bad_headers_are_refused_before_their_length_is_trusted() {
        assert_eq!(length(b"MQTT"), Err(HeaderError::NotV2));
        let mut bytes = encode("1.2.3.4:1".parse().unwrap(), "5.6.7.8:2".parse().unwrap(), &Tlvs::default());
        bytes[LENGTH] = 0xff;
        assert_eq!(length(&bytes), Err(HeaderError::TooLong(FIXED + 0xff0c)));
        let mut short = encode("1.2.3.4:1".parse().unwrap(), "5.6.7.8:2".parse().unwrap(), &Tlvs::default());
        short[LENGTH + 1] = 4;
        assert_eq!(parse(&short[..FIXED + 4]), Err(HeaderError::Short));
        let mut v1 = short.clone();
        v1[VERSION_COMMAND] = 0x11;
        assert_eq!(length(&v1), Err(HeaderError::NotV2));
        // A TLV whose length runs past the header.
        let mut tlv = encode("1.2.3.4:1".parse().unwrap(), "5.6.7.8:2".parse().unwrap(), &handed(0));
        tlv[FIXED + ADDRESSES4 + 2] = 9;
        assert_eq!(parse(&tlv), Err(HeaderError::Tlv));
        let mut local = SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(parse(&local), Ok(Header::Local));
    }
}
