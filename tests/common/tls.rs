//! The HTTPS side of the tests: development certificates (made by `hsmkeyd-devcert`, the
//! tool softhsm-setup.sh uses), free loopback ports, and a client that trusts only the
//! test's CA.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use super::{parse_response, Response};

/// Makes ca.pem, cert.pem and key.pem in `dir`.
pub fn make_certs(dir: &Path) {
    let _ = super::run_ok(
        Command::new(env!("CARGO_BIN_EXE_hsmkeyd-devcert"))
            .arg("--out")
            .arg(dir),
        "hsmkeyd-devcert",
    );
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An HTTPS client that trusts only `ca`.
#[derive(Clone)]
pub struct TlsClient {
    pub addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
}

impl TlsClient {
    pub fn new(addr: SocketAddr, ca: &Path) -> TlsClient {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        TlsClient {
            addr,
            config: Arc::new(config),
        }
    }

    /// One request over a fresh TLS connection (`Connection: close`).
    pub fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Response {
        self.raw(&super::request(method, path, headers, body))
    }

    /// GET with a bearer token.
    pub fn get(&self, path: &str, token: &str) -> Response {
        self.send(
            "GET",
            path,
            &[("Authorization", &format!("Bearer {token}"))],
            b"",
        )
    }

    /// PATCH /v1/keys/{kid} with a bearer token.
    pub fn patch(&self, kid: &str, token: &str, body: &serde_json::Value) -> Response {
        self.send(
            "PATCH",
            &format!("/v1/keys/{kid}"),
            &[
                ("Authorization", &format!("Bearer {token}")),
                ("Content-Type", "application/json"),
            ],
            body.to_string().as_bytes(),
        )
    }

    /// Whether a TLS handshake with the daemon succeeds (the server's certificate chains to
    /// this client's CA).
    pub fn handshake_ok(&self) -> bool {
        let mut conn = rustls::ClientConnection::new(
            self.config.clone(),
            ServerName::try_from("localhost").unwrap(),
        )
        .unwrap();
        let Ok(mut sock) = TcpStream::connect(self.addr) else {
            return false;
        };
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        while conn.is_handshaking() {
            if conn.complete_io(&mut sock).is_err() {
                return false;
            }
        }
        true
    }

    /// A TLS connection with its handshake done, kept open by the caller.
    pub fn connect(
        &self,
    ) -> std::io::Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
        let mut conn = rustls::ClientConnection::new(
            self.config.clone(),
            ServerName::try_from("localhost").unwrap(),
        )
        .unwrap();
        let mut sock = TcpStream::connect(self.addr)?;
        sock.set_read_timeout(Some(Duration::from_secs(20)))?;
        while conn.is_handshaking() {
            let _ = conn.complete_io(&mut sock)?;
        }
        Ok(rustls::StreamOwned::new(conn, sock))
    }

    /// Raw bytes over TLS; the response parsed.
    pub fn raw(&self, request: &[u8]) -> Response {
        let conn = rustls::ClientConnection::new(
            self.config.clone(),
            ServerName::try_from("localhost").unwrap(),
        )
        .unwrap();
        let sock = TcpStream::connect(self.addr).expect("connect to the TLS port");
        sock.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut tls = rustls::StreamOwned::new(conn, sock);
        tls.write_all(request).expect("TLS write");
        let mut buf = Vec::new();
        let _ = tls.read_to_end(&mut buf);
        parse_response(&buf)
    }
}

/// Where a test daemon's TLS material lives.
pub fn tls_dir(token_dir: &Path) -> PathBuf {
    token_dir.join("tls")
}
