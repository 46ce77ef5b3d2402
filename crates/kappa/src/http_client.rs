//! A minimal blocking HTTP/1.1 client for the command line (`kappa view ... --server`):
//! one request per connection, JSON bodies, and line streaming for Server-Sent Events.
//! Hand-written because the CLI needs only this, and an HTTP client crate would pull in a
//! TLS stack the loopback/LAN use here does not need.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// What went wrong talking to the server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("'{0}' is not a server address like http://127.0.0.1:8080")]
    BadAddress(String),
    #[error("cannot reach {address}: {source} (is `kappa serve` running there? set --server or KAPPA_SERVER)")]
    Connect { address: String, source: std::io::Error },
    #[error("talking to {address}: {source}")]
    Io { address: String, source: std::io::Error },
    #[error("{address} sent a malformed HTTP response")]
    Malformed { address: String },
}

/// A whole response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

impl Response {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The API's error message, or the body.
    pub fn error_message(&self) -> String {
        let json = self.json();
        match json["error"]["message"].as_str() {
            Some(message) => format!("{message} ({})", json["error"]["code"].as_str().unwrap_or("error")),
            None => format!("HTTP {}: {}", self.status, self.body),
        }
    }
}

fn address(server: &str) -> Result<String, ClientError> {
    let rest = server.strip_prefix("http://").ok_or_else(|| ClientError::BadAddress(server.to_owned()))?;
    let host = rest.trim_end_matches('/');
    if host.is_empty() || host.contains('/') {
        return Err(ClientError::BadAddress(server.to_owned()));
    }
    Ok(host.to_owned())
}

fn open(
    server: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Option<Duration>,
) -> Result<(String, BufReader<TcpStream>), ClientError> {
    let address = address(server)?;
    let mut stream =
        TcpStream::connect(&address).map_err(|source| ClientError::Connect { address: address.clone(), source })?;
    let io = |source| ClientError::Io { address: address.clone(), source };
    stream.set_read_timeout(timeout).map_err(io)?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nAccept: application/json, text/event-stream\r\n"
    );
    if let Some(body) = body {
        head.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).map_err(io)?;
    if let Some(body) = body {
        stream.write_all(body.as_bytes()).map_err(io)?;
    }
    Ok((address, BufReader::new(stream)))
}

/// Reads the status line and headers; returns (status, chunked, content length).
fn read_head(address: &str, reader: &mut BufReader<TcpStream>) -> Result<(u16, bool, Option<usize>), ClientError> {
    let io = |source| ClientError::Io { address: address.to_owned(), source };
    let mut line = String::new();
    reader.read_line(&mut line).map_err(io)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ClientError::Malformed { address: address.to_owned() })?;
    let (mut chunked, mut length) = (false, None);
    loop {
        line.clear();
        reader.read_line(&mut line).map_err(io)?;
        let header = line.trim_end().to_ascii_lowercase();
        if header.is_empty() {
            return Ok((status, chunked, length));
        }
        chunked |= header == "transfer-encoding: chunked";
        if let Some(v) = header.strip_prefix("content-length:") {
            length = v.trim().parse().ok();
        }
    }
}

/// One request; the whole response.
pub fn request(server: &str, method: &str, path: &str, body: Option<&str>) -> Result<Response, ClientError> {
    let (address, mut reader) = open(server, method, path, body, Some(Duration::from_secs(600)))?;
    let (status, chunked, length) = read_head(&address, &mut reader)?;
    let io = |source| ClientError::Io { address: address.clone(), source };
    let mut bytes = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size).map_err(io)?;
            let size = usize::from_str_radix(size.trim(), 16)
                .map_err(|_| ClientError::Malformed { address: address.clone() })?;
            if size == 0 {
                break;
            }
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).map_err(io)?;
            bytes.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(length) = length {
        bytes.resize(length, 0);
        reader.read_exact(&mut bytes).map_err(io)?;
    } else {
        reader.read_to_end(&mut bytes).map_err(io)?;
    }
    Ok(Response { status, body: String::from_utf8_lossy(&bytes).into_owned() })
}

/// Streams a Server-Sent Events response, calling `on_event(name, data)` per event until it
/// returns false or the stream ends. A non-200 answer is returned as a response.
pub fn stream_events(
    server: &str,
    path: &str,
    mut on_event: impl FnMut(&str, &str) -> bool,
) -> Result<Option<Response>, ClientError> {
    let (address, mut reader) = open(server, "GET", path, None, None)?;
    let (status, _, _) = read_head(&address, &mut reader)?;
    if status != 200 {
        let mut body = String::new();
        let _ = reader.read_to_string(&mut body);
        let body = body.lines().filter(|l| l.starts_with('{')).collect::<String>();
        return Ok(Some(Response { status, body }));
    }
    let (mut name, mut data) = (String::new(), String::new());
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).map_err(|source| ClientError::Io { address: address.clone(), source })? == 0 {
            return Ok(None);
        }
        let text = line.trim_end_matches(['\r', '\n']);
        if let Some(v) = text.strip_prefix("event:") {
            name = v.trim().to_owned();
        } else if let Some(v) = text.strip_prefix("data:") {
            data.push_str(v.trim_start());
        } else if text.is_empty() && !data.is_empty() {
            if !on_event(&name, &data) {
                return Ok(None);
            }
            name.clear();
            data.clear();
        }
    }
}
