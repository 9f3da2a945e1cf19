//! A test PKI made with `openssl`: a CA, a server certificate for
//! `localhost` and 127.0.0.1 and a client certificate (CN `alice`) signed
//! by it, and more server certificates on request, in a folder of their own.

use std::path::PathBuf;
use std::process::Command;

pub const OPENSSL: &str = "openssl (apt-get install openssl)";
pub const OPENSSL_PROBE: &str = "command -v openssl";

pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn make(name: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("mqvisor-edge-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let pki = Pki { dir };
        pki.openssl(
            "openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=mqvisor-test-ca \
             2>/dev/null",
        );
        pki.server("server", "DNS:localhost,IP:127.0.0.1");
        pki.openssl(
            "openssl req -newkey rsa:2048 -nodes -keyout client.key -out client.csr -subj /CN=alice 2>/dev/null
printf 'extendedKeyUsage=clientAuth\n' > client.ext
openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.pem -days 2 \
    -extfile client.ext 2>/dev/null",
        );
        pki
    }

    /// `STEM.pem` and `STEM.key`: a server certificate for `alt_names`
    /// (`DNS:*.mq.test,DNS:localhost`), signed by this CA.
    pub fn server(&self, stem: &str, alt_names: &str) {
        self.openssl(&format!(
            "openssl req -newkey rsa:2048 -nodes -keyout {stem}.key -out {stem}.csr -subj /CN={stem} 2>/dev/null
printf 'subjectAltName={alt_names}\n' > {stem}.ext
openssl x509 -req -in {stem}.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out {stem}.pem -days 2 \
    -extfile {stem}.ext 2>/dev/null"
        ));
    }

    fn openssl(&self, script: &str) {
        let script = format!("set -e\n{script}\n");
        let out = Command::new("sh").args(["-c", &script]).current_dir(&self.dir).output().expect("running openssl");
        assert!(out.status.success(), "making the test PKI: {}", String::from_utf8_lossy(&out.stderr));
    }

    pub fn path(&self, file: &str) -> String {
        self.dir.join(file).to_string_lossy().into_owned()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
