//! The transport floor of a GET: the same request and answer bytes the daemon's GET
//! exchanges, served by a minimal blocking server in this process (a thread that answers
//! each request with the recorded answer, nothing else) over a Unix socket, over plain
//! loopback TCP, and over TLS on loopback TCP with the daemon's certificate, read with the
//! same client. The difference between the first and the last is what HTTPS costs before
//! any daemon work: TCP loopback, two TLS records each way (seal and open), and the
//! wake-ups of their reads; the plain TCP floor says how much of it is TCP alone.
//! `get_https_p50` is then compared with `get_unix_p50` plus that difference (`https_floor_p50`): the part
//! of an HTTPS GET the daemon could still remove.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::client::{raw_answer, tcp_conn, tls_client, unix_conn, Conn};
use crate::{pct, warm_sample, Ctx, Figures, Opts, Res};

/// Measures the floor of a GET of `path` on each transport; `dir` holds the daemon's
/// `tls/` and `answer` is the daemon's whole answer to that GET (status line to body).
pub(crate) fn transport_figures(
    o: &Opts,
    dir: &Path,
    path: &str,
    bearer: &str,
    answer: Vec<u8>,
    figs: &mut Figures,
) -> Res<()> {
    let answer = Arc::new(answer);
    let sock = dir.join("floor.sock");
    let _ = std::fs::remove_file(&sock);
    let unix = UnixListener::bind(&sock).ctx("binding the floor socket")?;
    let accept = move || -> Res<Box<dyn ReadWrite>> {
        let (s, _) = unix.accept().ctx("accept")?;
        Ok(Box::new(s))
    };
    let unix_lat = floor_lat(o, path, &answer, accept, || unix_conn(&sock))?;

    let (accept, addr) = tcp_accept()?;
    let accept = move || -> Res<Box<dyn ReadWrite>> { Ok(Box::new(accept()?)) };
    let tcp_lat = floor_lat(o, path, &answer, accept, || tcp_conn(addr))?;

    let (accept, addr) = tcp_accept()?;
    let config = server_config(&dir.join("tls"))?;
    let accept = move || -> Res<Box<dyn ReadWrite>> {
        let conn = rustls::ServerConnection::new(config).ctx("TLS server")?;
        Ok(Box::new(rustls::StreamOwned::new(conn, accept()?)))
    };
    let ca = dir.join("tls/ca.pem");
    let tls_lat = floor_lat(o, path, &answer, accept, || tls_client(addr, &ca, bearer))?;

    let (unix_p50, tls_p50) = (pct(&unix_lat, 50.0), pct(&tls_lat, 50.0));
    figs.add("transport_unix_p50", unix_p50, "ms");
    figs.add("transport_tcp_p50", pct(&tcp_lat, 50.0), "ms");
    figs.add("transport_tls_p50", tls_p50, "ms");
    let floor = figs.value("get_unix_p50") + (tls_p50 - unix_p50);
    figs.add("https_floor_p50", floor, "ms");
    Ok(())
}

/// A loopback TCP listener's one accept (with TCP_NODELAY, as the daemon sets it) and its
/// address.
fn tcp_accept() -> Res<(impl FnOnce() -> Res<TcpStream> + Send + 'static, SocketAddr)> {
    let tcp = TcpListener::bind("127.0.0.1:0").ctx("binding a floor port")?;
    let addr = tcp.local_addr().ctx("local_addr")?;
    let accept = move || {
        let (s, _) = tcp.accept().ctx("accept")?;
        s.set_nodelay(true).ctx("nodelay")?;
        Ok(s)
    };
    Ok((accept, addr))
}

/// GET latencies of `path` against a floor server that `accept`s one connection, over the
/// connection `connect` makes.
fn floor_lat<A, S>(
    o: &Opts,
    path: &str,
    answer: &Arc<Vec<u8>>,
    accept: A,
    connect: impl FnOnce() -> Res<Conn<S>>,
) -> Res<Vec<std::time::Duration>>
where
    A: FnOnce() -> Res<Box<dyn ReadWrite>> + Send + 'static,
    S: Read + Write,
{
    let server = serve(answer.clone(), accept);
    let mut c = connect()?;
    let lat = get_lat(o, &mut c, path)?;
    drop(c);
    join(server)?;
    Ok(lat)
}

trait ReadWrite: Read + Write + Send {}
impl<T: Read + Write + Send> ReadWrite for T {}

fn get_lat<S: Read + Write>(
    o: &Opts,
    c: &mut Conn<S>,
    path: &str,
) -> Res<Vec<std::time::Duration>> {
    warm_sample(o.seconds, |_| match c.request("GET", path, b"")? {
        (200, _) => Ok(()),
        (status, _) => Err(format!("the floor server answered {status}")),
    })
}

/// A thread that accepts one connection and answers every request on it (a head ending
/// in an empty line; GETs have no body) with `answer`, until the client closes.
fn serve<A>(answer: Arc<Vec<u8>>, accept: A) -> JoinHandle<Res<()>>
where
    A: FnOnce() -> Res<Box<dyn ReadWrite>> + Send + 'static,
{
    std::thread::spawn(move || {
        let mut s = accept()?;
        let (mut buf, mut chunk) = (Vec::new(), [0u8; 16 * 1024]);
        loop {
            while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                buf.drain(..end + 4);
                s.write_all(&answer).ctx("answering")?;
                s.flush().ctx("flushing")?;
            }
            match s.read(&mut chunk) {
                Ok(0) => return Ok(()),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                // The client's end of the bench drops the TLS connection without
                // close_notify.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(format!("the floor server's read: {e}")),
            }
        }
    })
}

fn join(server: JoinHandle<Res<()>>) -> Res<()> {
    server
        .join()
        .map_err(|_| "the floor server panicked".to_string())?
}

/// The daemon's TLS server setup (`front::tls::server_config`): its certificate, ring,
/// TLS 1.3 and 1.2, ALPN http/1.1.
fn server_config(tls: &Path) -> Res<Arc<rustls::ServerConfig>> {
    let chain = CertificateDer::pem_file_iter(tls.join("cert.pem")).ctx("reading cert.pem")?;
    let chain: Vec<_> = chain.collect::<Result<_, _>>().ctx("cert.pem")?;
    let key = PrivateKeyDer::from_pem_file(tls.join("key.pem")).ctx("reading key.pem")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions = [&rustls::version::TLS13, &rustls::version::TLS12];
    let builder = rustls::ServerConfig::builder_with_provider(provider);
    let builder = builder.with_protocol_versions(&versions).ctx("TLS")?;
    let mut config = builder
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .ctx("the daemon's certificate and key")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The daemon's whole answer to a GET of `path` on its Unix socket, as the floor servers
/// send it (`Connection: close` is not asked for, so it is a keep-alive answer).
pub(crate) fn recorded_answer(sock: &Path, path: &str) -> Res<Vec<u8>> {
    let mut s = UnixStream::connect(sock).ctx("connecting to the daemon")?;
    raw_answer(&mut s, path)
}
