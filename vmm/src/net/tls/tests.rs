//! TLS settings against a real rustls client, in memory. Certificates are
//! made here by rcgen; the RSA and SEC1 keys in `testdata/` were made with
//! openssl for these tests only (ring cannot generate RSA keys).

mod hello;

use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, ConnectionCommon, ProtocolVersion, RootCertStore, ServerConnection};

use super::identity::{IdentityError, common_name, identity_user_name};
use super::{Alpn, MAX_PEM_FILE, ServerTls, TlsError, TlsFiles, load_server_config, provider};

const HOST: &str = "acme.mqtt.example";

/// A folder of test files, removed when dropped.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("mqvisor-tls-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    fn write(&self, name: &str, text: impl AsRef<[u8]>) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A certificate authority: its certificate and what signs with its key.
struct Ca {
    cert: rcgen::Certificate,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key).unwrap();
    Ca { cert, issuer: Issuer::new(params, key) }
}

/// A server certificate for [`HOST`] with `key`, signed by `ca`.
fn server_cert(ca: &Ca, key: &KeyPair) -> rcgen::Certificate {
    CertificateParams::new(vec![HOST.to_string()]).unwrap().signed_by(key, &ca.issuer).unwrap()
}

/// A client certificate whose subject's CN is `cn` (none if `None`).
fn client_cert(ca: &Ca, key: &KeyPair, cn: Option<DnValue>) -> rcgen::Certificate {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::OrganizationName, "Acme");
    if let Some(cn) = cn {
        params.distinguished_name.push(DnType::CommonName, cn);
    }
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.signed_by(key, &ca.issuer).unwrap()
}

/// A client certificate and its key, as a rustls client takes them.
fn identity(cert: rcgen::Certificate, key: &KeyPair) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    (cert.der().clone(), PrivateKeyDer::try_from(key.serialize_der()).unwrap())
}

/// Files for a server of `ca` with a fresh P-256 key.
fn server_files(dir: &Dir, ca: &Ca, alpn: Alpn) -> TlsFiles {
    let key = KeyPair::generate().unwrap();
    let cert = server_cert(ca, &key);
    TlsFiles {
        cert: dir.write("cert.pem", cert.pem()),
        key: dir.write("key.pem", key.serialize_pem()),
        client_ca: None,
        alpn,
        named: None,
    }
}

struct Client<'a> {
    trust: &'a Ca,
    versions: &'static [&'static rustls::SupportedProtocolVersion],
    alpn: &'a [&'a [u8]],
    cert: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
    sni: bool,
}

impl<'a> Client<'a> {
    fn new(trust: &'a Ca) -> Self {
        Client { trust, versions: rustls::ALL_VERSIONS, alpn: &[b"mqtt"], cert: None, sni: true }
    }

    fn connect(self) -> ClientConnection {
        let mut roots = RootCertStore::empty();
        roots.add(self.trust.cert.der().clone()).unwrap();
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(self.versions)
            .unwrap()
            .with_root_certificates(roots);
        let mut config = match self.cert {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => builder.with_client_auth_cert(vec![cert], key).unwrap(),
        };
        config.alpn_protocols = self.alpn.iter().map(|id| id.to_vec()).collect();
        config.enable_sni = self.sni;
        ClientConnection::new(Arc::new(config), ServerName::try_from(HOST).unwrap()).unwrap()
    }
}

#[derive(Debug, PartialEq)]
enum Failed {
    Client(rustls::Error),
    Server(rustls::Error),
}

/// Moves what `from` has to send into `to`; tells whether anything moved.
fn send<A, B>(from: &mut ConnectionCommon<A>, to: &mut ConnectionCommon<B>) -> Result<bool, rustls::Error> {
    let mut bytes = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut bytes).unwrap();
    }
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        to.read_tls(&mut rest).unwrap();
    }
    to.process_new_packets()?;
    Ok(!bytes.is_empty())
}

/// Runs the handshake to its end, or to the first side that fails.
fn handshake(client: &mut ClientConnection, server: &mut ServerConnection) -> Result<(), Failed> {
    loop {
        let to_server = send(client, server).map_err(Failed::Server)?;
        let to_client = send(server, client).map_err(Failed::Client)?;
        if !to_server && !to_client {
            return Ok(());
        }
    }
}

/// A handshake with `tls`'s config in force, then one message each way.
fn connect(tls: &ServerTls, client: Client<'_>) -> Result<(ClientConnection, ServerConnection), Failed> {
    let mut client = client.connect();
    let mut server = tls.new_connection().unwrap();
    handshake(&mut client, &mut server)?;
    assert!(!client.is_handshaking() && !server.is_handshaking());
    exchange(&mut client, &mut server);
    Ok((client, server))
}

fn exchange(client: &mut ClientConnection, server: &mut ServerConnection) {
    use std::io::{Read, Write};
    client.writer().write_all(b"\x10CONNECT").unwrap();
    send(client, server).unwrap();
    let mut got = [0u8; 8];
    server.reader().read_exact(&mut got).unwrap();
    assert_eq!(&got, b"\x10CONNECT");
    server.writer().write_all(b"\x20CONNACK").unwrap();
    send(server, client).unwrap();
    let mut got = [0u8; 8];
    client.reader().read_exact(&mut got).unwrap();
    assert_eq!(&got, b"\x20CONNACK");
}

static TLS13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
static TLS12: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];

#[test]
fn tls_13_and_12_with_alpn_mqtt_or_none() {
    let dir = Dir::new("versions");
    let ca = ca("versions CA");
    let tls = ServerTls::load(server_files(&dir, &ca, Alpn::Mqtt)).unwrap();
    for (versions, expected) in [(TLS13, ProtocolVersion::TLSv1_3), (TLS12, ProtocolVersion::TLSv1_2)] {
        for (alpn, negotiated) in [(&[&b"mqtt"[..]][..], Some(&b"mqtt"[..])), (&[], None)] {
            let (client, server) = connect(&tls, Client { versions, alpn, ..Client::new(&ca) }).unwrap();
            assert_eq!(server.protocol_version(), Some(expected));
            assert_eq!(server.alpn_protocol(), negotiated);
            assert_eq!(client.alpn_protocol(), negotiated);
        }
    }
}

#[test]
fn a_client_offering_only_other_protocols_is_refused() {
    let dir = Dir::new("alpn");
    let ca = ca("alpn CA");
    let mqtt = ServerTls::load(server_files(&dir, &ca, Alpn::Mqtt)).unwrap();
    let refused = connect(&mqtt, Client { alpn: &[b"http/1.1"], ..Client::new(&ca) }).unwrap_err();
    assert_eq!(refused, Failed::Server(rustls::Error::NoApplicationProtocol));
    // A secure WebSocket listener takes what browsers offer.
    let ws = ServerTls::load(TlsFiles { alpn: Alpn::Http11, ..mqtt.files().clone() }).unwrap();
    let (_, server) = connect(&ws, Client { alpn: &[b"h2", b"http/1.1"], ..Client::new(&ca) }).unwrap();
    assert_eq!(server.alpn_protocol(), Some(&b"http/1.1"[..]));
}

#[test]
fn rsa_ec_and_ed25519_keys_in_pkcs8_pkcs1_and_sec1() {
    let dir = Dir::new("keys");
    let ca = ca("keys CA");
    let rsa_pkcs8 = include_str!("testdata/rsa2048.pkcs8.pem");
    let p256_pkcs8 = include_str!("testdata/p256.pkcs8.pem");
    let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap().serialize_pem();
    let ed25519 = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap().serialize_pem();
    // What the test signs with (PKCS#8), and the key file the server reads.
    let cases = [
        ("RSA, PKCS#8", rsa_pkcs8, rsa_pkcs8),
        ("RSA, PKCS#1", rsa_pkcs8, include_str!("testdata/rsa2048.pkcs1.pem")),
        ("P-256, PKCS#8", p256_pkcs8, p256_pkcs8),
        ("P-256, SEC1", p256_pkcs8, include_str!("testdata/p256.sec1.pem")),
        ("P-384, PKCS#8", &p384, &p384),
        ("Ed25519, PKCS#8", &ed25519, &ed25519),
    ];
    for (what, pkcs8, key_file) in cases {
        let key = if what.starts_with("RSA") {
            KeyPair::from_pkcs8_pem_and_sign_algo(pkcs8, &rcgen::PKCS_RSA_SHA256).unwrap()
        } else {
            KeyPair::from_pem(pkcs8).unwrap()
        };
        let files = TlsFiles {
            cert: dir.write("cert.pem", server_cert(&ca, &key).pem()),
            key: dir.write("key.pem", key_file),
            client_ca: None,
            alpn: Alpn::Mqtt,
            named: None,
        };
        let tls = ServerTls::load(files).unwrap_or_else(|error| panic!("{what}: {error}"));
        for versions in [TLS13, TLS12] {
            connect(&tls, Client { versions, ..Client::new(&ca) }).unwrap_or_else(|error| panic!("{what}: {error:?}"));
        }
    }
}

#[test]
fn a_chain_with_an_intermediate_is_served_whole() {
    let dir = Dir::new("chain");
    let root = ca("root CA");
    let intermediate_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, "intermediate CA");
    let intermediate_cert = params.signed_by(&intermediate_key, &root.issuer).unwrap();
    let intermediate = Ca { cert: intermediate_cert, issuer: Issuer::new(params, intermediate_key) };
    let key = KeyPair::generate().unwrap();
    let leaf = server_cert(&intermediate, &key);
    let files = TlsFiles {
        cert: dir.write("chain.pem", leaf.pem() + &intermediate.cert.pem()),
        key: dir.write("key.pem", key.serialize_pem()),
        client_ca: None,
        alpn: Alpn::Mqtt,
        named: None,
    };
    connect(&ServerTls::load(files).unwrap(), Client::new(&root)).unwrap();
}

#[test]
fn each_bad_file_is_one_line_naming_it_and_the_problem() {
    let dir = Dir::new("errors");
    let ca = ca("errors CA");
    let good = server_files(&dir, &ca, Alpn::Mqtt);
    let other_key = dir.write("other-key.pem", KeyPair::generate().unwrap().serialize_pem());
    let cert_text = std::fs::read_to_string(&good.cert).unwrap();
    let key_text = std::fs::read_to_string(&good.key).unwrap();
    let junk_cert = "-----BEGIN CERTIFICATE-----\nAAECAwQF\n-----END CERTIFICATE-----\n";
    let cases: Vec<(TlsFiles, PathBuf, &str)> = vec![
        (TlsFiles { cert: dir.0.join("absent.pem"), ..good.clone() }, dir.0.join("absent.pem"), "no such file"),
        (TlsFiles { key: dir.0.clone(), ..good.clone() }, dir.0.clone(), "cannot read"),
        (TlsFiles { cert: good.key.clone(), ..good.clone() }, good.key.clone(), "no certificate"),
        (TlsFiles { key: good.cert.clone(), ..good.clone() }, good.cert.clone(), "no private key"),
        (
            TlsFiles { cert: dir.write("junk.pem", junk_cert), ..good.clone() },
            dir.0.join("junk.pem"),
            "not a valid X.509",
        ),
        (
            TlsFiles { key: other_key.clone(), ..good.clone() },
            other_key.clone(),
            "does not match the first certificate",
        ),
        (
            TlsFiles { key: dir.write("two.pem", key_text.clone() + &key_text), ..good.clone() },
            dir.0.join("two.pem"),
            "more than one private key",
        ),
        (
            TlsFiles {
                key: dir.write(
                    "enc.pem",
                    "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
                ),
                ..good.clone()
            },
            dir.0.join("enc.pem"),
            "encrypted",
        ),
        (
            TlsFiles { cert: dir.write("cut.pem", &cert_text[..cert_text.len() / 2]), ..good.clone() },
            dir.0.join("cut.pem"),
            "not valid PEM",
        ),
        (TlsFiles { client_ca: Some(good.key.clone()), ..good.clone() }, good.key.clone(), "no certificate"),
        (
            TlsFiles { client_ca: Some(dir.write("junk-ca.pem", junk_cert)), ..good.clone() },
            dir.0.join("junk-ca.pem"),
            "not a usable CA certificate",
        ),
    ];
    for (files, path, problem) in cases {
        let message = load_server_config(&files).map(|_| ()).unwrap_err().to_string();
        assert!(message.starts_with(&format!("{}: ", path.display())), "{message}");
        assert!(message.contains(problem), "{message} (expected: {problem})");
        assert!(!message.contains('\n'), "{message}");
    }
    assert!(load_server_config(&good).is_ok());
}

#[test]
fn mutual_tls_requires_a_certificate_of_the_client_ca_and_names_its_user() {
    let dir = Dir::new("mutual");
    let ca = ca("clients CA");
    let stranger_ca = self::ca("stranger CA");
    let mut files = server_files(&dir, &ca, Alpn::Mqtt);
    let plain = ServerTls::load(files.clone()).unwrap();
    files.client_ca = Some(dir.write("clients-ca.pem", ca.cert.pem()));
    let tls = ServerTls::load(files).unwrap();

    let key = KeyPair::generate().unwrap();
    let alice = identity(client_cert(&ca, &key, Some(DnValue::Utf8String("alice".into()))), &key);
    for versions in [TLS13, TLS12] {
        let client = Client { versions, cert: Some((alice.0.clone(), alice.1.clone_key())), ..Client::new(&ca) };
        let (_, server) = connect(&tls, client).unwrap();
        assert_eq!(identity_user_name(&server), Ok("alice".to_string()));
    }

    let refused = connect(&tls, Client::new(&ca)).unwrap_err();
    assert_eq!(refused, Failed::Server(rustls::Error::NoCertificatesPresented));
    let key = KeyPair::generate().unwrap();
    let mallory = client_cert(&stranger_ca, &key, Some(DnValue::Utf8String("alice".into())));
    let refused = connect(&tls, Client { cert: Some(identity(mallory, &key)), ..Client::new(&ca) }).unwrap_err();
    assert!(matches!(refused, Failed::Server(rustls::Error::InvalidCertificate(_))), "{refused:?}");

    // Without a client CA no certificate is asked for, so none names a user.
    let (_, server) = connect(&plain, Client::new(&ca)).unwrap();
    assert_eq!(identity_user_name(&server), Err(IdentityError::NoCertificate));
}

#[test]
fn the_common_name_in_each_string_type() {
    let ca = ca("names CA");
    let key = KeyPair::generate().unwrap();
    let cases = [
        (Some(DnValue::Utf8String("Zoë".into())), Ok("Zoë".to_string())),
        (Some(DnValue::PrintableString("device 42".try_into().unwrap())), Ok("device 42".to_string())),
        (Some(DnValue::Ia5String("dev@acme".try_into().unwrap())), Ok("dev@acme".to_string())),
        (Some(DnValue::BmpString("Zoë".try_into().unwrap())), Ok("Zoë".to_string())),
        (Some(DnValue::Utf8String("a\nb".into())), Err(IdentityError::BadCommonName)),
        (Some(DnValue::Utf8String("a\0b".into())), Err(IdentityError::BadCommonName)),
        (None, Err(IdentityError::NoCommonName)),
    ];
    for (cn, expected) in cases {
        let cert = client_cert(&ca, &key, cn.clone());
        assert_eq!(common_name(cert.der()), expected, "{cn:?}");
    }
    // The issuer's CN is never taken for the subject's.
    assert_eq!(common_name(ca.cert.der()), Ok("names CA".to_string()));
    assert_eq!(common_name(&CertificateDer::from(&b"\x30\x03\x30\x01\x00"[..])), Err(IdentityError::Malformed));
}

#[test]
fn reload_serves_new_handshakes_with_the_new_files_and_keeps_old_connections() {
    let dir = Dir::new("reload");
    let old_ca = ca("old CA");
    let new_ca = ca("new CA");
    let files = server_files(&dir, &old_ca, Alpn::Mqtt);
    let tls = ServerTls::load(files.clone()).unwrap();
    let (mut old_client, mut old_server) = connect(&tls, Client::new(&old_ca)).unwrap();
    let before = tls.config();

    // A bad new key: the error names it, and the old settings stay.
    std::fs::write(&files.key, "not a key").unwrap();
    let error = tls.reload().unwrap_err();
    assert!(matches!(error, TlsError::NoKey { .. }), "{error}");
    assert!(Arc::ptr_eq(&before, &tls.config()));
    connect(&tls, Client::new(&old_ca)).unwrap();

    // The rotated certificate: new handshakes get it, old connections go on.
    let key = KeyPair::generate().unwrap();
    std::fs::write(&files.cert, server_cert(&new_ca, &key).pem()).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();
    tls.reload().unwrap();
    assert!(!Arc::ptr_eq(&before, &tls.config()));
    connect(&tls, Client::new(&new_ca)).unwrap();
    let refused = connect(&tls, Client::new(&old_ca)).unwrap_err();
    assert!(matches!(refused, Failed::Client(rustls::Error::InvalidCertificate(_))), "{refused:?}");
    exchange(&mut old_client, &mut old_server);
}

/// A certificate path that became a FIFO, a device or a huge file is refused
/// at once: a reload must neither block nor fill the memory.
#[test]
fn a_fifo_a_device_or_a_huge_file_is_refused_without_blocking() {
    let dir = Dir::new("special");
    let files = server_files(&dir, &ca("CA"), Alpn::Mqtt);
    let tls = ServerTls::load(files.clone()).unwrap();
    let fifo = dir.0.join("fifo.pem");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) with a NUL-terminated path and a valid mode.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let huge = dir.write("huge.pem", vec![b'A'; usize::try_from(MAX_PEM_FILE).unwrap() + 1]);
    for cert in [fifo, PathBuf::from("/dev/zero"), dir.0.clone(), huge] {
        std::fs::remove_file(&files.cert).unwrap();
        std::os::unix::fs::symlink(&cert, &files.cert).unwrap();
        let error = tls.reload().unwrap_err();
        assert!(matches!(error, TlsError::Unreadable { .. }), "{}: {error}", cert.display());
    }
}
