//! Throwaway certificates for the TLS tests, made with the `openssl` command (Debian's,
//! on every machine image; no crate with C or assembly to build): a CA, a server
//! certificate for 127.0.0.1 and localhost and a client certificate signed by it, and an
//! unrelated second CA with a client certificate of its own, as PEM files in a scratch
//! directory. The shapes are the ones rustls/webpki accept as well as Go and OpenSSL: X.509
//! v3, P-256 keys in PKCS#8, ECDSA with SHA-256, CA certificates with a critical
//! `basicConstraints CA:TRUE` and `keyCertSign`, end-entity certificates with `CA:FALSE`,
//! a subjectAltName and the extended key usage of their side.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The extensions of each kind of certificate (sections named by `-extensions`), and a
/// request section so `openssl req` needs nothing of the machine's openssl.cnf.
const OPENSSL_CNF: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectAltName = DNS:inject-test-client
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
";

/// Days the certificates are valid from now: a test run is minutes.
const DAYS: &str = "7";

/// The PEM files of one set (keys are PKCS#8, `BEGIN PRIVATE KEY`).
#[derive(Debug)]
pub struct TestCerts {
    pub dir: PathBuf,
    /// `inject test CA`, self-signed: what a client trusts (`ca.pem`).
    pub ca: PathBuf,
    pub ca_key: PathBuf,
    /// Signed by `ca`, for IP 127.0.0.1 and DNS localhost, serverAuth (`server.pem`).
    pub server: PathBuf,
    pub server_key: PathBuf,
    /// Signed by `ca`, clientAuth: passes a server that requires certificates from `ca`
    /// (`client.pem`).
    pub client: PathBuf,
    pub client_key: PathBuf,
    /// `inject unrelated CA`, self-signed, which signed neither of the above: trusting it
    /// alone must fail against `server` (`other-ca.pem`).
    pub other_ca: PathBuf,
    pub other_ca_key: PathBuf,
    /// Signed by `other_ca`, clientAuth: a server that requires certificates from `ca`
    /// refuses it (`other-client.pem`).
    pub other_client: PathBuf,
    pub other_client_key: PathBuf,
    /// Whether Drop removes `dir` ([`TestCerts::generate`] made it).
    owned: bool,
}

impl TestCerts {
    /// A new set in a fresh scratch directory under the system's temporary directory,
    /// removed when dropped. About 50 ms.
    pub fn generate() -> Result<TestCerts> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("inject-certs.{}.{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut certs = TestCerts::generate_in(&dir)?;
        certs.owned = true;
        Ok(certs)
    }

    /// A new set in `dir` (created if missing; files of the same names are replaced),
    /// left in place when dropped.
    pub fn generate_in(dir: &Path) -> Result<TestCerts> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let p = |name: &str| dir.join(name);
        let certs = TestCerts {
            dir: dir.to_path_buf(),
            ca: p("ca.pem"),
            ca_key: p("ca.key"),
            server: p("server.pem"),
            server_key: p("server.key"),
            client: p("client.pem"),
            client_key: p("client.key"),
            other_ca: p("other-ca.pem"),
            other_ca_key: p("other-ca.key"),
            other_client: p("other-client.pem"),
            other_client_key: p("other-client.key"),
            owned: false,
        };
        let cnf = p("openssl.cnf");
        std::fs::write(&cnf, OPENSSL_CNF)?;
        let ssl = Ssl { cnf };
        ssl.ca(&certs.ca, &certs.ca_key, "inject test CA")?;
        ssl.ca(&certs.other_ca, &certs.other_ca_key, "inject unrelated CA")?;
        let ca = (certs.ca.as_path(), certs.ca_key.as_path());
        ssl.leaf(&certs.server, &certs.server_key, "localhost", "server", ca)?;
        ssl.leaf(&certs.client, &certs.client_key, "inject test client", "client", ca)?;
        let other = (certs.other_ca.as_path(), certs.other_ca_key.as_path());
        ssl.leaf(&certs.other_client, &certs.other_client_key, "inject unrelated client", "client", other)?;
        Ok(certs)
    }
}

impl Drop for TestCerts {
    fn drop(&mut self) {
        if self.owned {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// `openssl` with the set's own configuration file.
struct Ssl {
    cnf: PathBuf,
}

impl Ssl {
    fn run(&self, args: &[&dyn AsRef<OsStr>]) -> Result<()> {
        let args: Vec<&OsStr> = args.iter().map(|a| a.as_ref()).collect();
        let out =
            Command::new(openssl()?).args(&args).env("OPENSSL_CONF", &self.cnf).output().context("running openssl")?;
        if !out.status.success() {
            let words: Vec<_> = args.iter().map(|a| a.to_string_lossy()).collect();
            bail!(
                "openssl {} failed ({}): {}",
                words.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    fn key(&self, key: &Path) -> Result<()> {
        self.run(&[&"genpkey", &"-algorithm", &"EC", &"-pkeyopt", &"ec_paramgen_curve:P-256", &"-out", &key])
    }

    /// A self-signed CA certificate and its key.
    fn ca(&self, cert: &Path, key: &Path, name: &str) -> Result<()> {
        self.key(key)?;
        let subject = format!("/CN={name}");
        let cnf = &self.cnf;
        self.run(&[
            &"req",
            &"-x509",
            &"-new",
            &"-config",
            cnf,
            &"-extensions",
            &"ca",
            &"-key",
            &key,
            &"-subj",
            &subject,
            &"-days",
            &DAYS,
            &"-sha256",
            &"-out",
            &cert,
        ])
    }

    /// A key and a certificate with the extensions of section `kind`, signed by `by`
    /// (certificate, key).
    fn leaf(&self, cert: &Path, key: &Path, name: &str, kind: &str, by: (&Path, &Path)) -> Result<()> {
        self.key(key)?;
        let csr = cert.with_extension("csr");
        let subject = format!("/CN={name}");
        let cnf = &self.cnf;
        self.run(&[&"req", &"-new", &"-config", cnf, &"-key", &key, &"-subj", &subject, &"-out", &csr])?;
        let serial = format!("0x{}", random_hex(8)?);
        self.run(&[
            &"x509",
            &"-req",
            &"-in",
            &csr,
            &"-CA",
            &by.0,
            &"-CAkey",
            &by.1,
            &"-set_serial",
            &serial,
            &"-days",
            &DAYS,
            &"-sha256",
            &"-extfile",
            cnf,
            &"-extensions",
            &kind,
            &"-out",
            &cert,
        ])?;
        let _ = std::fs::remove_file(&csr);
        Ok(())
    }
}

/// `bytes` random bytes in hex, the first below 0x80 (a positive serial of `bytes` bytes).
fn random_hex(bytes: usize) -> Result<String> {
    use std::io::Read;
    let mut b = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    b[0] = (b[0] & 0x7f) | 0x10;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// The `openssl` command on PATH.
pub fn openssl() -> Result<PathBuf> {
    crate::which("openssl").context("the openssl command is not installed (`cargo xtask test` installs it)")
}

#[cfg(test)]
mod tests {
    use super::TestCerts;

    #[test]
    fn the_set_verifies_as_it_should() -> anyhow::Result<()> {
        if super::openssl().is_err() {
            anyhow::ensure!(!crate::in_ci(), "openssl is not installed, and CI=true");
            eprintln!("SKIP: openssl is not installed");
            return Ok(());
        }
        let certs = TestCerts::generate()?;
        let verify = |ca: &std::path::Path, cert: &std::path::Path| {
            std::process::Command::new("openssl").arg("verify").arg("-CAfile").arg(ca).arg(cert).output()
        };
        for cert in [&certs.server, &certs.client] {
            let out = verify(&certs.ca, cert)?;
            anyhow::ensure!(out.status.success(), "{}: {}", cert.display(), String::from_utf8_lossy(&out.stdout));
            anyhow::ensure!(
                !verify(&certs.other_ca, cert)?.status.success(),
                "{} verifies with the other CA",
                cert.display()
            );
        }
        anyhow::ensure!(verify(&certs.other_ca, &certs.other_client)?.status.success());
        anyhow::ensure!(!verify(&certs.ca, &certs.other_client)?.status.success());
        let dir = certs.dir.clone();
        drop(certs);
        anyhow::ensure!(!dir.exists(), "{} is left behind", dir.display());
        Ok(())
    }
}
