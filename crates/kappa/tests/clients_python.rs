//! End-to-end compatibility with the Python Kafka clients: confluent-kafka (bundled
//! librdkafka) and kafka-python. Each test starts the real `kappa` binary and runs one case
//! of `tests/clients/python/<client>_e2e.py`, which asserts itself and exits non-zero with
//! a clear message. `scripts/test-all` installs the pip packages.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Server, repo_root, run};

const CONFLUENT: &str = "confluent_e2e.py";
const KAFKA_PYTHON: &str = "kafka_python_e2e.py";

fn script(server: &Server, script: &str, case: &str, args: &[&str], timeout_s: u64) -> String {
    let path = repo_root().join("tests/clients/python").join(script);
    let mut command = Command::new("python3");
    command.arg(&path).arg(server.bootstrap()).arg(case).args(args);
    run(&mut command, Duration::from_secs(timeout_s), server)
}

/// A server whose maintenance loop (compaction) runs every 200 ms.
fn compacting_server() -> (tempfile::TempDir, Server) {
    let temp = tempfile::tempdir().expect("temp dir");
    let server = Server::start_in(temp.path(), &["--maintenance-interval-ms", "200"]);
    (temp, server)
}

/// Bytes stored for the (single-partition) topic whose name starts with `prefix`.
fn stored_bytes(server: &Server, prefix: &str) -> u64 {
    let topics = server.data_dir.join("topics");
    let topic = std::fs::read_dir(&topics)
        .expect("topics dir")
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
        .unwrap_or_else(|| panic!("no topic {prefix}* under {}", topics.display()));
    std::fs::read_dir(topic.join("0"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

/// Every codec round-trips, and the stored batches really are compressed (librdkafka falls
/// back to no compression when a feature gate such as zstd's Produce v7 / Fetch v10 fails).
fn every_compression_codec(client: &str) {
    let server = Server::start();
    script(&server, client, "compression", &[], 90);
    let plain = stored_bytes(&server, "codec-none-");
    for codec in ["gzip", "snappy", "lz4", "zstd"] {
        let size = stored_bytes(&server, &format!("codec-{codec}-"));
        assert!(size * 2 < plain, "{client} {codec}: {size} bytes stored vs {plain} uncompressed; was it compressed?");
    }
}

fn committed_offsets_survive_restart(client: &str) {
    let mut server = Server::start();
    let out = script(&server, client, "commit_before_restart", &["restart-topic", "restart-group"], 60);
    // {"p0": 10, "p1": N, ...}
    let p1 = out.split("\"p1\": ").nth(1).and_then(|s| s.split([',', '}']).next()).expect("p1 in output").trim();
    server.stop();
    server.restart(&[]);
    script(&server, client, "commit_after_restart", &["restart-topic", "restart-group", "10", p1], 60);
}

macro_rules! cases {
    ($client:expr, $($name:ident => $case:literal, $timeout:expr;)*) => {
        $(
            #[test]
            fn $name() {
                let server = Server::start();
                script(&server, $client, $case, &[], $timeout);
            }
        )*
    };
}

mod confluent_kafka {
    use super::*;

    cases! { CONFLUENT,
        metadata => "metadata", 60;
        keyed_produce_consume_in_order_with_headers => "produce_consume", 60;
        idempotent_producer => "idempotent", 60;
        consumer_group_rebalances_on_join_and_leave_without_loss_or_duplicates => "group", 150;
        // The script gives each librdkafka transaction call 60 s (TXN_TIMEOUT_S).
        transactions_committed_and_aborted_seen_by_isolation_level => "transactions", 180;
        consume_transform_produce_with_send_offsets_to_transaction => "consume_transform_produce", 180;
        offsets_for_times => "offsets_for_times", 60;
        admin_create_delete_describe_alter_configs_and_bad_values => "admin", 60;
        admin_partitions_and_consumer_groups => "admin_groups", 60;
        static_member_restart_keeps_its_partitions => "static_membership", 60;
        delete_records_moves_the_low_watermark => "delete_records", 60;
    }

    #[test]
    fn cooperative_sticky_group_rebalances_without_loss_or_duplicates() {
        let server = Server::start();
        script(&server, CONFLUENT, "group", &["cooperative-sticky"], 150);
    }

    #[test]
    fn committed_offsets_survive_broker_restart() {
        committed_offsets_survive_restart(CONFLUENT);
    }

    #[test]
    fn acknowledged_records_survive_kill_9() {
        let mut server = Server::start();
        script(&server, CONFLUENT, "produce_acked", &["acked", "3000"], 60);
        server.kill9();
        server.restart(&[]);
        script(&server, CONFLUENT, "verify_acked", &["acked", "3000"], 60);
    }

    #[test]
    fn every_compression_codec_is_stored_compressed_and_round_trips() {
        every_compression_codec(CONFLUENT);
    }

    #[test]
    fn compaction_keeps_latest_per_key() {
        let (_temp, server) = compacting_server();
        script(&server, CONFLUENT, "compaction", &[], 90);
    }

    #[test]
    fn subkey_compaction_keeps_latest_per_key_and_content_id() {
        let (_temp, server) = compacting_server();
        script(&server, CONFLUENT, "subkey_compaction", &[], 90);
    }
}

mod kafka_python {
    use super::*;

    cases! { KAFKA_PYTHON,
        metadata => "metadata", 60;
        keyed_produce_consume_in_order_with_headers => "produce_consume", 60;
        idempotent_producer => "idempotent", 60;
        consumer_group_rebalances_on_join_and_leave_without_loss_or_duplicates => "group", 150;
        transactions_committed_and_aborted_seen_by_isolation_level => "transactions", 90;
        consume_transform_produce_with_send_offsets_to_transaction => "consume_transform_produce", 90;
        offsets_for_times => "offsets_for_times", 60;
        admin_create_delete_describe_alter_configs_and_bad_values => "admin", 60;
        admin_partitions_and_consumer_groups => "admin_groups", 60;
        offset_delete_refused_while_subscribed_then_drops_one_partition => "offset_delete", 60;
        delete_records_moves_the_low_watermark => "delete_records", 60;
    }

    #[test]
    fn committed_offsets_survive_broker_restart() {
        committed_offsets_survive_restart(KAFKA_PYTHON);
    }

    #[test]
    fn every_compression_codec_is_stored_compressed_and_round_trips() {
        every_compression_codec(KAFKA_PYTHON);
    }

    #[test]
    fn compaction_keeps_latest_per_key() {
        let (_temp, server) = compacting_server();
        script(&server, KAFKA_PYTHON, "compaction", &[], 90);
    }

    #[test]
    fn compaction_of_compressed_multi_record_batches_keeps_latest_per_key() {
        let (_temp, server) = compacting_server();
        script(&server, KAFKA_PYTHON, "compaction", &["gzip"], 90);
    }

    #[test]
    fn subkey_compaction_keeps_latest_per_key_and_content_id() {
        let (_temp, server) = compacting_server();
        script(&server, KAFKA_PYTHON, "subkey_compaction", &[], 90);
    }
}
