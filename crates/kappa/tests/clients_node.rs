//! Real Node.js Kafka clients against the real `kappa` binary: KafkaJS 2.2.4 and
//! kafka-node 5.0.0 (pinned in tests/clients/node/package-lock.json; `scripts/test-all`
//! runs `npm ci` there). Each script asserts on its own and prints a JSON summary; a failure
//! shows its stderr (client logs; set `KAFKAJS_LOG_LEVEL=debug` or `DEBUG=kafka-node:*` for
//! the protocol trace) and the server log.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Server, repo_root, run};

fn node_dir() -> PathBuf {
    let dir = repo_root().join("tests/clients/node");
    assert!(
        dir.join("node_modules/kafkajs").is_dir() && dir.join("node_modules/kafka-node").is_dir(),
        "Node clients are not installed: run `npm ci` in {} (scripts/test-all does)",
        dir.display()
    );
    dir
}

/// Runs `node SCRIPT BOOTSTRAP ARGS...` and returns its JSON summary line.
fn node(server: &Server, script: &str, args: &[&str], timeout: Duration) -> String {
    let dir = node_dir();
    let mut command = Command::new("node");
    command.current_dir(&dir).arg(script).arg(server.bootstrap()).args(args).env("KAFKAJS_NO_PARTITIONER_WARNING", "1");
    let out = run(&mut command, timeout, server);
    let summary = out.lines().last().unwrap_or_default().to_owned();
    assert!(summary.starts_with('{') && summary.ends_with('}'), "{script} printed no JSON summary:\n{out}");
    eprintln!("{script}: {summary}");
    summary
}

const TIMEOUT: Duration = Duration::from_secs(150);

#[test]
fn kafkajs_metadata_keyed_headers_compression_idempotence_and_admin() {
    let server = Server::start();
    let summary = node(&server, "kafkajs-basic.js", &[], TIMEOUT);
    assert!(summary.contains(r#""compression":{"gzip":50,"snappy":50}"#), "{summary}");
}

#[test]
fn kafkajs_consumer_group_rebalances_without_loss_or_duplicates() {
    let server = Server::start();
    let summary = node(&server, "kafkajs-group.js", &[], TIMEOUT);
    assert!(summary.contains(r#""produced":300,"consumed":300"#), "{summary}");
}

#[test]
fn kafkajs_committed_offsets_survive_broker_restart() {
    let mut server = Server::start();
    node(&server, "kafkajs-offsets.js", &["commit", "offsets", "resumer"], TIMEOUT);
    server.stop();
    server.restart(&[]);
    let summary = node(&server, "kafkajs-offsets.js", &["resume", "offsets", "resumer"], TIMEOUT);
    assert!(summary.contains(r#""resumedAt":12"#), "{summary}");
}

#[test]
fn kafkajs_transactions_read_committed_and_consume_transform_produce() {
    let server = Server::start();
    let summary = node(&server, "kafkajs-txn.js", &[], TIMEOUT);
    assert!(summary.contains(r#""readCommitted":10,"readUncommitted":15"#), "{summary}");
}

#[test]
fn kafka_node_producers_codecs_consumer_from_offset_and_offset_api() {
    let server = Server::start();
    let summary = node(&server, "kafka-node-basic.js", &[], TIMEOUT);
    assert!(summary.contains(r#""codecs":{"none":20,"gzip":20,"snappy":20}"#), "{summary}");
}

#[test]
fn kafka_node_consumer_group_resumes_from_committed_offset_after_restart() {
    let mut server = Server::start();
    node(&server, "kafka-node-group.js", &["first", "kn-group", "kn-readers"], TIMEOUT);
    server.stop();
    server.restart(&[]);
    let summary = node(&server, "kafka-node-group.js", &["resume", "kn-group", "kn-readers"], TIMEOUT);
    assert!(summary.contains(r#""consumed":10"#), "{summary}");
}

#[test]
fn kafka_node_consumer_group_second_member_joins_without_duplicates() {
    let server = Server::start();
    let summary = node(&server, "kafka-node-group-rebalance.js", &[], TIMEOUT);
    assert!(summary.contains(r#""produced":80"#), "{summary}");
}

/// librdkafka writes RecordBatch v2 (compressed or not); kafka-node reads it down-converted.
#[test]
fn kafka_node_reads_what_kcat_wrote() {
    let server = Server::start();
    for codec in ["none", "gzip", "snappy", "lz4", "zstd"] {
        let topic = format!("from-kcat-{codec}");
        let pairs: Vec<(String, String)> =
            (0..40).map(|i| (format!("channel-{}", i % 7), format!("{codec} content {i} {}", "x".repeat(i)))).collect();
        let mut child = Command::new("kcat")
            .args([
                "-b",
                &server.bootstrap(),
                "-P",
                "-t",
                &topic,
                "-p",
                "0",
                "-K",
                "\t",
                "-X",
                &format!("compression.codec={codec}"),
            ])
            .args(["-X", "linger.ms=50"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kcat");
        let input: String = pairs.iter().map(|(k, v)| format!("{k}\t{v}\n")).collect();
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "kcat -z {codec} failed: {}\nserver log:\n{}",
            String::from_utf8_lossy(&output.stderr),
            server.log()
        );
        let expected =
            format!("[{}]", pairs.iter().map(|(k, v)| format!("[\"{k}\",\"{v}\"]")).collect::<Vec<_>>().join(","));
        let summary = node(&server, "kafka-node-read-kcat.js", &[&topic, &expected], TIMEOUT);
        assert!(summary.contains(r#""consumed":40"#), "{codec}: {summary}");
    }
}
