//! HTTP produce requests spanning several partitions are all-or-nothing across crashes:
//! four threads post multi-partition requests while `kappa serve` is SIGKILLed at random
//! moments and restarted. Afterwards a read_committed Kafka consumer (confluent-kafka) must
//! see every acknowledged request, and every request it sees complete — never a torn one
//! (some partitions' records without the others'). The check is
//! `tests/clients/python/http_atomic.py check`, independent of the Rust code.
//!
//! `SOAK=1` runs 300 cycles instead of 30; `SEED=n` replays one run's kill timing.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Server, next_random, random_seed, repo_root, run};

#[path = "../../kappa-http/tests/common/http.rs"]
mod http;

const TOPIC: &str = "atomic";

fn script() -> std::path::PathBuf {
    repo_root().join("tests/clients/python/http_atomic.py")
}

#[test]
fn multi_partition_http_produce_is_all_or_nothing_across_kill9() {
    let soak = std::env::var("SOAK").is_ok_and(|v| v == "1");
    let cycles: u64 = if soak { 300 } else { 30 };
    let seed: u64 = std::env::var("SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(random_seed);
    eprintln!(
        "http_produce_kill9: seed {seed} ({cycles} cycles); replay with SEED={seed} cargo nextest run -p kappa --test http_produce_kill9"
    );
    let mut server = Server::start();
    let body = serde_json::json!({"name": TOPIC, "partitions": 3});
    let (status, created) = http::request(server.http, "POST", "/v1/topics", Some(body.to_string().as_bytes()), &[]);
    assert_eq!(status, 201, "creating the topic: {created}");
    let acked = server.data_dir.with_extension("acked");
    let mut rng = seed;
    for cycle in 0..cycles {
        let mut producer = Command::new("python3")
            .arg(script())
            .args(["produce", "--http", &server.http.to_string(), "--topic", TOPIC, "--acked"])
            .arg(&acked)
            .args(["--id-prefix", &format!("c{cycle}")])
            .stdout(Stdio::null())
            .spawn()
            .expect("start the HTTP producer");
        // Kill mid-stream: once a few more requests were acknowledged, after a random delay.
        wait_for_acks(&acked, acked_lines(&acked) + 3, &server);
        std::thread::sleep(Duration::from_micros(next_random(&mut rng) % 50_000));
        server.kill9();
        let status = producer.wait().expect("wait for the producer");
        assert!(status.success(), "the HTTP producer failed ({status}); see its stderr above");
        server.restart(&[]);
    }
    let mut check = Command::new("python3");
    check.arg(script()).args(["check", "--bootstrap", &server.bootstrap(), "--topic", TOPIC, "--acked"]).arg(&acked);
    let summary: serde_json::Value =
        serde_json::from_str(run(&mut check, Duration::from_secs(300), &server).trim()).expect("a JSON summary");
    eprintln!("http_produce_kill9: {summary}");
    assert_eq!(summary["problems"], 0);
    assert!(
        summary["acknowledged_multi_partition"].as_u64().unwrap() > cycles,
        "too few multi-partition requests were acknowledged to test anything: {summary}"
    );
    let _ = std::fs::remove_file(&acked);
}

fn acked_lines(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path).map(|s| s.lines().count()).unwrap_or(0)
}

fn wait_for_acks(path: &std::path::Path, lines: usize, server: &Server) {
    let started = std::time::Instant::now();
    while acked_lines(path) < lines {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the HTTP producer got no acknowledgement for 60 s; server log:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}
