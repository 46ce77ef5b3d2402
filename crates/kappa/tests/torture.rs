//! The torture suite (issue 8): crashes, faults and lost responses against the real
//! `kappa` binary with real clients, judged by an anomaly checker. The scenarios live in
//! `tests/torture/` (Python, confluent-kafka); each test here runs one of them on this
//! build's binary and fails when the run reports any anomaly or cannot finish. Its output
//! (printed on failure) ends with the counts per anomaly class and, when it fails, the
//! command that replays it with the same seed. `SOAK=1` selects the long tier.
//!
//! `TORTURE_SEED=<n>` fixes the seed of every scenario (default: a fresh random one,
//! printed). See tests/torture/README.md.

mod common;

use std::process::Command;

fn scenario(name: &str) {
    let script = common::repo_root().join("tests/torture/torture.py");
    let mut command = Command::new(std::env::var("PYTHON").unwrap_or_else(|_| "python3".into()));
    command.arg(&script).arg(name).arg("--kappa").arg(env!("CARGO_BIN_EXE_kappa"));
    if std::env::var("SOAK").as_deref() != Ok("1") {
        // Below nextest's ci-profile limit (10 min), so a hang reports stacks and the replay command.
        command.args(["--timeout", "540"]);
    }
    let status = command.status().unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(status.success(), "torture scenario {name} failed ({status}); its report and replay command are above");
}

/// The checker itself: a hand-made history per anomaly class is counted in that class.
#[test]
fn checker_counts_each_anomaly_class() {
    scenario("selftest");
}

/// D1: kill -9 at random moments under 4 idempotent acks=all producers (PR 50 cycles).
#[test]
fn d1_kill9_during_produce() {
    scenario("d1");
}

/// D3: fsync fails with EIO (libfiu, 10 cycles): nothing acknowledged after the failure, even
/// once the fault is gone; reads keep working; a restart recovers and takes writes again.
#[test]
fn d3_fsync_eio_stops_acknowledgements_until_restart() {
    scenario("d3");
}

/// D4: random short writes (libfiu) over 10,000 produce requests, with EIO bursts that tear
/// batches before a kill -9: no corrupt batch is ever served.
#[test]
fn d4_short_writes_never_serve_a_corrupt_batch() {
    scenario("d4");
}

/// D5: disk full on a tmpfs (libfiu ENOSPC where mounting is impossible), 20 cycles: errors,
/// not acknowledgements; reads work; produce resumes within 5 s of space being freed.
#[test]
fn d5_disk_full_errors_then_resumes_when_space_is_freed() {
    scenario("d5");
}

/// T1: 1,000 transactions (30% aborted, each with an offset commit) and 20 kill -9s.
#[test]
fn t1_transactions_under_kill9() {
    scenario("t1");
}

/// T2: 200 delayed EndTxn requests delivered while the producer's next transaction is open:
/// none is applied to the wrong transaction.
#[test]
fn t2_delayed_end_txn_never_ends_the_next_transaction() {
    scenario("t2");
}

/// T3: a proxy drops 20% of produce responses over 100,000 records: 0 duplicates.
#[test]
fn t3_lost_produce_responses_create_no_duplicates() {
    scenario("t3");
}

/// T4: 500 offset-commit cycles with 20 kill -9s: committed offsets never go backwards.
#[test]
fn t4_committed_offsets_never_go_backwards_under_kill9() {
    scenario("t4");
}

/// F2: 100,000 malformed frames (bad sizes, unknown keys and versions, garbage bodies,
/// truncated frames, a TLS ClientHello) over concurrent connections: the broker stays up
/// under 256 MiB RSS, closes each bad connection within 1 s, and a well-behaved producer
/// beside them keeps its p99 within 2x of its p99 alone.
#[test]
fn f2_malformed_traffic_is_closed_fast_and_spares_a_well_behaved_client() {
    scenario("f2");
}
