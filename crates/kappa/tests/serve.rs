//! `kappa serve` end to end: start, produce and consume with kcat, clean stop and restart,
//! kill -9 and recovery.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Server, run};

fn kcat(server: &Server) -> Command {
    let mut command = Command::new("kcat");
    command.arg("-b").arg(server.bootstrap());
    command
}

fn produce(server: &Server, topic: &str, lines: &str) {
    use std::io::Write;
    let mut child =
        kcat(server).args(["-P", "-t", topic, "-K:"]).stdin(std::process::Stdio::piped()).spawn().expect("kcat");
    child.stdin.take().unwrap().write_all(lines.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success(), "kcat produce failed; server log:\n{}", server.log());
}

fn consume_all(server: &Server, topic: &str) -> Vec<String> {
    let out = run(kcat(server).args(["-C", "-t", topic, "-e", "-q", "-f", "%k:%s\n"]), Duration::from_secs(30), server);
    out.lines().map(str::to_owned).collect()
}

#[test]
fn records_survive_clean_restart_and_kill_9() {
    let mut server = Server::start();
    produce(&server, "events", "a:1\nb:2\n");
    assert_eq!(consume_all(&server, "events"), ["a:1", "b:2"]);

    server.stop();
    assert!(server.log().contains("stopped cleanly"), "{}", server.log());
    server.restart(&[]);
    assert!(server.log().contains("clean=true"), "a clean stop needs no scan:\n{}", server.log());
    produce(&server, "events", "c:3\n");

    server.kill9();
    server.restart(&[]);
    assert_eq!(consume_all(&server, "events"), ["a:1", "b:2", "c:3"], "acknowledged records survive kill -9");
}

#[test]
fn auto_creation_follows_its_settings() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_in(dir.path(), &["--num-partitions", "3"]);
    produce(&server, "auto", "a:1\n");
    let metadata = run(kcat(&server).args(["-L", "-t", "auto"]), Duration::from_secs(30), &server);
    assert!(metadata.contains("with 3 partitions"), "{metadata}");
    drop(server);

    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_in(dir.path(), &["--auto-create-topics", "false"]);
    let metadata = run(kcat(&server).args(["-L", "-t", "missing"]), Duration::from_secs(30), &server);
    assert!(metadata.contains("Unknown topic") || metadata.contains("Broker: Unknown topic"), "{metadata}");
}

/// A client that connects the moment the port opens gets answers at once: the ports are
/// bound early (a second kappa fails fast) but listen only after recovery, the coordinators
/// and the views, and kappa logs that it runs just before. (kafka-node waits 500 ms for a
/// connection's first answer, then speaks Kafka 0.9 on it for good.)
#[test]
fn the_ports_open_only_once_kappa_is_ready() {
    let fresh = Server::start();
    assert_ready_when_open(&fresh, "a fresh data directory");
    drop(fresh);
    let dir = tempfile::tempdir().expect("temp dir");
    let mut first = Server::start_in(dir.path(), &[]);
    produce(&first, "warm", "k1:v1\nk2:v2\n");
    first.stop();
    let restarted = Server::start_in(dir.path(), &[]);
    assert_ready_when_open(&restarted, "a restart with data");
}

fn assert_ready_when_open(server: &Server, case: &str) {
    // `Server::start*` returns at the first connection the Kafka port accepts.
    let log = server.log();
    assert!(
        log.contains("kappa is running"),
        "{case}: the Kafka port accepted a connection before kappa was ready; log:\n{log}"
    );
    let http = std::net::TcpStream::connect(server.http);
    assert!(http.is_ok(), "{case}: the HTTP port is not open once the Kafka port is: {http:?}");
}

#[test]
fn bad_flags_fail_with_a_clear_message() {
    let output = Command::new(env!("CARGO_BIN_EXE_kappa")).args(["serve", "--sync", "sometimes"]).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("interval:<ms>"), "{stderr}");
}

/// A port in use fails the start before anything touches the data directory (it was
/// created, then the start failed on the port).
#[test]
fn a_port_in_use_fails_before_the_data_directory_is_created() {
    let temp = tempfile::tempdir().expect("temp dir");
    let data_dir = temp.path().join("data");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    let taken_addr = taken.local_addr().expect("local addr").to_string();
    let free_http = format!("127.0.0.1:{}", common::free_port());
    for flags in [
        ["--kafka-listen", &taken_addr, "--http-listen", &free_http],
        ["--http-listen", &taken_addr, "--kafka-listen", &free_http],
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_kappa"))
            .args(["serve", "--data-dir", data_dir.to_str().unwrap()])
            .args(flags)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{flags:?}: started on a port in use: {stderr}");
        assert!(stderr.contains(&taken_addr), "{flags:?}: the error does not name the port: {stderr}");
        assert!(!data_dir.exists(), "{flags:?}: the data directory was created before the port failed");
    }
}

/// `RUST_LOG` chooses what the server logs (it was ignored: always info): `warn` drops the
/// info lines, `kappa_broker=debug` shows a connection closing and nothing else, a value that
/// does not parse is reported and logging stays at info.
#[test]
fn rust_log_chooses_what_the_server_logs() {
    let warn = serve_log_with("warn");
    assert!(!warn.contains("kappa is running"), "RUST_LOG=warn still logged info lines:\n{warn}");
    let broker_debug = serve_log_with("kappa_broker=debug");
    assert!(
        broker_debug.contains("connection closed"),
        "RUST_LOG=kappa_broker=debug logged no debug line:\n{broker_debug}"
    );
    assert!(
        !broker_debug.contains("kappa is running"),
        "RUST_LOG=kappa_broker=debug logged other targets' info:\n{broker_debug}"
    );
    let typo = serve_log_with("kappa_broker=loud");
    assert!(typo.contains("RUST_LOG=\"kappa_broker=loud\" is not a list of log directives"), "{typo}");
    assert!(typo.contains("kappa is running"), "a bad RUST_LOG silenced the info lines:\n{typo}");
}

/// What `kappa serve` wrote to stderr from start to SIGTERM under `RUST_LOG=rust_log`, with
/// one connection opened and closed once it listens.
fn serve_log_with(rust_log: &str) -> String {
    use std::io::Read;
    use std::process::Stdio;

    let temp = tempfile::tempdir().expect("temp dir");
    let kafka = format!("127.0.0.1:{}", common::free_port());
    let http = format!("127.0.0.1:{}", common::free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_kappa"))
        .args(["serve", "--data-dir", temp.path().to_str().unwrap(), "--kafka-listen", &kafka, "--http-listen", &http])
        .env("RUST_LOG", rust_log)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kappa serve");
    let started = std::time::Instant::now();
    while std::net::TcpStream::connect(&kafka).is_err() {
        assert!(started.elapsed() < Duration::from_secs(30), "kappa serve did not listen within 30 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    // One request answered, so the broker serves this connection (a bare connect may still
    // wait in the accept queue when SIGTERM comes); then closed, and a moment to notice.
    {
        use std::io::Write;
        // size 10, api key 18 (ApiVersions), version 0, correlation id 1, null client id.
        const API_VERSIONS_V0: [u8; 14] = [0, 0, 0, 10, 0, 18, 0, 0, 0, 0, 0, 1, 0xff, 0xff];
        let mut stream = std::net::TcpStream::connect(&kafka).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        stream.write_all(&API_VERSIONS_V0).expect("send ApiVersions");
        let mut size = [0u8; 4];
        stream.read_exact(&mut size).expect("the ApiVersions answer");
    }
    std::thread::sleep(Duration::from_millis(200));
    Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().expect("kill -TERM");
    let mut log = String::new();
    child.stderr.take().expect("stderr").read_to_string(&mut log).expect("read stderr");
    assert!(child.wait().expect("wait").success(), "kappa serve failed under RUST_LOG={rust_log}:\n{log}");
    log
}

/// The Kafka listener's limits come from `serve`'s flags (they were fixed at their defaults):
/// a second connection past `--kafka-connections-max 1` is closed at once, and a connection
/// that sends nothing more after its one request is closed after
/// `--kafka-idle-connection-timeout-ms`.
#[test]
fn the_kafka_listeners_limits_come_from_the_flags() {
    use std::net::TcpStream;

    let temp = tempfile::tempdir().expect("temp dir");
    let flags = ["--kafka-connections-max", "1", "--kafka-idle-connection-timeout-ms", "5000"];
    let server = Server::start_in(temp.path(), &flags);
    let first = holding_the_only_slot(&server);
    let started = std::time::Instant::now();
    let second = TcpStream::connect(server.kafka).expect("connect");
    assert!(closed_by_server(second), "a connection past --kafka-connections-max was kept");
    let past_limit_closed_after = started.elapsed();
    assert!(closed_by_server(first), "an idle connection was not closed");
    let idle_closed_after = started.elapsed();
    assert!(
        past_limit_closed_after < Duration::from_secs(4) && idle_closed_after < Duration::from_secs(20),
        "closed after {past_limit_closed_after:?} (past the limit: at once) and {idle_closed_after:?} (idle: 5 s, not the default 10 min)"
    );
}

/// A connection that got an answer (ApiVersions v0), so holds the listener's one slot: the
/// readiness probe's connection may hold it for a moment after the server is up.
fn holding_the_only_slot(server: &Server) -> std::net::TcpStream {
    use std::io::{Read, Write};
    // size 10, api key 18 (ApiVersions), version 0, correlation id 1, null client id.
    const API_VERSIONS_V0: [u8; 14] = [0, 0, 0, 10, 0, 18, 0, 0, 0, 0, 0, 1, 0xff, 0xff];
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut stream = std::net::TcpStream::connect(server.kafka).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut size = [0u8; 4];
        if stream.write_all(&API_VERSIONS_V0).is_ok() && stream.read_exact(&mut size).is_ok() {
            let mut answer = vec![0u8; u32::from_be_bytes(size) as usize];
            stream.read_exact(&mut answer).expect("the ApiVersions answer");
            return stream;
        }
        assert!(std::time::Instant::now() < deadline, "no connection got the listener's slot");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// True when the server closes `stream` (end of stream or reset) within 30 s.
fn closed_by_server(mut stream: std::net::TcpStream) -> bool {
    use std::io::Read;
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    match stream.read(&mut [0u8; 1]) {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}
