//! TLS for a client listener: the server settings built from PEM files, and a
//! handle that re-reads them while connections go on.
//!
//! Owns: reading the certificate chain, the private key and the optional
//! client CA (each failure one line naming the file and what is wrong), the
//! rustls [`ServerConfig`] they make (TLS 1.2 and 1.3, the `ring` provider,
//! ALPN `mqtt` or `http/1.1`, client certificates required and verified when
//! a client CA is given), and [`ServerTls::reload`], which swaps in a new
//! config for new handshakes only. Two helpers live in submodules: [`hello`]
//! reads a ClientHello's server name from a connection's first bytes without
//! a handshake (for a front that routes by SNI), and [`identity`] reads the
//! common name of a verified client certificate (Mosquitto's
//! `use_identity_as_username`).
//!
//! Must never: do I/O on a socket, block a connection on a reload (a reload
//! builds the new config aside and swaps an `Arc`), drop the config in force
//! when a new file is bad, or accept a client certificate that did not chain
//! to the client CA. `mqvisor run`'s TLS listeners use them
//! (`net::transport::tls`, `net::ingress`).

pub mod hello;
pub mod identity;
#[cfg(test)]
mod tests;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ResolvesServerCert, ServerConfig, ServerConnection, WebPkiClientVerifier};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{RootCertStore, version};

/// The application protocol a listener speaks, as announced by ALPN.
///
/// A client that offers no ALPN is served either way; one that offers only
/// other protocols is refused with a `no_application_protocol` alert
/// (RFC 7301 §3.2), as rustls does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alpn {
    /// MQTT over TLS: `mqtt`.
    Mqtt,
    /// MQTT over secure WebSockets: the upgrade request is HTTP/1.1, and
    /// browsers offer `http/1.1`.
    Http11,
}

impl Alpn {
    /// The protocol ids the server accepts, in order of preference.
    pub fn protocols(self) -> Vec<Vec<u8>> {
        match self {
            Alpn::Mqtt => vec![b"mqtt".to_vec()],
            Alpn::Http11 => vec![b"http/1.1".to_vec()],
        }
    }
}

/// Where a listener's TLS settings come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, the server's own certificate first.
    pub cert: PathBuf,
    /// PEM private key of the first certificate: PKCS#8 (`PRIVATE KEY`),
    /// PKCS#1 (`RSA PRIVATE KEY`) or SEC1 (`EC PRIVATE KEY`); RSA, ECDSA
    /// P-256/P-384 or Ed25519. Not encrypted.
    pub key: PathBuf,
    /// PEM CA certificates that client certificates must chain to. With
    /// one, every client must present a certificate (mutual TLS).
    pub client_ca: Option<PathBuf>,
    /// The protocol announced by ALPN.
    pub alpn: Alpn,
    /// Another certificate, served to clients that ask for one of its
    /// names by SNI (a customer's own domain beside the provider's
    /// wildcard); `cert` and `key` serve every other name.
    pub named: Option<NamedCert>,
}

/// A certificate served for some host names only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedCert {
    /// The names, lower case, as SNI carries them.
    pub names: Vec<String>,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Why TLS settings could not be loaded: one line naming the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: no such file", .path.display())]
    Missing { path: PathBuf },
    #[error("{}: cannot read: {source}", .path.display())]
    Unreadable { path: PathBuf, source: io::Error },
    #[error("{}: not valid PEM: {}", .path.display(), pem_problem(.source))]
    BadPem { path: PathBuf, source: pem::Error },
    #[error("{}: no certificate (expected a PEM block BEGIN CERTIFICATE)", .path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: not a valid X.509 certificate: {}", .path.display(), CertificateProblem(.source))]
    BadCertificate { path: PathBuf, source: rustls::Error },
    #[error(
        "{}: no private key (expected a PEM block BEGIN PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)",
        .path.display()
    )]
    NoKey { path: PathBuf },
    #[error("{}: the private key is encrypted; give it unencrypted (and readable by this user only)", .path.display())]
    EncryptedKey { path: PathBuf },
    #[error("{}: more than one private key", .path.display())]
    SeveralKeys { path: PathBuf },
    #[error("{}: unusable private key: {source}", .path.display())]
    BadKey { path: PathBuf, source: rustls::Error },
    #[error("{}: the private key does not match the first certificate in {}", .key.display(), .cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("{}: not a usable CA certificate: {}", .path.display(), CertificateProblem(.source))]
    BadClientCa { path: PathBuf, source: rustls::Error },
    #[error("{}: cannot verify client certificates with these CAs: {source}", .path.display())]
    ClientVerifier { path: PathBuf, source: rustls::server::VerifierBuilderError },
    #[error("TLS settings: {0}")]
    Settings(rustls::Error),
}

/// What is wrong with a PEM file, in words (pki-types prints markers as
/// byte lists).
fn pem_problem(error: &pem::Error) -> &'static str {
    match error {
        pem::Error::MissingSectionEnd { .. } => "a BEGIN line without its END line (is the file cut short?)",
        pem::Error::IllegalSectionStart { .. } => "a malformed BEGIN line",
        pem::Error::Base64Decode(_) => "bad base64 between BEGIN and END",
        pem::Error::SectionTooLarge => "a block over 256 MB",
        _ => "unreadable PEM",
    }
}

/// A certificate error without rustls' "peer certificate" wording, which
/// is about the other end of a handshake.
struct CertificateProblem<'a>(&'a rustls::Error);

impl std::fmt::Display for CertificateProblem<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding) => f.write_str("bad DER encoding"),
            rustls::Error::InvalidCertificate(problem) => write!(f, "{problem:?}"),
            other => write!(f, "{other}"),
        }
    }
}

/// The crypto provider of every listener: ring, with rustls' default
/// cipher suites and key exchange groups (X25519, P-256, P-384).
///
/// ring has no post-quantum key exchange, for which rustls 0.23.48
/// deprecates its provider; aws-lc-rs has X25519MLKEM768 but builds a large
/// C library with cmake. Changing provider is this one function.
#[allow(deprecated)]
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate chain and its key, read and checked against each other.
fn certified_key(provider: &CryptoProvider, cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let chain = read_certificates(cert)?;
    let signing_key = provider
        .key_provider
        .load_private_key(read_key(key)?)
        .map_err(|source| TlsError::BadKey { path: key.to_path_buf(), source })?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(certified),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(TlsError::KeyMismatch { cert: cert.to_path_buf(), key: key.to_path_buf() })
        }
        Err(source) => Err(TlsError::BadCertificate { path: cert.to_path_buf(), source }),
    }
}

/// Serves the named certificate to a client asking for one of its names,
/// and the other one to every other client (no SNI included).
#[derive(Debug)]
struct BySni {
    names: Vec<String>,
    named: Arc<CertifiedKey>,
    other: Arc<CertifiedKey>,
}

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let asked = hello.server_name().map(str::to_ascii_lowercase);
        let named = asked.is_some_and(|asked| self.names.contains(&asked));
        Some(if named { self.named.clone() } else { self.other.clone() })
    }
}

/// Reads `files` and builds the server settings they describe.
pub fn load_server_config(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    let provider = provider();
    let certified = certified_key(&provider, &files.cert, &files.key)?;
    let resolver: Arc<dyn ResolvesServerCert> = match &files.named {
        None => Arc::new(SingleCertAndKey::from(certified)),
        Some(named) => Arc::new(BySni {
            names: named.names.clone(),
            named: Arc::new(certified_key(&provider, &named.cert, &named.key)?),
            other: Arc::new(certified),
        }),
    };

    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&version::TLS13, &version::TLS12])
        .map_err(TlsError::Settings)?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for ca in read_certificates(path)? {
                roots.add(ca).map_err(|source| TlsError::BadClientCa { path: path.clone(), source })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|source| TlsError::ClientVerifier { path: path.clone(), source })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(resolver);
    config.alpn_protocols = files.alpn.protocols();
    Ok(config)
}

/// A listener's TLS settings, re-readable while it serves.
///
/// Each new connection takes the config in force ([`ServerTls::config`] or
/// [`ServerTls::new_connection`]) and keeps it for its whole life; [`reload`]
/// replaces it for the connections that come after. Share it in an `Arc`:
/// a signal handler's thread may reload while the net thread accepts.
///
/// [`reload`]: ServerTls::reload
#[derive(Debug)]
pub struct ServerTls {
    files: TlsFiles,
    current: RwLock<Arc<ServerConfig>>,
}

impl ServerTls {
    /// Reads the files; fails if any is unusable.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let config = load_server_config(&files)?;
        Ok(Self { files, current: RwLock::new(Arc::new(config)) })
    }

    /// The files this listener reads.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The config in force, for a new handshake.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.current.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// A server connection for a new client, under the config in force.
    pub fn new_connection(&self) -> Result<ServerConnection, rustls::Error> {
        ServerConnection::new(self.config())
    }

    /// Re-reads the files and puts the new config in force for new
    /// handshakes. Connections already made keep theirs. On an error the
    /// config in force stays as it was.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = Arc::new(load_server_config(&self.files)?);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = config;
        Ok(())
    }
}

/// The largest certificate, key or CA file read: real ones are a few KiB.
const MAX_PEM_FILE: u64 = 1 << 20;

/// The whole file, with a missing one told apart from one that cannot be
/// read. Only a regular file of at most [`MAX_PEM_FILE`] bytes: a FIFO must
/// not block a reload, nor `/dev/zero` fill the memory.
fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let unreadable = |source| TlsError::Unreadable { path: path.to_path_buf(), source };
    let file =
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).map_err(
            |source| match source.kind() {
                io::ErrorKind::NotFound => TlsError::Missing { path: path.to_path_buf() },
                _ => unreadable(source),
            },
        )?;
    let meta = file.metadata().map_err(unreadable)?;
    if !meta.is_file() {
        return Err(unreadable(io::Error::other("not a regular file")));
    }
    let mut bytes = Vec::new();
    file.take(MAX_PEM_FILE + 1).read_to_end(&mut bytes).map_err(unreadable)?;
    if bytes.len() as u64 > MAX_PEM_FILE {
        return Err(unreadable(io::Error::other(format!("larger than {MAX_PEM_FILE} bytes"))));
    }
    Ok(bytes)
}

/// Every `CERTIFICATE` block of a PEM file, in order; at least one.
fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let text = read_file(path)?;
    let chain = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::BadPem { path: path.to_path_buf(), source })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate { path: path.to_path_buf() });
    }
    Ok(chain)
}

/// The one private key of a PEM file.
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let text = read_file(path)?;
    // PKCS#8 `ENCRYPTED PRIVATE KEY`, or OpenSSL's legacy encrypted PKCS#1/SEC1.
    if contains(&text, b"-----BEGIN ENCRYPTED PRIVATE KEY-----") || contains(&text, b"Proc-Type: 4,ENCRYPTED") {
        return Err(TlsError::EncryptedKey { path: path.to_path_buf() });
    }
    let mut keys = PrivateKeyDer::pem_slice_iter(&text);
    let key = match keys.next() {
        Some(Ok(key)) => key,
        Some(Err(source)) => return Err(TlsError::BadPem { path: path.to_path_buf(), source }),
        None => return Err(TlsError::NoKey { path: path.to_path_buf() }),
    };
    match keys.next() {
        None => Ok(key),
        Some(Ok(_)) => Err(TlsError::SeveralKeys { path: path.to_path_buf() }),
        Some(Err(source)) => Err(TlsError::BadPem { path: path.to_path_buf(), source }),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle)
}
