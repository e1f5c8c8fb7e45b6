//! The tests' HTTP side over the Unix socket: a minimal client (one connection per request,
//! so tests can also send malformed requests) and the parsed response.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

/// A parsed HTTP response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// Asserts 200 and returns the JSON body.
    #[track_caller]
    pub fn ok(&self) -> Value {
        assert_eq!(
            self.status,
            200,
            "body: {:?}",
            String::from_utf8_lossy(&self.body)
        );
        self.json()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// As [`Response::assert_error`], first naming `what` (the request) and the raw body if
    /// the status is not `status`.
    #[track_caller]
    pub fn assert_error_for(&self, what: &str, status: u16, code: &str) -> Value {
        assert_eq!(
            self.status,
            status,
            "{what}: {:?}",
            String::from_utf8_lossy(&self.body)
        );
        self.assert_error(status, code)
    }

    /// Asserts the status and the error code of a JSON error body.
    #[track_caller]
    pub fn assert_error(&self, status: u16, code: &str) -> Value {
        let body = self.json();
        assert_eq!(self.status, status, "body: {body}");
        assert_eq!(body["error"], code, "body: {body}");
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "error without a message: {body}"
        );
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "error body must be JSON"
        );
        body
    }
}

/// A minimal HTTP/1.1 client over the Unix socket: one connection per request, so tests can
/// also send malformed requests.
#[derive(Clone)]
pub struct Client {
    pub sock: PathBuf,
}

impl Client {
    pub fn raw(&self, request: &[u8]) -> Response {
        let mut s = UnixStream::connect(&self.sock).expect("connect to the daemon");
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.write_all(request).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        parse_response(&buf)
    }

    pub fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Response {
        self.raw(&request(method, path, headers, body))
    }

    pub fn get(&self, path: &str) -> Response {
        self.send("GET", path, &[], b"")
    }

    /// Every page of `GET /v1/keys?limit={limit}`, following `next_cursor` (each answered
    /// 200); fails past `most` pages.
    pub fn pages(&self, limit: usize, most: usize) -> Vec<Value> {
        let mut pages = Vec::new();
        let mut path = format!("/v1/keys?limit={limit}");
        loop {
            let body = self.get(&path).ok();
            let next = body["next_cursor"]
                .as_str()
                .map(|cur| format!("/v1/keys?limit={limit}&cursor={cur}"));
            pages.push(body);
            match next {
                Some(p) => path = p,
                None => return pages,
            }
            assert!(pages.len() <= most, "more than {most} pages");
        }
    }

    pub fn patch(&self, kid: &str, body: &Value) -> Response {
        self.send(
            "PATCH",
            &format!("/v1/keys/{kid}"),
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        )
    }
}

/// One HTTP/1.1 request with `Connection: close` (and a Content-Length when there is a
/// body, or for PATCH and POST).
pub fn request(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "PATCH" || method == "POST" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

pub fn parse_response(buf: &[u8]) -> Response {
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP response: {:?}", String::from_utf8_lossy(buf)));
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status: u16 = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = buf[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    Response {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = data.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size =
            usize::from_str_radix(std::str::from_utf8(&data[..eol]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[eol + 2..eol + 2 + size]);
        data = &data[eol + 2 + size + 2..];
    }
}
