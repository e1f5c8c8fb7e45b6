//! The client side: the keep-alive HTTP/1.1 client [`Conn`] (Unix socket and HTTPS, with
//! its TLS config), and the daemon process: its config, its start until READY=1, its stop.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;

use crate::notify::{Heard, Notify};
use crate::token::{check_output, vm_rss_kib, SOFTHSM, TOKEN_LABEL};
use crate::{Ctx, Res};

/// How long a client waits for an answer before the bench gives up.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// One keep-alive HTTP/1.1 connection over any byte stream.
pub(crate) struct Conn<S: Read + Write> {
    stream: S,
    buf: Vec<u8>,
    /// Extra header lines sent with every request (e.g. the bearer token).
    headers: String,
}

impl<S: Read + Write> Conn<S> {
    fn new(stream: S, headers: String) -> Self {
        let buf = Vec::new();
        Conn {
            stream,
            buf,
            headers,
        }
    }

    /// Sends one request; returns the status and the (de-chunked) body.
    pub(crate) fn request(&mut self, method: &str, path: &str, body: &[u8]) -> Res<(u16, Vec<u8>)> {
        let (headers, len) = (&self.headers, body.len());
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n{headers}");
        if method != "GET" {
            req += &format!("Content-Type: application/json\r\nContent-Length: {len}\r\n");
        }
        let bytes = [req.as_bytes(), b"\r\n", body].concat();
        self.stream.write_all(&bytes).ctx("writing the request")?;
        self.stream.flush().ctx("flushing the request")?;
        let status_line = self.line()?;
        let status = status_line.split(' ').nth(1).and_then(|s| s.parse().ok());
        let status = status.ok_or(format!("bad status line {status_line:?}"))?;
        let (mut length, mut chunked) = (0, false);
        loop {
            let line = self.line()?;
            let (k, v) = line.split_once(':').unwrap_or((&line, ""));
            if line.is_empty() {
                break;
            } else if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().ctx("Content-Length")?;
            } else if k.eq_ignore_ascii_case("transfer-encoding") {
                chunked = v.to_ascii_lowercase().contains("chunked");
            }
        }
        if !chunked {
            return Ok((status, self.take(length)?));
        }
        let mut body = Vec::new();
        loop {
            let size_line = self.line()?;
            let size_hex = size_line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_hex, 16).ctx("chunk size")?;
            if size == 0 {
                while !self.line()?.is_empty() {} // trailers
                return Ok((status, body));
            }
            body.extend(self.take(size)?);
            self.take(2)?;
        }
    }

    fn fill(&mut self) -> Res<()> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk).ctx("reading the response")?;
        if n == 0 {
            return Err("the daemon closed the connection".into());
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// The next line, without its CRLF.
    fn line(&mut self) -> Res<String> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return Ok(line);
            }
            self.fill()?;
        }
    }

    fn take(&mut self, n: usize) -> Res<Vec<u8>> {
        while self.buf.len() < n {
            self.fill()?;
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// Sends a request; its JSON answer, or an error saying what was sent and answered.
    pub(crate) fn ok(&mut self, method: &str, path: &str, body: &str) -> Res<Value> {
        let (status, answer) = self.request(method, path, body.as_bytes())?;
        let answer = String::from_utf8_lossy(&answer);
        if status != 200 {
            return Err(format!(
                "{method} {path} {body} answered {status}: {answer}"
            ));
        }
        serde_json::from_str(&answer).ctx(format!("{method} {path}: not JSON: {answer}"))
    }

    /// PATCH /v1/keys/{kid}: anything but 200 with a non-empty `changed` is an error.
    pub(crate) fn patch(&mut self, kid: &str, body: &Value) -> Res<()> {
        let (path, text) = (format!("/v1/keys/{kid}"), body.to_string());
        let v = self.ok("PATCH", &path, &text)?;
        match v["changed"].as_array().is_some_and(|c| !c.is_empty()) {
            true => Ok(()),
            false => Err(format!("PATCH {path} {text} changed nothing: {v}")),
        }
    }
}

pub(crate) type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

pub(crate) fn unix_conn(sock: &Path) -> Res<Conn<UnixStream>> {
    let s = UnixStream::connect(sock).ctx(format!("connecting to {}", sock.display()))?;
    s.set_read_timeout(Some(READ_TIMEOUT)).ctx("timeout")?;
    Ok(Conn::new(s, String::new()))
}

/// A keep-alive plain HTTP connection over loopback TCP (no TLS: the transport floor's
/// middle step).
pub(crate) fn tcp_conn(addr: SocketAddr) -> Res<Conn<TcpStream>> {
    let s = TcpStream::connect(addr).ctx(format!("connecting to {addr}"))?;
    s.set_nodelay(true).ctx("nodelay")?;
    s.set_read_timeout(Some(READ_TIMEOUT)).ctx("timeout")?;
    Ok(Conn::new(s, String::new()))
}

/// A keep-alive HTTPS connection to `addr` (a server with the dev certificate `ca` signed),
/// sending `bearer` with every request.
pub(crate) fn tls_client(addr: SocketAddr, ca: &Path, bearer: &str) -> Res<Conn<TlsStream>> {
    tls_connect(addr, tls_config(ca)?, bearer)
}

/// The whole answer (status line, headers, body) to one GET of `path` on `s`; the answer
/// must carry a Content-Length.
pub(crate) fn raw_answer<S: Read + Write>(s: &mut S, path: &str) -> Res<Vec<u8>> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    s.write_all(req.as_bytes()).ctx("writing the request")?;
    let (mut answer, mut chunk) = (Vec::new(), [0u8; 16 * 1024]);
    loop {
        if let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&answer[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .ok_or(format!(
                    "GET {path}: an answer without Content-Length: {head}"
                ))?;
            let length: usize = length.trim().parse().ctx("Content-Length")?;
            if answer.len() >= end + 4 + length {
                answer.truncate(end + 4 + length);
                return Ok(answer);
            }
        }
        let n = s.read(&mut chunk).ctx("reading the answer")?;
        if n == 0 {
            return Err(format!("GET {path}: the daemon closed the connection"));
        }
        answer.extend_from_slice(&chunk[..n]);
    }
}

fn tls_config(ca: &Path) -> Res<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).ctx("reading ca.pem")? {
        roots.add(c.ctx("ca.pem")?).ctx("adding the CA")?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider);
    let builder = builder.with_safe_default_protocol_versions().ctx("TLS")?;
    let config = builder.with_root_certificates(roots);
    Ok(Arc::new(config.with_no_client_auth()))
}

pub(crate) fn tls_conn(d: &Daemon, bearer: &str) -> Res<Conn<TlsStream>> {
    tls_connect(d.tls_addr, d.tls.clone(), bearer)
}

fn tls_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    bearer: &str,
) -> Res<Conn<TlsStream>> {
    let name = ServerName::try_from("localhost").ctx("server name")?;
    let mut conn = rustls::ClientConnection::new(config, name).ctx("TLS client")?;
    let mut sock = TcpStream::connect(addr).ctx(format!("connecting to {addr}"))?;
    sock.set_nodelay(true).ctx("nodelay")?;
    sock.set_read_timeout(Some(READ_TIMEOUT)).ctx("timeout")?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).ctx("TLS handshake")?;
    }
    let auth = format!("Authorization: Bearer {bearer}\r\n");
    Ok(Conn::new(rustls::StreamOwned::new(conn, sock), auth))
}

// ---------------------------------------------------------------- the daemon

pub(crate) struct Daemon {
    child: Child,
    pub(crate) sock: PathBuf,
    log: PathBuf,
    config: PathBuf,
    tls_addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    /// Our NOTIFY_SOCKET, read for the daemon's whole run.
    pub(crate) notify: Notify,
}

impl Daemon {
    fn log_tail(&self) -> String {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Turns `keys.unique_labels` on or off as an operator would: the config file, then
    /// SIGHUP; returns once the reload's READY=1 is heard.
    pub(crate) fn set_unique_labels(&self, on: bool) -> Res<()> {
        let text = fs::read_to_string(&self.config).ctx("reading hsmkeyd.toml")?;
        let off = text.replace("[keys]\nunique_labels = true\n", "[keys]\n");
        let text = match on {
            true => off.replace("[keys]\n", "[keys]\nunique_labels = true\n"),
            false => off,
        };
        if text.contains("unique_labels = true") != on {
            return Err("the bench's config has no [keys] section to switch".into());
        }
        fs::write(&self.config, text).ctx("writing hsmkeyd.toml")?;
        let since = Instant::now();
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).ctx("SIGHUP")?;
        match self.notify.ready_since(since, Duration::from_secs(30))? {
            Some(_) => Ok(()),
            None => Err(format!(
                "no READY=1 within 30 s of SIGHUP:\n{}",
                self.log_tail()
            )),
        }
    }

    pub(crate) fn rss_mib(&self) -> Res<f64> {
        Ok(vm_rss_kib(self.child.id())? / 1024.0)
    }

    /// SIGTERM, then waits (20 s, then SIGKILL); returns the exit status and all the
    /// datagrams heard on the NOTIFY_SOCKET.
    pub(crate) fn stop(mut self) -> Res<(std::process::ExitStatus, Heard)> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).ctx("SIGTERM")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().ctx("wait")? {
                return Ok((status, self.notify.finish()?));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!(
            "the daemon ignored SIGTERM for 20 s:\n{}",
            self.log_tail()
        ))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The config: tests/common/mod.rs's shape, with the connection limits the slow-client part
/// needs, used throughout (they change nothing until a limit is reached).
fn write_config(dir: &Path, conf: &Path, pin: &Path, port: u16) -> Res<PathBuf> {
    let tls = dir.join("tls");
    let mut devcert = Command::new(env!("CARGO_BIN_EXE_hsmkeyd-devcert"));
    let out = devcert.arg("--out").arg(&tls).output();
    let out = out.ctx("running hsmkeyd-devcert")?;
    check_output("hsmkeyd-devcert", &out)?;
    let (uid, sock) = (nix::unistd::getuid().as_raw(), dir.join("api.sock"));
    let (pin, conf, sock) = (pin.display(), conf.display(), sock.display());
    let (cert, key) = (tls.join("cert.pem"), tls.join("key.pem"));
    let (cert, key) = (cert.display(), key.display());
    let text = format!(
        "[pkcs11]\nmodule = \"{SOFTHSM}\"\ntoken_label = \"{TOKEN_LABEL}\"\npin_file = \"{pin}\"\n\n\
         [pkcs11.module_env]\nSOFTHSM2_CONF = \"{conf}\"\n\n\
         [unix]\npath = \"{sock}\"\nmode = \"0660\"\n\n\
         [server]\ndrain_timeout_s = 5\nmax_connections = 1024\n\
         max_connections_per_caller = 512\nrequest_timeout_s = 30\nmin_body_rate = 0\n\n\
         [audit]\nsink = \"stderr-json\"\n\n\
         [tls]\nlisten = \"127.0.0.1:{port}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\n\
         [keys]\nroles = [\"ops\", \"payments\"]\n\n\
         [[principals]]\nname = \"bench\"\nuids = [{uid}]\nroles = [\"ops\", \"payments\"]\n\
         scopes = [\"keymgmt:list\", \"keymgmt:get\", \"keymgmt:upd\", \"auth:token\"]\n"
    );
    let path = dir.join("hsmkeyd.toml");
    fs::write(&path, text).ctx("writing hsmkeyd.toml")?;
    Ok(path)
}

/// Starts the daemon and waits for READY=1 on our NOTIFY_SOCKET; returns it and the ms.
pub(crate) fn start_daemon(dir: &Path, conf: &Path, pin: &Path) -> Res<(Daemon, f64)> {
    start_daemon_under(dir, conf, pin, Command::new(env!("CARGO_BIN_EXE_hsmkeyd")))
}

/// [`start_daemon`] with `runner` (the daemon's binary itself, or a program such as
/// valgrind that runs it: the daemon's path and arguments are added to it).
pub(crate) fn start_daemon_under(
    dir: &Path,
    conf: &Path,
    pin: &Path,
    mut runner: Command,
) -> Res<(Daemon, f64)> {
    let free = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr());
    let port = free.ctx("finding a free port")?.port();
    let config = write_config(dir, conf, pin, port)?;
    let notify_path = dir.join("notify.sock");
    let _ = fs::remove_file(&notify_path);
    let notify = Notify::bind(&notify_path)?;
    let log = dir.join("daemon.log");
    let stderr = fs::File::create(&log).ctx("creating daemon.log")?;
    let tls = tls_config(&dir.join("tls/ca.pem"))?;
    let t0 = Instant::now();
    if runner.get_program() != env!("CARGO_BIN_EXE_hsmkeyd") {
        let _ = runner.arg(env!("CARGO_BIN_EXE_hsmkeyd"));
    }
    let child = runner
        .arg("--config")
        .arg(&config)
        .env_remove("SOFTHSM2_CONF")
        .env("NOTIFY_SOCKET", &notify_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .ctx("spawning hsmkeyd")?;
    let sock = dir.join("api.sock");
    let tls_addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut d = Daemon {
        child,
        sock,
        log,
        config,
        tls_addr,
        tls,
        notify,
    };
    loop {
        if let Some(at) = d.notify.ready()? {
            return Ok((d, (at - t0).as_secs_f64() * 1000.0));
        }
        if let Some(status) = d.child.try_wait().ctx("wait")? {
            return Err(format!(
                "the daemon exited ({status}) before READY=1:\n{}",
                d.log_tail()
            ));
        }
        if t0.elapsed() > Duration::from_secs(300) {
            return Err(format!("no READY=1 within 300 s:\n{}", d.log_tail()));
        }
    }
}
