//! The connection to the daemon: HTTP/1.1 over its Unix socket (the caller is identified by
//! its uid), or HTTPS with a bearer token. One connection per request; answers are read
//! whole and parsed as JSON.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use zeroize::Zeroizing;

use super::Failure;

/// Where the daemon is.
pub enum Target {
    /// Its Unix socket.
    Unix(PathBuf),
    /// Its HTTPS front door.
    Https {
        /// `https://host:port`.
        uri: Uri,
        /// CA certificates (PEM) to trust instead of none.
        cacert: Option<PathBuf>,
        /// The bearer token (never from the command line).
        token: Zeroizing<String>,
    },
}

/// An answer from the daemon.
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// The JSON body (`Null` when empty).
    pub body: Value,
}

impl Answer {
    /// The answer, or the daemon's refusal as a [`Failure`] (message and field from the
    /// error body).
    pub fn ok(self) -> Result<Answer, Failure> {
        if self.status < 300 {
            return Ok(self);
        }
        let message = self.body["message"].as_str().map_or_else(
            || format!("the daemon answered {}", self.status),
            str::to_string,
        );
        Err(Failure::Daemon {
            status: self.status,
            code: self.body["error"].as_str().unwrap_or("").to_string(),
            message,
            field: self.body["field"].as_str().map(str::to_string),
        })
    }
}

impl Target {
    /// Sends one request; `body` is sent as JSON, the answer is parsed as JSON.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(HeaderName, String)],
    ) -> Result<Answer, Failure> {
        let (status, bytes) = self.send_raw(method, path, body, headers).await?;
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).map_err(|e| {
                Failure::Unavailable(format!(
                    "the daemon answered {status} with a body that is not JSON: {e}"
                ))
            })?
        };
        Ok(Answer { status, body })
    }

    /// A GET whose successful answer is text (PEM); an error answer is the daemon's JSON.
    pub async fn send_text(&self, method: Method, path: &str) -> Result<String, Failure> {
        let (status, bytes) = self.send_raw(method, path, None, &[]).await?;
        if status >= 300 {
            let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            Answer { status, body }.ok()?;
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    async fn send_raw(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(HeaderName, String)],
    ) -> Result<(u16, Bytes), Failure> {
        let payload = match body {
            Some(v) => Bytes::from(v.to_string()),
            None => Bytes::new(),
        };
        let mut req = Request::builder().method(method).uri(path);
        if body.is_some() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        for (k, v) in headers {
            let v = HeaderValue::from_str(v)
                .map_err(|_| Failure::Usage(format!("{k} {v:?} is not a valid header value")))?;
            req = req.header(k, v);
        }
        match self {
            Target::Unix(sock) => {
                let stream = tokio::net::UnixStream::connect(sock).await.map_err(|e| {
                    Failure::Unavailable(format!("cannot connect to {}: {e}", sock.display()))
                })?;
                let req = req
                    .header(HOST, "localhost")
                    .body(Full::new(payload))
                    .map_err(|e| Failure::Usage(e.to_string()))?;
                exchange(stream, req).await
            }
            Target::Https { uri, cacert, token } => {
                let host = uri.host().unwrap_or("localhost").to_string();
                let port = uri.port_u16().unwrap_or(443);
                let tls = connector(cacert.as_deref())?;
                let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
                    .await
                    .map_err(|e| {
                        Failure::Unavailable(format!("cannot connect to {host}:{port}: {e}"))
                    })?;
                let name = rustls_pki_types::ServerName::try_from(host.clone())
                    .map_err(|e| Failure::Usage(format!("--url host {host:?}: {e}")))?;
                let stream = tls.connect(name, tcp).await.map_err(|e| {
                    Failure::Unavailable(format!("TLS with {host}:{port} failed: {e}"))
                })?;
                let bearer = Zeroizing::new(format!("Bearer {}", token.as_str()));
                let mut auth = HeaderValue::from_str(&bearer)
                    .map_err(|_| Failure::Usage("the token is not a valid header value".into()))?;
                auth.set_sensitive(true);
                let req = req
                    .header(HOST, format!("{host}:{port}"))
                    .header(AUTHORIZATION, auth)
                    .body(Full::new(payload))
                    .map_err(|e| Failure::Usage(e.to_string()))?;
                exchange(stream, req).await
            }
        }
    }
}

async fn exchange<S>(stream: S, req: Request<Full<Bytes>>) -> Result<(u16, Bytes), Failure>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let lost = |e: hyper::Error| Failure::Unavailable(format!("the daemon connection failed: {e}"));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(lost)?;
    let driver = tokio::spawn(conn);
    let resp = sender.send_request(req).await.map_err(lost)?;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.map_err(lost)?.to_bytes();
    driver.abort();
    Ok((status, bytes))
}

fn connector(cacert: Option<&Path>) -> Result<tokio_rustls::TlsConnector, Failure> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    if let Some(path) = cacert {
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
            .map_err(|e| Failure::Usage(format!("--cacert {}: {e}", path.display())))?;
        for c in certs {
            let c = c.map_err(|e| Failure::Usage(format!("--cacert {}: {e}", path.display())))?;
            roots
                .add(c)
                .map_err(|e| Failure::Usage(format!("--cacert {}: {e}", path.display())))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Failure::Usage(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}
