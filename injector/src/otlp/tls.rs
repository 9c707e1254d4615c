//! TLS for OTLP endpoints, configured as every OpenTelemetry SDK is: `https://` endpoints
//! are verified against the system's roots plus the CA file of
//! `OTEL_EXPORTER_OTLP_[SIGNAL_]CERTIFICATE`, and a client certificate and key
//! (`..._CLIENT_CERTIFICATE`, `..._CLIENT_KEY`) make it mutual. Files are read and checked
//! at start, so a wrong path is an error before the target is touched; a certificate the
//! endpoint refuses (or one it presents that does not verify) fails the export with a line
//! naming the endpoint and the reason, and spans wait and are retried as for any failure.

/// A PEM file's path (for messages) and contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pem {
    pub path: String,
    pub bytes: Vec<u8>,
}

/// What TLS needs beyond the system's roots.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tls {
    /// CA certificates trusted besides the system's roots.
    pub ca: Option<Pem>,
    /// The client's certificate (chain) and private key, for mutual TLS.
    pub client: Option<(Pem, Pem)>,
}

/// An error and its causes on one line ("a: b: c"), each cause once: an HTTP client's
/// top-level error ("error sending request") says nothing of a certificate.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(e);
    while let Some(err) = cur {
        let s = err.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = err.source();
    }
    parts.join(": ")
}

#[cfg(feature = "otlp")]
mod clients {
    use anyhow::{Context, Result};

    use super::Tls;

    /// rustls's crypto (ring), for every client of the process; installing it again is
    /// a no-op. ring (deprecated by rustls for lacking post-quantum key exchange) builds
    /// with a C compiler alone; aws-lc-rs would need cmake on every machine that builds
    /// inject. The endpoints are the user's collectors, not the open internet.
    #[allow(deprecated)]
    fn provider() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }

    /// A blocking HTTP client for OTLP/HTTP: the system's roots, the extra CA, the
    /// client identity.
    pub fn http(timeout: std::time::Duration, tls: &Tls) -> Result<reqwest::blocking::Client> {
        provider();
        let mut b = reqwest::blocking::Client::builder().timeout(timeout);
        if let Some(ca) = &tls.ca {
            let certs = reqwest::Certificate::from_pem_bundle(&ca.bytes)
                .with_context(|| format!("{}: not a PEM certificate bundle", ca.path))?;
            b = b.tls_certs_merge(certs);
        }
        if let Some((cert, key)) = &tls.client {
            let mut pem = cert.bytes.clone();
            pem.push(b'\n');
            pem.extend_from_slice(&key.bytes);
            let id = reqwest::Identity::from_pem(&pem)
                .with_context(|| format!("{} and {}: not a certificate and its key", cert.path, key.path))?;
            b = b.identity(id);
        }
        b.build().context("building the OTLP/HTTP client")
    }

    /// The TLS settings of a gRPC channel to an `https://` endpoint.
    pub fn grpc(tls: &Tls) -> tonic::transport::ClientTlsConfig {
        provider();
        let mut c = tonic::transport::ClientTlsConfig::new().with_native_roots();
        if let Some(ca) = &tls.ca {
            c = c.ca_certificate(tonic::transport::Certificate::from_pem(&ca.bytes));
        }
        if let Some((cert, key)) = &tls.client {
            c = c.identity(tonic::transport::Identity::from_pem(&cert.bytes, &key.bytes));
        }
        c
    }
}

#[cfg(feature = "otlp")]
pub use clients::{grpc, http};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_names_each_cause_once() {
        let inner = std::io::Error::other("invalid peer certificate: UnknownIssuer");
        let outer = std::io::Error::other(inner);
        assert_eq!(chain(&outer), "invalid peer certificate: UnknownIssuer");
        #[derive(Debug)]
        struct Top(std::io::Error);
        impl std::fmt::Display for Top {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("error sending request")
            }
        }
        impl std::error::Error for Top {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let top = Top(std::io::Error::other("invalid peer certificate: UnknownIssuer"));
        assert_eq!(chain(&top), "error sending request: invalid peer certificate: UnknownIssuer");
    }
}
