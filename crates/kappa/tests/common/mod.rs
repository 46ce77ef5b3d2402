//! Runs the real `kappa` binary for end-to-end tests: a temp data directory, a free
//! loopback port, readiness by connecting, clean stop (SIGTERM) and kill -9.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `kappa serve`.
pub struct Server {
    child: Option<Child>,
    binary: PathBuf,
    /// A command the server runs under (e.g. `strace -D ...`), which must exec it in the
    /// same process so the child's pid is kappa's; empty for none.
    launcher: Vec<String>,
    pub data_dir: PathBuf,
    pub kafka: SocketAddr,
    pub http: SocketAddr,
    log_path: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind port 0").local_addr().expect("local addr").port()
}

impl Server {
    /// Starts a server on a fresh temp data directory.
    pub fn start() -> Self {
        let temp = tempfile::tempdir().expect("temp dir");
        let mut server = Self::start_in(temp.path(), &[]);
        server._temp = Some(temp);
        server
    }

    /// Starts a server on `data_dir` with extra flags.
    pub fn start_in(data_dir: &Path, extra: &[&str]) -> Self {
        Self::start_binary_in(Path::new(env!("CARGO_BIN_EXE_kappa")), data_dir, extra)
    }

    /// Starts `binary serve` (the kappa binary or an application built on kappa::App).
    pub fn start_binary_in(binary: &Path, data_dir: &Path, extra: &[&str]) -> Self {
        Self::start_launched_in(&[], binary, data_dir, extra)
    }

    /// Starts `launcher... binary serve`: kappa under a tool that runs it in the spawned
    /// process itself (`strace -D` does: the tracer becomes a grandchild), so signals and
    /// `pid()` still reach kappa.
    pub fn start_launched_in(launcher: &[&str], binary: &Path, data_dir: &Path, extra: &[&str]) -> Self {
        let kafka: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log_path = data_dir.with_extension(format!("{}.log", kafka.port()));
        let mut server = Self {
            child: None,
            binary: binary.to_owned(),
            launcher: launcher.iter().map(|s| s.to_string()).collect(),
            data_dir: data_dir.to_owned(),
            kafka,
            http,
            log_path,
            _temp: None,
        };
        server.spawn(extra);
        server
    }

    fn spawn(&mut self, extra: &[&str]) {
        let log = std::fs::File::create(&self.log_path).expect("server log file");
        let mut command = match self.launcher.split_first() {
            Some((tool, args)) => {
                let mut command = Command::new(tool);
                command.args(args).arg(&self.binary);
                command
            }
            None => Command::new(&self.binary),
        };
        let child = command
            .arg("serve")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--kafka-listen")
            .arg(self.kafka.to_string())
            .arg("--http-listen")
            .arg(self.http.to_string())
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting kappa serve (launcher {:?}): {e}", self.launcher));
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            if TcpStream::connect(self.kafka).is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("kappa serve exited with {status} before listening; log:\n{}", self.log());
            }
            // Short: `the_ports_open_only_once_kappa_is_ready` relies on seeing the port
            // open within a millisecond or so of it opening.
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("kappa serve did not listen on {} within 30 s; log:\n{}", self.kafka, self.log());
    }

    /// `host:port` for Kafka clients.
    pub fn bootstrap(&self) -> String {
        self.kafka.to_string()
    }

    /// The running server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the server is running").id()
    }

    /// What the server logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// SIGTERM and wait: the clean shutdown path (flush + checkpoint).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            let status = child.wait().expect("wait for kappa");
            assert!(status.success(), "kappa serve exited with {status} on SIGTERM; log:\n{}", self.log());
        }
    }

    /// SIGKILL: a crash.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same data directory and ports.
    pub fn restart(&mut self, extra: &[&str]) {
        assert!(self.child.is_none(), "stop or kill the server before restarting it");
        self.spawn(extra);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
        let _ = std::fs::remove_file(&self.log_path);
    }
}

/// Runs a command to completion with a timeout, returning stdout; panics with stderr and
/// the server log on failure or timeout.
pub fn run(command: &mut Command, timeout: Duration, server: &Server) -> String {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {command:?}: {e}"));
    let started = Instant::now();
    loop {
        if let Some(_status) = child.try_wait().expect("try_wait") {
            break;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let output = child.wait_with_output().expect("output");
            panic!(
                "{command:?} timed out after {timeout:?}\nstdout:\n{}\nstderr:\n{}\nserver log:\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
                server.log()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().expect("output");
    assert!(
        output.status.success(),
        "{command:?} failed with {}\nstdout:\n{}\nstderr:\n{}\nserver log:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        server.log()
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// An example program built beside the tests (`cargo build --examples`, which
/// `cargo test`, nextest and scripts/test-all do).
pub fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
    let path = profile_dir.join("examples").join(name);
    assert!(path.exists(), "{} is missing: build it with `cargo build --examples`", path.display());
    path
}

/// The repository root (for client scripts under tests/clients).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repo root")
}

/// `tests/clients/python/channels_events.py`: deterministic channel events and an
/// independent reference fold of the channels views.
pub fn channels_events_script() -> PathBuf {
    repo_root().join("tests/clients/python/channels_events.py")
}

/// Produces channel events `start..start + count` of `seed` (idempotent, acks=all).
pub fn produce_channel_events(server: &Server, seed: u64, start: u64, count: u64) {
    let mut command = Command::new("python3");
    command.arg(channels_events_script()).args(["produce", "--bootstrap", &server.bootstrap()]);
    command.args(["--seed", &seed.to_string(), "--start", &start.to_string(), "--count", &count.to_string()]);
    run(&mut command, Duration::from_secs(600), server);
}

/// The reference fold after events `0..count`: view name → key → value.
pub fn expected_views(
    server: &Server,
    seed: u64,
    count: u64,
) -> std::collections::BTreeMap<String, std::collections::BTreeMap<String, serde_json::Value>> {
    let mut command = Command::new("python3");
    command.arg(channels_events_script()).args(["expect", "--seed", &seed.to_string(), "--count", &count.to_string()]);
    serde_json::from_str(&run(&mut command, Duration::from_secs(600), server)).expect("expected views as JSON")
}

/// A seed for a randomized test (print it so a failure can be replayed with `SEED=`).
pub fn random_seed() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 % 1_000_000
}

/// splitmix64: a tiny deterministic generator (e.g. for kill delays).
pub fn next_random(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
