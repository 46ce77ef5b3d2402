//! An in-process kappa: a real log in a temp directory, the view engine with test views,
//! and the HTTP API on a loopback port; plus a small blocking HTTP client.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use kappa_http::{AppState, Extensions, HttpConfig};
use kappa_log::{Log, LogOptions};
use kappa_views::{EmbeddedLog, EngineConfig, Event, EventError, Reducer, Schemas, View, ViewEngine};
use serde_json::Value;

#[path = "http.rs"]
mod http;
pub use http::*;

pub const TOPIC: &str = "items";

/// key → the latest JSON value of that key (v1), or `{"v2": value}` (v2); a tombstone
/// deletes the key.
pub struct Latest {
    pub wrap: bool,
}

impl Reducer for Latest {
    type State = Value;

    fn key(&self, event: &Event) -> Option<String> {
        event.key_str().map(str::to_owned)
    }

    fn apply(&self, _: Option<Value>, event: &Event) -> Result<Option<Value>, EventError> {
        let Some(value) = event.payload()? else { return Ok(None) };
        Ok(Some(if self.wrap { serde_json::json!({"v2": value}) } else { value.clone() }))
    }
}

pub fn latest(version: u32) -> View {
    View::reducer("latest", version, &[TOPIC], Latest { wrap: version > 1 })
}

pub struct Kappa {
    pub dir: tempfile::TempDir,
    pub log: Arc<Log>,
    pub engine: ViewEngine,
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    pub runtime: tokio::runtime::Runtime,
}

impl Kappa {
    pub fn start(views: Vec<View>, config: HttpConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, views, config)
    }

    pub fn start_in(dir: tempfile::TempDir, views: Vec<View>, config: HttpConfig) -> Self {
        let log = Arc::new(Log::open(&dir.path().join("log"), LogOptions::default()).unwrap().0);
        if log.topic(TOPIC).is_err() {
            log.create_topic(TOPIC, 3, &BTreeMap::new()).unwrap();
        }
        let engine_config = EngineConfig { schemas: Schemas::new(), ..EngineConfig::new(dir.path().join("views")) };
        let engine = ViewEngine::start(Arc::new(EmbeddedLog::new(log.clone())), engine_config, views).unwrap();
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(WORKER_THREADS).enable_all().build().unwrap();
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        // The transaction coordinator multi-partition produce requests go through (the
        // kappa binary attaches its broker's).
        let transactions = runtime.block_on(async {
            let offsets = Arc::new(kappa_coordinator::OffsetStore::open(&log).unwrap());
            kappa_coordinator::TxnCoordinator::open(log.clone(), offsets, Default::default()).await.unwrap()
        });
        let extensions = Extensions { transactions: Some(transactions), ..Extensions::default() };
        let state = AppState::with_extensions(log.clone(), engine.clone(), config, extensions);
        runtime.spawn(kappa_http::run(listener, state.clone(), std::future::pending()));
        Self { dir, log, engine, addr, state, runtime }
    }

    /// Stops everything, keeping the directory.
    pub fn stop(self) -> tempfile::TempDir {
        self.runtime.shutdown_background();
        self.engine.shutdown();
        self.log.close().unwrap();
        self.dir
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        request(self.addr, "GET", path, None, &[])
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        request(self.addr, "POST", path, Some(body.to_string().as_bytes()), &[])
    }

    pub fn post_raw(&self, path: &str, body: &[u8]) -> (u16, Value) {
        request(self.addr, "POST", path, Some(body), &[])
    }

    pub fn delete(&self, path: &str) -> (u16, Value) {
        request(self.addr, "DELETE", path, None, &[])
    }

    /// Produces records over HTTP; panics unless 200.
    pub fn produce(&self, records: Value) -> Value {
        self.produce_to(TOPIC, records)
    }

    pub fn produce_to(&self, topic: &str, records: Value) -> Value {
        let (status, body) =
            self.post(&format!("/v1/topics/{topic}/records"), &serde_json::json!({"records": records}));
        assert_eq!(status, 200, "{body}");
        body
    }

    pub fn wait_caught_up(&self, view: &str) {
        assert!(self.engine.wait_caught_up(view, Duration::from_secs(30)).unwrap(), "{view} did not catch up");
    }

    /// Occupies both of the server runtime's worker threads until the guard drops: no task
    /// (hub, subscription, HTTP handler) runs meanwhile, so whatever the test does to the
    /// engine and the log in between happens, as far as they can tell, all at once.
    pub fn pause(&self) -> Paused {
        let (started_tx, started) = std::sync::mpsc::channel();
        let mut releases = Vec::new();
        for _ in 0..WORKER_THREADS {
            let (release, wait) = std::sync::mpsc::channel::<()>();
            let started_tx = started_tx.clone();
            self.runtime.spawn(async move {
                started_tx.send(()).unwrap();
                let _ = wait.recv();
            });
            releases.push(release);
        }
        for _ in 0..WORKER_THREADS {
            started.recv_timeout(Duration::from_secs(30)).expect("a worker thread to block");
        }
        Paused { _releases: releases }
    }
}

/// The server runtime's worker threads.
const WORKER_THREADS: usize = 2;

/// Holds the server runtime's workers ([`Kappa::pause`]) until dropped.
pub struct Paused {
    _releases: Vec<std::sync::mpsc::Sender<()>>,
}

/// A WebSocket client (blocking).
pub struct Ws {
    pub socket: tungstenite::WebSocket<TcpStream>,
}

impl Ws {
    pub fn connect(addr: SocketAddr) -> Self {
        Self::connect_with_origin(addr, None).expect("websocket handshake")
    }

    pub fn connect_with_origin(addr: SocketAddr, origin: Option<&str>) -> Result<Self, tungstenite::Error> {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut request =
            tungstenite::client::IntoClientRequest::into_client_request(format!("ws://{addr}/v1/ws")).unwrap();
        if let Some(origin) = origin {
            request.headers_mut().insert("Origin", origin.parse().unwrap());
        }
        let (socket, _) = tungstenite::client::client(request, stream).map_err(|e| match e {
            tungstenite::HandshakeError::Failure(e) => e,
            tungstenite::HandshakeError::Interrupted(_) => panic!("blocking handshake interrupted"),
        })?;
        Ok(Self { socket })
    }

    pub fn send(&mut self, message: &Value) {
        self.socket.send(tungstenite::Message::Text(message.to_string().into())).unwrap();
    }

    pub fn send_text(&mut self, text: &str) {
        self.socket.send(tungstenite::Message::Text(text.to_owned().into())).unwrap();
    }

    /// The next JSON message, or None on timeout.
    pub fn try_next(&mut self) -> Option<Value> {
        loop {
            match self.socket.read() {
                Ok(tungstenite::Message::Text(text)) => return Some(serde_json::from_str(&text).unwrap()),
                Ok(tungstenite::Message::Close(frame)) => panic!("closed: {frame:?}"),
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => return None,
                Err(e) => panic!("websocket: {e}"),
            }
        }
    }

    /// The next JSON message if one arrives within `wait` (the server's pings, which end a
    /// read and so would restart a read timeout, do not extend it); None if none does.
    pub fn next_within(&mut self, wait: Duration) -> Option<Value> {
        let deadline = std::time::Instant::now() + wait;
        let stream = self.socket.get_ref().try_clone().unwrap();
        let restore = stream.read_timeout().unwrap();
        let message = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break None;
            }
            stream.set_read_timeout(Some(left)).unwrap();
            match self.socket.read() {
                Ok(tungstenite::Message::Text(text)) => break Some(serde_json::from_str(&text).unwrap()),
                Ok(tungstenite::Message::Close(frame)) => panic!("closed: {frame:?}"),
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
                {
                    break None;
                }
                Err(e) => panic!("websocket: {e}"),
            }
        };
        stream.set_read_timeout(restore).unwrap();
        message
    }

    /// The next JSON message (panics on close or timeout).
    pub fn next(&mut self) -> Value {
        loop {
            match self.socket.read().expect("websocket message") {
                tungstenite::Message::Text(text) => return serde_json::from_str(&text).unwrap(),
                tungstenite::Message::Close(frame) => panic!("closed: {frame:?}"),
                _ => continue,
            }
        }
    }
}
