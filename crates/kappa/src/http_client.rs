//! A minimal blocking HTTP/1.1 client for the command line (`kappa view ... --server`):
//! one request per connection, JSON bodies, and line streaming for Server-Sent Events.
//! Hand-written because the CLI needs only this, and an HTTP client crate would pull in a
//! TLS stack the loopback/LAN use here does not need.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// The largest response body the CLI takes in: far above any page, snapshot or dump the
/// server sends within its own limits, so only a broken or foreign server reaches it.
pub const RESPONSE_BODY_BYTES_MAX: usize = 1 << 30;
/// The longest status, header, chunk-size or event-stream line read.
pub const RESPONSE_LINE_BYTES_MAX: u64 = 64 << 20;

/// What went wrong talking to the server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("'{0}' is not a server address like http://127.0.0.1:8080")]
    BadAddress(String),
    // The io::Error is in the message, so it is not also the error's `source` (which
    // `{:#}` would print a second time).
    #[error("cannot reach {address}: {error} (is `kappa serve` running there? set --server or KAPPA_SERVER)")]
    Connect { address: String, error: std::io::Error },
    #[error("talking to {address}: {error}")]
    Io { address: String, error: std::io::Error },
    /// The connection ended before a whole answer came: the server stopped or restarted,
    /// or something between cut it.
    #[error("the connection to {address} was {how} before a whole answer came (did the server stop or restart?)")]
    Closed { address: String, how: &'static str },
    #[error("{address} sent a malformed HTTP response")]
    Malformed { address: String },
    #[error(
        "{address} sent a response over {limit} bytes (a line over {RESPONSE_LINE_BYTES_MAX} bytes or a body over \
         {RESPONSE_BODY_BYTES_MAX} bytes): is it a kappa server? narrow the request (e.g. --limit) if it is"
    )]
    TooLarge { address: String, limit: u64 },
}

impl ClientError {
    /// Whether the server went away (refused the connection, or closed or reset it before
    /// answering): worth retrying once it may be back, unlike an answer it gave.
    pub fn is_connection_lost(&self) -> bool {
        matches!(self, Self::Connect { .. } | Self::Closed { .. })
    }
}

/// An I/O error on an open connection; a connection closed or reset is [`ClientError::Closed`].
fn io_error(address: &str, error: std::io::Error) -> ClientError {
    use std::io::ErrorKind;
    let how = match error.kind() {
        ErrorKind::UnexpectedEof => "closed",
        ErrorKind::ConnectionReset => "reset",
        ErrorKind::ConnectionAborted => "aborted",
        ErrorKind::BrokenPipe => "closed",
        _ => return ClientError::Io { address: address.to_owned(), error },
    };
    ClientError::Closed { address: address.to_owned(), how }
}

/// Reads one line of at most RESPONSE_LINE_BYTES_MAX bytes into `line` (appending); the
/// bytes read, 0 at the end of the stream.
fn read_bounded_line(address: &str, reader: &mut impl BufRead, line: &mut String) -> Result<usize, ClientError> {
    let read = reader.take(RESPONSE_LINE_BYTES_MAX).read_line(line).map_err(|e| io_error(address, e))?;
    if read as u64 == RESPONSE_LINE_BYTES_MAX && !line.ends_with('\n') {
        return Err(ClientError::TooLarge { address: address.to_owned(), limit: RESPONSE_LINE_BYTES_MAX });
    }
    Ok(read)
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
        TcpStream::connect(&address).map_err(|error| ClientError::Connect { address: address.clone(), error })?;
    let io = |error| io_error(&address, error);
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
    let mut line = String::new();
    if read_bounded_line(address, reader, &mut line)? == 0 {
        return Err(ClientError::Closed { address: address.to_owned(), how: "closed" });
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ClientError::Malformed { address: address.to_owned() })?;
    let (mut chunked, mut length) = (false, None);
    loop {
        line.clear();
        if read_bounded_line(address, reader, &mut line)? == 0 {
            return Err(ClientError::Closed { address: address.to_owned(), how: "closed" });
        }
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
    let io = |error| io_error(&address, error);
    let too_large = || ClientError::TooLarge { address: address.clone(), limit: RESPONSE_BODY_BYTES_MAX as u64 };
    let mut bytes = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            read_bounded_line(&address, &mut reader, &mut size)?;
            let size = usize::from_str_radix(size.trim(), 16)
                .map_err(|_| ClientError::Malformed { address: address.clone() })?;
            if size == 0 {
                break;
            }
            if size > RESPONSE_BODY_BYTES_MAX - bytes.len() {
                return Err(too_large());
            }
            let start = bytes.len();
            bytes.resize(start + size, 0);
            reader.read_exact(&mut bytes[start..]).map_err(io)?;
            let mut crlf = [0; 2];
            reader.read_exact(&mut crlf).map_err(io)?;
        }
    } else if let Some(length) = length {
        if length > RESPONSE_BODY_BYTES_MAX {
            return Err(too_large());
        }
        bytes.resize(length, 0);
        reader.read_exact(&mut bytes).map_err(io)?;
    } else {
        (&mut reader).take(RESPONSE_BODY_BYTES_MAX as u64 + 1).read_to_end(&mut bytes).map_err(io)?;
        if bytes.len() > RESPONSE_BODY_BYTES_MAX {
            return Err(too_large());
        }
    }
    Ok(Response { status, body: String::from_utf8_lossy(&bytes).into_owned() })
}

/// One Server-Sent Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// `event:` (empty for none).
    pub name: String,
    /// `id:`, when the event has one (the live API's resume token).
    pub id: Option<String>,
    pub data: String,
}

/// An open Server-Sent Events response, read event by event.
pub struct EventStream {
    address: String,
    reader: BufReader<TcpStream>,
}

/// Opens a Server-Sent Events stream (`GET path`): the stream once the server answered
/// 200, or its other answer as a response.
pub fn open_events(server: &str, path: &str) -> Result<Result<EventStream, Response>, ClientError> {
    let (address, mut reader) = open(server, "GET", path, None, None)?;
    let (status, _, _) = read_head(&address, &mut reader)?;
    if status != 200 {
        let mut body = String::new();
        let _ = (&mut reader).take(RESPONSE_BODY_BYTES_MAX as u64).read_to_string(&mut body);
        let body = body.lines().filter(|l| l.starts_with('{')).collect::<String>();
        return Ok(Err(Response { status, body }));
    }
    Ok(Ok(EventStream { address, reader }))
}

impl EventStream {
    /// The next event. The live API's streams do not end: the server closing one (it
    /// stopped) is [`ClientError::Closed`], as is a reset.
    pub fn next_event(&mut self) -> Result<SseEvent, ClientError> {
        let (mut name, mut id, mut data) = (String::new(), None, String::new());
        let mut line = String::new();
        loop {
            line.clear();
            if read_bounded_line(&self.address, &mut self.reader, &mut line)? == 0 {
                return Err(ClientError::Closed { address: self.address.clone(), how: "closed" });
            }
            let text = line.trim_end_matches(['\r', '\n']);
            if let Some(v) = text.strip_prefix("event:") {
                name = v.trim().to_owned();
            } else if let Some(v) = text.strip_prefix("id:") {
                id = Some(v.trim().to_owned());
            } else if let Some(v) = text.strip_prefix("data:") {
                if data.len() + v.len() > RESPONSE_BODY_BYTES_MAX {
                    let address = self.address.clone();
                    return Err(ClientError::TooLarge { address, limit: RESPONSE_BODY_BYTES_MAX as u64 });
                }
                data.push_str(v.trim_start());
            } else if text.is_empty() && !data.is_empty() {
                return Ok(SseEvent { name, id, data });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A server on port 0 that reads the request head, then sends `response` and closes.
    fn serve_once(response: Vec<u8>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream);
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap() > 2 {
                line.clear();
            }
            let _ = reader.get_mut().write_all(&response);
        });
        format!("http://{address}")
    }

    #[test]
    fn a_content_length_over_the_limit_is_refused_before_allocating() {
        let server = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 1099511627776\r\n\r\n{}".to_vec());
        let error = request(&server, "GET", "/v1/health", None).unwrap_err();
        assert!(matches!(error, ClientError::TooLarge { .. }), "{error}");
    }

    #[test]
    fn a_chunk_size_that_would_overflow_is_refused() {
        let server = serve_once(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n".to_vec());
        let error = request(&server, "GET", "/v1/health", None).unwrap_err();
        assert!(matches!(error, ClientError::TooLarge { .. }), "{error}");
    }

    #[test]
    fn a_header_line_without_end_is_cut_at_the_line_limit() {
        let mut response = b"HTTP/1.1 200 OK\r\nX-Endless: ".to_vec();
        response.resize(RESPONSE_LINE_BYTES_MAX as usize + 1024, b'a');
        let server = serve_once(response);
        let error = request(&server, "GET", "/v1/health", None).unwrap_err();
        assert!(matches!(error, ClientError::TooLarge { .. }), "{error}");
    }

    #[test]
    fn a_connection_closed_before_the_answer_is_a_lost_connection_not_a_malformed_answer() {
        let server = serve_once(Vec::new());
        let error = request(&server, "GET", "/v1/health", None).unwrap_err();
        assert!(matches!(error, ClientError::Closed { how: "closed", .. }) && error.is_connection_lost(), "{error}");
        let server = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}".to_vec());
        let error = request(&server, "GET", "/v1/health", None).unwrap_err();
        assert!(error.is_connection_lost(), "a body cut short: {error}");
        let server = serve_once(b"HTTP/1.1 200 OK\r\n\r\nnot a status line".to_vec());
        assert!(request(&server, "GET", "/", None).is_ok(), "a body to the end of the stream");
        let server = serve_once(b"garbage\r\n\r\n".to_vec());
        let error = request(&server, "GET", "/", None).unwrap_err();
        assert!(matches!(error, ClientError::Malformed { .. }) && !error.is_connection_lost(), "{error}");
    }

    #[test]
    fn server_sent_events_carry_their_name_id_and_data_and_a_closed_stream_is_lost() {
        let server = serve_once(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n: keep-alive\n\n\
              event: snapshot\nid: 1.ab.2\ndata: {\"a\":1}\n\nevent: reset\ndata: {}\n\n"
                .to_vec(),
        );
        let mut stream = open_events(&server, "/watch").unwrap().unwrap();
        let first = stream.next_event().unwrap();
        assert_eq!(first, SseEvent { name: "snapshot".into(), id: Some("1.ab.2".into()), data: r#"{"a":1}"#.into() });
        assert_eq!(stream.next_event().unwrap(), SseEvent { name: "reset".into(), id: None, data: "{}".into() });
        assert!(stream.next_event().unwrap_err().is_connection_lost());
    }

    #[test]
    fn chunked_and_sized_bodies_are_read_whole() {
        let server = serve_once(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n4\r\n\":1}\r\n0\r\n\r\n".to_vec(),
        );
        assert_eq!(request(&server, "GET", "/", None).unwrap().body, r#"{"a":1}"#);
        let server = serve_once(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}".to_vec());
        let response = request(&server, "GET", "/", None).unwrap();
        assert_eq!((response.status, response.body.as_str()), (404, "{}"));
    }
}
