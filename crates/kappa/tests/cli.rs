//! The command line against a real `kappa serve`: topics, produce, consume and groups, bad
//! input (a clear message, the documented exit code, nothing written — checked by reading
//! back), and interoperability with real Kafka clients (kcat / librdkafka).

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Server, run};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `kappa <args>` against `server` with `stdin`, returning its output (any exit code).
fn kappa(server: &Server, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kappa"))
        .args(args)
        .env("KAPPA_SERVER", format!("http://{}", server.http))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kappa");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > TIMEOUT {
            let _ = child.kill();
            panic!("kappa {args:?} did not finish within {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// `kappa <args>` must succeed; returns stdout.
fn ok(server: &Server, args: &[&str], stdin: &str) -> String {
    let out = kappa(server, args, stdin);
    assert!(
        out.status.success(),
        "kappa {args:?} failed with {}\nstdout: {}\nstderr: {}\nserver log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `kappa <args>` must fail with `code` and a message containing `message`.
fn fails(server: &Server, args: &[&str], stdin: &str, code: i32, message: &str) {
    let out = kappa(server, args, stdin);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "kappa {args:?}: stderr {stderr}");
    assert!(stderr.contains(message), "kappa {args:?}: stderr {stderr:?} lacks {message:?}");
}

fn consume_json(server: &Server, topic: &str, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["consume", topic, "--format", "json"];
    args.extend_from_slice(extra);
    ok(server, &args, "").lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn describe(server: &Server, topic: &str) -> Value {
    serde_json::from_str(&ok(server, &["topic", "describe", topic, "--json"], "")).unwrap()
}

fn end_offsets(server: &Server, topic: &str) -> Vec<i64> {
    describe(server, topic)["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["end_offset"].as_i64().unwrap())
        .collect()
}

#[test]
fn topic_commands_create_list_describe_alter_delete_and_refuse_bad_input() {
    let server = Server::start();
    ok(
        &server,
        &[
            "topic",
            "create",
            "channels",
            "--partitions",
            "2",
            "--config",
            "cleanup.policy=compact",
            "--config",
            "kappa.compaction.subkey.header=contentId",
        ],
        "",
    );
    assert!(ok(&server, &["topic", "list"], "").contains("channels\t2 partition(s)"));
    let topic = describe(&server, "channels");
    assert_eq!(topic["configs"]["cleanup.policy"], "compact");
    assert_eq!(topic["configs"]["kappa.compaction.subkey.header"], "contentId");
    assert!(topic["partitions"][0]["compaction"]["dirty_ratio"].is_number(), "{topic}");
    let table = ok(&server, &["topic", "describe", "channels"], "");
    assert!(
        table.contains("kappa.compaction.subkey.header=contentId") && table.contains("cleaned_up_to=never"),
        "{table}"
    );

    ok(&server, &["topic", "alter", "channels", "--set", "retention.ms=3600000", "--partitions", "3"], "");
    let topic = describe(&server, "channels");
    assert_eq!(topic["configs"]["retention.ms"], "3600000");
    assert_eq!(topic["partitions"].as_array().unwrap().len(), 3);
    ok(&server, &["topic", "alter", "channels", "--delete", "retention.ms"], "");
    assert_eq!(describe(&server, "channels")["configs"]["retention.ms"], "604800000");

    // Bad input: a clear message, the documented exit code, nothing changed.
    fails(&server, &["topic", "create", "bad", "--config", "cleanup.policy=sometimes"], "", 2, "cleanup.policy");
    fails(&server, &["topic", "describe", "bad"], "", 4, "does not exist");
    fails(&server, &["topic", "create", "bad", "--config", "no.such.config=1"], "", 2, "no.such.config");
    fails(&server, &["topic", "create", "bad", "--config", "novalue"], "", 2, "key=value");
    fails(&server, &["topic", "create", "channels"], "", 3, "exists");
    fails(
        &server,
        &["topic", "alter", "channels", "--set", "retention.ms=soon", "--set", "segment.bytes=4096"],
        "",
        2,
        "retention.ms",
    );
    assert_eq!(
        describe(&server, "channels")["configs"]["segment.bytes"],
        "1073741824",
        "a refused alter changes nothing"
    );
    fails(&server, &["topic", "alter", "channels", "--partitions", "2"], "", 2, "partitions");
    fails(&server, &["topic", "alter", "nope", "--set", "retention.ms=1"], "", 4, "does not exist");
    fails(&server, &["topic", "alter", "__consumer_offsets", "--set", "retention.ms=1"], "", 2, "internal");
    // DeleteRecords: 5 records in partition 0, the first 3 deleted; bad input changes nothing.
    ok(&server, &["produce", "channels", "--partition", "0", "--key-separator", ":"], "k:a\nk:b\nk:c\nk:d\nk:e\n");
    fails(&server, &["topic", "delete-records", "channels", "--before", "0=3"], "", 2, "--yes");
    fails(&server, &["topic", "delete-records", "channels", "--before", "zero=3", "--yes"], "", 2, "partition=offset");
    fails(&server, &["topic", "delete-records", "channels", "--before", "0=99", "--yes"], "", 2, "high watermark");
    fails(&server, &["topic", "delete-records", "channels", "--before", "7=1", "--yes"], "", 4, "partition");
    // A compacted topic's records go only by compaction (Kafka: POLICY_VIOLATION) until its
    // policy includes delete.
    fails(&server, &["topic", "delete-records", "channels", "--before", "0=3", "--yes"], "", 3, "cleanup.policy");
    assert_eq!(describe(&server, "channels")["partitions"][0]["start_offset"], 0, "refusals change nothing");
    ok(&server, &["topic", "alter", "channels", "--set", "cleanup.policy=compact,delete"], "");
    let said = ok(&server, &["topic", "delete-records", "channels", "--before", "0=3", "--yes"], "");
    assert!(said.contains("channels/0: records start at 3"), "{said}");
    assert_eq!(describe(&server, "channels")["partitions"][0]["start_offset"], 3);
    fails(&server, &["topic", "delete", "channels"], "", 2, "--yes");
    assert_eq!(describe(&server, "channels")["name"], "channels");
    ok(&server, &["topic", "delete", "channels", "--yes"], "");
    fails(&server, &["topic", "describe", "channels"], "", 4, "does not exist");
    fails(&server, &["topic", "delete", "channels", "--yes"], "", 4, "does not exist");

    // Usage errors and an unreachable server.
    fails(&server, &["topic", "create"], "", 2, "Usage");
    let out = Command::new(env!("CARGO_BIN_EXE_kappa"))
        .args(["topic", "list", "--server", "http://127.0.0.1:1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("is `kappa serve` running there?"), "{stderr}");
    assert_eq!(stderr.matches("Connection refused").count(), 1, "the cause, once: {stderr}");
    // A watch reconnects only once it was under way: an address nobody serves is exit 5 at
    // once (it retried for 60 s).
    let out = Command::new(env!("CARGO_BIN_EXE_kappa"))
        .args(["view", "watch", "channel_page", "c1", "--server", "http://127.0.0.1:1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(!stderr.contains("reconnecting"), "it retried: {stderr}");
}

#[test]
fn every_command_has_an_example_in_its_help() {
    let server = Server::start();
    for command in [
        &[][..],
        &["serve"],
        &["view", "list"],
        &["view", "status"],
        &["view", "get"],
        &["view", "watch"],
        &["view", "switch"],
        &["view", "retire"],
        &["view", "dump"],
        &["topic", "create"],
        &["topic", "list"],
        &["topic", "describe"],
        &["topic", "alter"],
        &["topic", "delete-records"],
        &["topic", "delete"],
        &["produce"],
        &["consume"],
        &["group", "list"],
        &["group", "describe"],
        &["group", "reset-offsets"],
    ] {
        let mut args = command.to_vec();
        args.push("--help");
        let help = ok(&server, &args, "");
        assert!(help.contains("Example"), "kappa {command:?} --help has no example:\n{help}");
    }
    // The summary of `topic` names every topic command.
    let help = ok(&server, &["--help"], "");
    let line = help.lines().find(|l| l.trim_start().starts_with("topic ")).expect("a topic line");
    assert!(line.contains("delete-records"), "{line}");
}

#[test]
fn produce_and_consume_round_trip_lines_and_json_records_with_headers() {
    let server = Server::start();
    ok(&server, &["topic", "create", "events", "--partitions", "3"], "");
    let lines = "c1:{\"name\":\"news\"}\n\nc2:plain text: with a colon\n";
    let offsets = ok(
        &server,
        &["produce", "events", "--key-separator", ":", "-H", "kappa.type=ChannelCreated", "--print-offsets"],
        lines,
    );
    assert_eq!(offsets.lines().count(), 2, "blank lines are skipped: {offsets}");
    let json_records = concat!(
        r#"{"key":"c3","value":{"b":1,"a":[true]},"headers":{"h1":"v1","h2":null},"partition":2}"#,
        "\n",
        r#"{"key":"c1","value":null}"#,
        "\n",
        r#"{"value":"keyless","partition":0}"#,
        "\n"
    );
    ok(&server, &["produce", "events", "--format", "json"], json_records);

    let records = consume_json(&server, "events", &[]);
    assert_eq!(records.len(), 5, "{records:?}");
    let find = |key: Option<&str>, value: Option<&str>| {
        records
            .iter()
            .find(|r| r["key"].as_str() == key && r["value"].as_str() == value)
            .unwrap_or_else(|| panic!("no record {key:?}={value:?} in {records:?}"))
    };
    let c1 = find(Some("c1"), Some("{\"name\":\"news\"}"));
    assert_eq!(c1["headers"]["kappa.type"], "ChannelCreated");
    assert_eq!(c1["topic"], "events");
    assert!(c1["timestamp"].as_i64().unwrap() > 1_700_000_000_000 && c1["offset"].is_i64());
    assert_eq!(find(Some("c2"), Some("plain text: with a colon"))["headers"]["kappa.type"], "ChannelCreated");
    // JSON values are stored as their JSON text, verbatim; a null header value stays null.
    let c3 = find(Some("c3"), Some(r#"{"b":1,"a":[true]}"#));
    assert_eq!(
        (c3["partition"].as_i64(), &c3["headers"]["h1"], &c3["headers"]["h2"]),
        (Some(2), &Value::from("v1"), &Value::Null)
    );
    let tombstone = records.iter().find(|r| r["key"] == "c1" && r["value"].is_null()).expect("tombstone");
    assert_eq!(tombstone["partition"], c1["partition"], "same key, same partition");
    assert_eq!(find(None, Some("keyless"))["partition"], 0);

    // Text output, ready to be produced again.
    let text = ok(&server, &["consume", "events", "--partition", "2", "--key-separator", "="], "");
    assert!(text.lines().any(|l| l == r#"c3={"b":1,"a":[true]}"#), "{text}");

    // JSON output is valid JSON input: copy the topic.
    ok(&server, &["topic", "create", "copy", "--partitions", "3"], "");
    let exported = ok(&server, &["consume", "events", "--format", "json"], "");
    ok(&server, &["produce", "copy", "--format", "json"], &exported);
    let strip = |records: Vec<Value>| -> Vec<Value> {
        let mut out: Vec<Value> = records
            .into_iter()
            .map(|mut r| {
                // Offsets differ: a request spanning partitions is a transaction, and its
                // commit markers take offsets too.
                r.as_object_mut().unwrap().retain(|k, _| k != "topic" && k != "timestamp" && k != "offset");
                r
            })
            .collect();
        out.sort_by_key(|r| r.to_string());
        out
    };
    assert_eq!(strip(consume_json(&server, "copy", &[])), strip(records.clone()));

    // Where to start, and how many.
    assert_eq!(consume_json(&server, "events", &["--from", "end"]).len(), 0);
    assert_eq!(consume_json(&server, "events", &["--from", "2100-01-01T00:00:00Z"]).len(), 0);
    assert_eq!(consume_json(&server, "events", &["--from", "2000-01-01T00:00:00Z"]).len(), 5);
    assert_eq!(consume_json(&server, "events", &["--max-records", "2"]).len(), 2);
    let p = c1["partition"].as_i64().unwrap().to_string();
    let from_one = consume_json(&server, "events", &["--partition", &p, "--from", "1"]);
    assert!(
        from_one.iter().all(|r| r["offset"].as_i64().unwrap() >= 1 && r["partition"] == c1["partition"]),
        "{from_one:?}"
    );
    fails(&server, &["consume", "events", "--from", "yesterday"], "", 2, "RFC 3339");
    // Past the end: say where the partition ends (without --follow it printed nothing).
    let end = end_offsets(&server, "events")[c1["partition"].as_u64().unwrap() as usize];
    let past = (end + 5).to_string();
    let said = format!("partition {p} of events ends at offset {end}");
    fails(&server, &["consume", "events", "--partition", &p, "--from", &past], "", 2, &said);
    fails(&server, &["consume", "events", "--partition", &p, "--from", &past, "--follow"], "", 2, &said);
    // A partition the topic lacks is not found (4), as the server says for every request.
    fails(&server, &["consume", "events", "--partition", "7"], "", 4, "no partition 7; it has 3 partitions (0 to 2)");
    fails(&server, &["consume", "nope"], "", 4, "does not exist");
}

#[test]
fn bad_produce_input_gets_a_clear_message_and_writes_nothing() {
    let server = Server::start();
    ok(&server, &["topic", "create", "events", "--partitions", "2"], "");
    // Malformed JSON on the second line: the first is not written either (one request).
    fails(
        &server,
        &["produce", "events", "--format", "json"],
        "{\"key\":\"a\",\"value\":1}\n{\"key\":\"b\",\n",
        2,
        "line 2: not a JSON record",
    );
    fails(&server, &["produce", "events", "--format", "json"], "{\"key\":\"a\",\"valu\":1}\n", 2, "unknown field");
    // No "value" is refused, not taken for a tombstone (on a compacted topic it deletes the key).
    fails(
        &server,
        &["produce", "events", "--format", "json"],
        "{\"key\":\"a\",\"value\":1}\n{\"key\":\"y\"}\n",
        2,
        "line 2: no \"value\"; send \"value\": null for a tombstone",
    );
    fails(
        &server,
        &["produce", "events", "--key-separator", ":"],
        "a:1\nno separator\n",
        2,
        "line 2: no key separator",
    );
    fails(
        &server,
        &["produce", "events", "--format", "json"],
        "{\"key\":\"a\",\"value\":1,\"partition\":9}\n",
        4,
        "no partition 9; it has 2 partitions (0 to 1)",
    );
    fails(&server, &["produce", "events", "--partition", "2"], "x\n", 4, "no partition 2");
    fails(&server, &["produce", "nope"], "x\n", 4, "does not exist");
    assert_eq!(end_offsets(&server, "events"), vec![0, 0], "nothing was written");

    // Optimistic concurrency: -1 means "no record with this key yet".
    ok(&server, &["produce", "events", "--key-separator", ":", "--expected-offset", "-1"], "k:v1\n");
    let first = consume_json(&server, "events", &[]);
    let offset = first[0]["offset"].as_i64().unwrap();
    fails(
        &server,
        &["produce", "events", "--key-separator", ":", "--expected-offset", "-1"],
        "k:v2\n",
        3,
        "offset_mismatch",
    );
    fails(
        &server,
        &["produce", "events", "--key-separator", ":", "--expected-offset", "7"],
        "k:v2\nother:x\n",
        3,
        "nothing was written",
    );
    fails(&server, &["produce", "events", "--expected-offset", "0"], "v2\n", 2, "needs a key");
    assert_eq!(consume_json(&server, "events", &[]).len(), 1, "conflicts write nothing");
    ok(&server, &["produce", "events", "--key-separator", ":", "--expected-offset", &offset.to_string()], "k:v2\n");
    let values: Vec<Value> = consume_json(&server, "events", &[]).iter().map(|r| r["value"].clone()).collect();
    assert_eq!(values, vec![Value::from("v1"), Value::from("v2")]);
}

#[test]
fn records_from_the_cli_reach_kcat_and_records_from_kcat_reach_the_cli() {
    let server = Server::start();
    ok(&server, &["topic", "create", "interop"], "");
    ok(&server, &["produce", "interop", "--key-separator", ":", "-H", "source=cli"], "k1:from the cli\n");
    let mut kcat = Command::new("kcat");
    kcat.args(["-b", &server.bootstrap(), "-t", "interop", "-C", "-e", "-f", "%k|%s|%h\\n"]);
    let seen = run(&mut kcat, TIMEOUT, &server);
    assert_eq!(seen.trim(), "k1|from the cli|source=cli");

    let mut produce = Command::new("sh");
    produce.arg("-c").arg(format!(
        "printf 'k2:from kcat\\n' | kcat -b {} -t interop -P -K: -H source=kcat -H empty=",
        server.bootstrap()
    ));
    run(&mut produce, TIMEOUT, &server);
    let records = consume_json(&server, "interop", &[]);
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!((records[1]["key"].as_str(), records[1]["value"].as_str()), (Some("k2"), Some("from kcat")));
    assert_eq!(records[1]["headers"]["source"], "kcat");
}

#[test]
fn consume_follow_waits_for_records_produced_later() {
    use std::io::{BufRead, Read};
    let server = Server::start();
    ok(&server, &["topic", "create", "live", "--partitions", "2"], "");
    let mut follower = Command::new(env!("CARGO_BIN_EXE_kappa"))
        .args(["consume", "live", "--follow", "--max-records", "3", "--key-separator", ":"])
        .env("KAPPA_SERVER", format!("http://{}", server.http))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The follower's lines as it prints them (it flushes after each answer).
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    let stdout = follower.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + TIMEOUT;
    let mut seen: Vec<String> = Vec::new();
    let mut stderr = follower.stderr.take().unwrap();
    let mut fail = |follower: &mut std::process::Child, what: &str, seen: &[String]| -> ! {
        let _ = follower.kill();
        let _ = follower.wait();
        let mut err = String::new();
        let _ = stderr.read_to_string(&mut err);
        panic!("{what}; printed {seen:?}; stderr:\n{err}\nserver log:\n{}", server.log())
    };
    ok(&server, &["produce", "live", "--key-separator", ":"], "a:1\nb:2\n");
    // Both printed: the follower is running and has read everything there is, so the next
    // record reaches it only by following.
    while seen.len() < 2 {
        match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => seen.push(line),
            Err(_) => fail(&mut follower, "the follower did not print the first two records within 60 s", &seen),
        }
    }
    assert!(follower.try_wait().unwrap().is_none(), "the follower exited after 2 of its 3 records: {seen:?}");
    ok(&server, &["produce", "live", "--key-separator", ":"], "c:3\n");
    let status = loop {
        if let Some(status) = follower.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            fail(&mut follower, "the follower did not exit within 60 s after its third record was produced", &seen);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // The rest of what it printed (the reader thread ends at the pipe's end).
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(10)) {
        seen.push(line);
    }
    if !status.success() {
        fail(&mut follower, &format!("the follower failed with {status}"), &seen);
    }
    seen.sort();
    assert_eq!(seen, vec!["a:1", "b:2", "c:3"]);
}

fn group(server: &Server, name: &str) -> Value {
    serde_json::from_str(&ok(server, &["group", "describe", name, "--json"], "")).unwrap()
}

fn committed(group: &Value) -> Vec<(i64, i64)> {
    let mut out: Vec<(i64, i64)> = group["offsets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| (o["partition"].as_i64().unwrap(), o["committed"].as_i64().unwrap()))
        .collect();
    out.sort();
    out
}

/// kcat as a group member: reads to the end, commits, leaves.
fn kcat_group_read(server: &Server, group: &str, topic: &str) -> Vec<String> {
    let mut kcat = Command::new("kcat");
    kcat.args(["-b", &server.bootstrap(), "-G", group, "-o", "beginning", "-e", "-f", "%s\\n", topic]);
    run(&mut kcat, TIMEOUT, server).lines().map(str::to_owned).collect()
}

#[test]
fn group_reset_offsets_moves_a_real_consumer_groups_offsets() {
    let server = Server::start();
    ok(&server, &["topic", "create", "orders", "--partitions", "2"], "");
    ok(&server, &["produce", "orders", "--key-separator", ":"], "a:1\nb:2\nc:3\nd:4\n");
    let ends = end_offsets(&server, "orders");

    // A real consumer group reads everything and commits.
    assert_eq!(kcat_group_read(&server, "billing", "orders").len(), 4);
    assert!(ok(&server, &["group", "list"], "").contains("billing\tEmpty\t0 member(s)"));
    let described = group(&server, "billing");
    assert_eq!(committed(&described), vec![(0, ends[0]), (1, ends[1])]);
    assert_eq!(described["offsets"][0]["lag"], 0);

    // Dry run: a plan, nothing committed.
    let plan = ok(&server, &["group", "reset-offsets", "billing", "--to-earliest", "--dry-run"], "");
    assert!(plan.contains(&format!("orders\t0\t{}\t0", ends[0])), "{plan}");
    assert_eq!(committed(&group(&server, "billing")), vec![(0, ends[0]), (1, ends[1])]);

    // Reset to the start: the real consumer group reads everything again.
    ok(&server, &["group", "reset-offsets", "billing", "--topic", "orders", "--to-earliest"], "");
    assert_eq!(committed(&group(&server, "billing")), vec![(0, 0), (1, 0)]);
    let mut again = kcat_group_read(&server, "billing", "orders");
    again.sort();
    assert_eq!(again, vec!["1", "2", "3", "4"]);

    // --to-offset is moved into each partition's range; --to-timestamp in the future is the end.
    ok(&server, &["group", "reset-offsets", "billing", "--to-offset", "1"], "");
    assert_eq!(committed(&group(&server, "billing")), vec![(0, 1.min(ends[0])), (1, 1.min(ends[1]))]);
    ok(&server, &["group", "reset-offsets", "billing", "--to-timestamp", "2100-01-01T00:00:00Z"], "");
    assert_eq!(committed(&group(&server, "billing")), vec![(0, ends[0]), (1, ends[1])]);

    // kappa consume --group starts at the committed offsets and commits what it printed.
    ok(&server, &["group", "reset-offsets", "billing", "--to-earliest"], "");
    assert_eq!(consume_json(&server, "orders", &["--group", "billing", "--max-records", "1"]).len(), 1);
    // The records went in as one transaction (the request spanned both partitions), so the
    // position after a partition's last record may also be past its commit marker.
    let moved: Vec<(i64, i64)> = committed(&group(&server, "billing")).into_iter().filter(|(_, o)| *o > 0).collect();
    assert_eq!(moved.len(), 1, "one record printed, one partition's offset committed: {moved:?}");
    assert_eq!(consume_json(&server, "orders", &["--group", "billing"]).len(), 3, "the rest, once");
    assert_eq!(consume_json(&server, "orders", &["--group", "billing"]).len(), 0);

    // While a member is active: refused (exit 3) unless forced.
    let mut member = Command::new("kcat")
        .args(["-b", &server.bootstrap(), "-G", "billing", "orders"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Joined and assigned: an Empty group's first rebalance waits the initial delay (3 s,
    // as Kafka's group.initial.rebalance.delay.ms) with the member listed but unassigned.
    let deadline = Instant::now() + TIMEOUT;
    while group(&server, "billing")["state"] != "Stable" {
        assert!(Instant::now() < deadline, "kcat never joined the group");
        std::thread::sleep(Duration::from_millis(100));
    }
    let described = group(&server, "billing");
    assert_eq!(described["members"][0]["assignment"][0]["topic"], "orders", "{described}");
    fails(&server, &["group", "reset-offsets", "billing", "--to-earliest"], "", 3, "active member");
    fails(&server, &["consume", "orders", "--group", "billing"], "", 3, "active member");
    ok(&server, &["group", "reset-offsets", "billing", "--to-earliest", "--dry-run"], "");
    ok(&server, &["group", "reset-offsets", "billing", "--to-earliest", "--force"], "");
    let _ = member.kill();
    let _ = member.wait();

    fails(&server, &["group", "describe", "nobody"], "", 4, "no group nobody");
    fails(&server, &["group", "reset-offsets", "nobody", "--to-earliest"], "", 2, "--topic");
    fails(&server, &["group", "reset-offsets", "fresh", "--topic", "nope", "--to-earliest"], "", 4, "does not exist");
    fails(&server, &["group", "reset-offsets", "billing"], "", 2, "Usage");
    // Group ids the group protocol refuses are refused here too (the offset store took ids
    // up to 65,535 bytes).
    let long_id = "g".repeat(2_000);
    let args = ["group", "reset-offsets", long_id.as_str(), "--topic", "orders", "--to-earliest"];
    fails(&server, &args, "", 2, "limited to 1024 bytes");
    fails(&server, &["group", "describe", long_id.as_str()], "", 2, "limited to 1024 bytes");
    let consumed = kappa(&server, &["consume", "orders", "--group", long_id.as_str()], "");
    assert_eq!(consumed.status.code(), Some(2), "{}", String::from_utf8_lossy(&consumed.stderr));
    assert!(consumed.stdout.is_empty(), "records printed for a group that cannot commit them");
}

#[test]
fn consume_is_read_committed_by_default_with_a_real_transactional_producer() {
    let server = Server::start();
    ok(&server, &["topic", "create", "tx"], "");
    let script = r#"
import sys
from confluent_kafka import Producer
p = Producer({'bootstrap.servers': sys.argv[1], 'transactional.id': 'cli-test'})
p.init_transactions()
p.begin_transaction(); p.produce('tx', key='a', value='aborted'); p.flush(); p.abort_transaction()
p.begin_transaction(); p.produce('tx', key='b', value='committed'); p.commit_transaction()
"#;
    let mut python = Command::new("python3");
    python.args(["-c", script, &server.bootstrap()]);
    run(&mut python, TIMEOUT, &server);
    let committed = ok(&server, &["consume", "tx"], "");
    assert_eq!(committed, "committed\n", "aborted records and markers are not shown");
    let everything = ok(&server, &["consume", "tx", "--isolation", "read-uncommitted"], "");
    assert_eq!(everything, "aborted\ncommitted\n");
}

#[test]
fn topic_describe_shows_the_cleaners_work_on_a_compacted_topic() {
    let temp = tempfile::tempdir().unwrap();
    let server = Server::start_in(temp.path(), &["--maintenance-interval-ms", "100"]);
    let configs = ["cleanup.policy=compact", "segment.bytes=1024", "min.cleanable.dirty.ratio=0.01"];
    let mut args = vec!["topic", "create", "latest"];
    for config in &configs {
        args.extend(["--config", config]);
    }
    ok(&server, &args, "");
    // 200 updates of 5 keys in 1 KiB segments: most records are superseded.
    let lines: String = (0..200).map(|i| format!("k{}:value number {i}\n", i % 5)).collect();
    for chunk in lines.lines().collect::<Vec<_>>().chunks(10) {
        ok(&server, &["produce", "latest", "--key-separator", ":"], &(chunk.join("\n") + "\n"));
    }
    let deadline = Instant::now() + TIMEOUT;
    let compaction = loop {
        let partition = describe(&server, "latest")["partitions"][0].clone();
        if partition["compaction"]["last_pass"]["records_removed"].as_u64().unwrap_or(0) > 0 {
            break partition["compaction"].clone();
        }
        assert!(Instant::now() < deadline, "the cleaner never ran: {partition}\n{}", server.log());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(compaction["cleaned_up_to"].as_i64().unwrap() > 0, "{compaction}");
    let table = ok(&server, &["topic", "describe", "latest"], "");
    assert!(!table.contains("cleaned_up_to=never"), "{table}");
    // Reading the compacted topic still gives every key's latest value.
    let latest: std::collections::BTreeMap<String, String> = consume_json(&server, "latest", &[])
        .into_iter()
        .map(|r| (r["key"].as_str().unwrap().to_owned(), r["value"].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(latest["k0"], "value number 195");
    assert_eq!(latest["k4"], "value number 199");
}

#[test]
fn consume_into_a_closed_pipe_ends_quietly() {
    let server = Server::start();
    ok(&server, &["topic", "create", "big"], "");
    let lines: String = (0..5000).map(|i| format!("record number {i} with some padding to fill the pipe\n")).collect();
    ok(&server, &["produce", "big"], &lines);
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("set -o pipefail; '{}' consume big | head -1", env!("CARGO_BIN_EXE_kappa")))
        .env("KAPPA_SERVER", format!("http://{}", server.http))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !stderr.contains("error"), "{:?} {stderr}", out.status);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "record number 0 with some padding to fill the pipe\n");
}

/// Requests are sized as they are sent (JSON escaping can make a record six times its line),
/// and a line longer than the limit is refused without being read whole.
#[test]
fn produce_sizes_requests_as_sent_and_refuses_endless_lines() {
    let server = Server::start();
    ok(&server, &["topic", "create", "escaped", "--partitions", "4"], "");
    // 200 lines of 30,000 control characters: ~180 KB each once escaped as JSON (~6 MB of
    // lines, 36 MB of requests), which the old estimate packed into requests over 8 MiB.
    let line = "\u{1}".repeat(30_000);
    let input: String = (0..200).map(|i| format!("k{i}:{line}\n")).collect();
    let offsets = ok(&server, &["produce", "escaped", "--key-separator", ":", "--print-offsets"], &input);
    assert_eq!(offsets.lines().count(), 200, "every record acknowledged");
    let sizes: i64 = describe(&server, "escaped")["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["size_bytes"].as_i64().unwrap_or(0))
        .sum();
    assert!(sizes >= 200 * 30_000, "stored as sent: {sizes} bytes");
    let endless = "x".repeat(8 * 1024 * 1024 + 10);
    fails(&server, &["produce", "escaped"], &endless, 2, "line 1: longer than 8388608 bytes");
}

/// The offline view commands read a stopped server's data directory. A path that is not one
/// (a typo'd `--data-dir`) is refused with exit 2, saying what is wrong and that `serve`
/// creates data directories, and nothing is created there.
#[test]
fn offline_commands_refuse_a_directory_that_is_not_a_data_directory_and_create_nothing() {
    let temp = tempfile::tempdir().unwrap();
    let missing = temp.path().join("typo");
    let empty = temp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let offline = |args: &[&str], dir: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_kappa"))
            .args(args)
            .arg("--data-dir")
            .arg(dir)
            .env_remove("KAPPA_DATA_DIR")
            .output()
            .unwrap()
    };
    let commands: [&[&str]; 3] =
        [&["view", "list"], &["view", "get", "channel_stats", "c1"], &["view", "dump", "channel_stats"]];
    for (dir, said) in [(&missing, "does not exist"), (&empty, "holds no kappa data")] {
        for command in commands {
            let out = offline(command, dir);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "kappa {command:?} --data-dir {}: {stderr}", dir.display());
            assert!(
                stderr.contains(said) && stderr.contains("`kappa serve` creates"),
                "kappa {command:?} --data-dir {}: {stderr}",
                dir.display()
            );
            assert!(out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stdout));
        }
    }
    assert!(!missing.exists(), "a refused command created {}", missing.display());
    let created: Vec<_> = std::fs::read_dir(&empty).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(created.is_empty(), "a refused command created {created:?}");

    // A stopped server's data directory is one.
    let data = temp.path().join("data");
    let mut server = Server::start_in(&data, &[]);
    server.stop();
    let out = offline(&["view", "list"], &data);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Runs `kappa <args>` with stdout a pipe whose reader is gone (as after `| head -1` took
/// its line): every write fails with EPIPE. The command must end quietly with exit 0.
fn into_closed_pipe(server: &Server, args: &[&str], stdin: &str) {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut child = Command::new(env!("CARGO_BIN_EXE_kappa"))
        .args(args)
        .env("KAPPA_SERVER", format!("http://{}", server.http))
        .stdin(Stdio::piped())
        .stdout(writer)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kappa");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(0) && !stderr.contains("panicked") && !stderr.contains("error"),
        "kappa {args:?} into a closed pipe: {} {stderr}",
        out.status
    );
}

/// `| head -1` closing stdout ends a command quietly (exit 0, no panic), and a command that
/// writes something still writes all of it: its output is a report, not a confirmation.
#[test]
fn every_command_into_a_closed_pipe_ends_quietly_and_still_does_its_writes() {
    let server = Server::start();
    let topic = ["topic", "create", "piped", "--partitions", "2", "--config", "cleanup.policy=compact,delete"];
    into_closed_pipe(&server, &topic, "");
    into_closed_pipe(&server, &["topic", "list", "--internal"], "");
    into_closed_pipe(&server, &["topic", "describe", "piped"], "");
    into_closed_pipe(&server, &["topic", "describe", "piped", "--json"], "");
    into_closed_pipe(&server, &["produce", "piped", "--key-separator", ":", "--print-offsets"], "a:1\nb:2\nc:3\n");
    assert_eq!(end_offsets(&server, "piped").iter().sum::<i64>(), 3, "every record was written");
    into_closed_pipe(&server, &["topic", "alter", "piped", "--set", "retention.ms=3600000", "--partitions", "3"], "");
    let described = describe(&server, "piped");
    assert_eq!(described["configs"]["retention.ms"], "3600000");
    assert_eq!(described["partitions"].as_array().unwrap().len(), 3, "both changes were made: {described}");
    let end = described["partitions"][0]["end_offset"].clone();
    into_closed_pipe(&server, &["topic", "delete-records", "piped", "--before", "0=-1", "--yes"], "");
    assert_eq!(describe(&server, "piped")["partitions"][0]["start_offset"], end);
    into_closed_pipe(&server, &["consume", "piped", "--format", "json"], "");
    into_closed_pipe(&server, &["group", "reset-offsets", "audit", "--topic", "piped", "--to-latest"], "");
    assert_eq!(committed(&group(&server, "audit")).len(), 3, "the reset was committed");
    into_closed_pipe(&server, &["group", "list"], "");
    into_closed_pipe(&server, &["group", "describe", "audit"], "");
    into_closed_pipe(&server, &["topic", "delete", "piped", "--yes"], "");
    fails(&server, &["topic", "describe", "piped"], "", 4, "does not exist");
}

/// A command that runs until killed, its stdout lines read as they come.
struct Follower {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Follower {
    fn spawn(binary: &std::path::Path, server: &Server, args: &[&str]) -> Self {
        use std::io::BufRead;
        let mut child = Command::new(binary)
            .args(args)
            .env("KAPPA_SERVER", format!("http://{}", server.http))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self { child, lines, seen: Vec::new() }
    }

    /// Reads lines until one satisfies `want`; panics with everything seen (and the
    /// follower's stderr) if none comes within TIMEOUT or the follower exits first.
    fn wait_for(&mut self, server: &Server, what: &str, want: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if let Ok(json) = serde_json::from_str::<Value>(&line)
                        && want(&json)
                    {
                        return json;
                    }
                }
                Err(_) => {
                    let _ = self.child.kill();
                    let out = std::mem::replace(&mut self.child, Command::new("true").spawn().unwrap());
                    let stderr = String::from_utf8_lossy(&out.wait_with_output().unwrap().stderr).into_owned();
                    panic!(
                        "no {what} within {TIMEOUT:?} (or the command exited first); printed {:?}; stderr:\n{stderr}\nserver log:\n{}",
                        self.seen,
                        server.log()
                    );
                }
            }
        }
    }

    /// Stops it; returns its stderr.
    fn stop(mut self) -> String {
        let _ = self.child.kill();
        String::from_utf8_lossy(&self.child.wait_with_output().unwrap().stderr).into_owned()
    }
}

/// A server restart is not the end of `view watch` or `consume --follow`: both reconnect
/// (with a note on stderr) and go on where they were — the watch resumes after its last
/// token (the change made while it was away comes once, no second snapshot), the consumer
/// reads on from its next offset.
#[test]
fn view_watch_and_consume_follow_go_on_across_a_server_restart() {
    let channels = common::example_binary("channels");
    let temp = tempfile::tempdir().unwrap();
    let mut server = Server::start_binary_in(&channels, &temp.path().join("data"), &[]);
    let produce = |server: &Server, name: &str, kind: &str| {
        let record = format!(
            r#"{{"key":"c1","value":{{"channelId":"c1","name":"{name}","ownerId":"u1"}},"headers":{{"kappa.type":"{kind}"}}}}"#
        );
        let mut command = Command::new(&channels);
        command
            .args(["produce", "channels", "--format", "json"])
            .env("KAPPA_SERVER", format!("http://{}", server.http));
        let mut child = command.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        child.stdin.take().unwrap().write_all(format!("{record}\n").as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "produce: {}", String::from_utf8_lossy(&out.stderr));
    };
    produce(&server, "Before", "ChannelCreated");
    // The view serves once it has caught up; until then a watch is refused (view_not_ready).
    let deadline = Instant::now() + TIMEOUT;
    while !Command::new(&channels)
        .args(["view", "get", "channel_page", "c1"])
        .env("KAPPA_SERVER", format!("http://{}", server.http))
        .output()
        .unwrap()
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "channel_page never served c1\n{}", server.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut watch = Follower::spawn(&channels, &server, &["view", "watch", "channel_page", "c1"]);
    watch.wait_for(&server, "snapshot with the channel", |e| {
        e["type"] == "snapshot" && e["items"][0]["value"]["name"] == "Before"
    });
    let mut consume = Follower::spawn(&channels, &server, &["consume", "channels", "--format", "json", "--follow"]);
    consume.wait_for(&server, "the first record", |r| r["value"].as_str().is_some_and(|v| v.contains("Before")));

    server.stop();
    server.restart(&[]);
    produce(&server, "After", "ChannelUpdated");

    let change = watch.wait_for(&server, "the change made after the restart", |e| e["type"] == "change");
    assert_eq!(change["value"]["name"], "After", "{change}");
    assert_eq!(watch.seen.len(), 2, "the snapshot, then exactly the one change: {:?}", watch.seen);
    consume.wait_for(&server, "the record produced after the restart", |r| {
        r["value"].as_str().is_some_and(|v| v.contains("After"))
    });
    assert_eq!(consume.seen.len(), 2, "each record once: {:?}", consume.seen);
    for (what, stderr) in [("view watch", watch.stop()), ("consume --follow", consume.stop())] {
        assert!(stderr.contains("note:") && stderr.contains("reconnected"), "{what}: {stderr}");
        assert!(!stderr.contains("error:"), "{what}: {stderr}");
    }
}

/// Runs `binary <args>` against `server` with `stdin` (any exit code).
fn run_with(binary: &std::path::Path, server: &Server, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(binary)
        .args(args)
        .env("KAPPA_SERVER", format!("http://{}", server.http))
        .env_remove("KAPPA_DATA_DIR")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn channel_created(id: &str, name: &str) -> String {
    format!(
        r#"{{"key":"{id}","value":{{"channelId":"{id}","name":"{name}","ownerId":"u1"}},"headers":{{"kappa.type":"ChannelCreated"}}}}"#
    )
}

/// JSON text whose keys are already in sorted order (serde_json's maps sort on the way back).
fn keys_sorted(line: &str) -> bool {
    serde_json::from_str::<Value>(line).and_then(|v| serde_json::to_string(&v)).is_ok_and(|text| text == line)
}

/// `produce --print-after` prints what `view get --after` takes, and the read right after
/// the produce sees it, every time (without --after some of these reads miss); what cannot
/// be waited for is refused with exit 2 saying why.
#[test]
fn view_get_after_reads_the_write_just_produced() {
    let channels = common::example_binary("channels");
    let temp = tempfile::tempdir().unwrap();
    let server = Server::start_binary_in(&channels, &temp.path().join("data"), &[]);
    let produce = ["produce", "channels", "--format", "json", "--print-after"];
    for i in 0..30 {
        let out = run_with(&channels, &server, &produce, &format!("{}\n", channel_created(&format!("c{i}"), "News")));
        assert!(out.status.success(), "produce: {}", String::from_utf8_lossy(&out.stderr));
        let after = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        assert!(after.starts_with("channels:") && after.split(':').count() == 3, "{after:?}");
        // The first reads may come while the view first builds: --after waits for that too.
        let key = format!("c{i}");
        let get = ["view", "get", "channel_page", key.as_str(), "--after", after.as_str()];
        let out = run_with(&channels, &server, &get, "");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "read {i}: {}\n{}", String::from_utf8_lossy(&out.stderr), server.log());
        let page: Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(page["channelId"], key.as_str(), "{stdout}");
        assert!(keys_sorted(stdout.trim()), "{stdout}");
    }
    let refused: [(&[&str], &str); 5] = [
        (&["--after", "channels:99:0"], "does not read channels/99"),
        (&["--after", "channels:0:1000000", "--wait-ms", "30000"], "after_offsets takes offsets a produce answered"),
        (&["--after", "channels:0"], "--after: 'channels:0' is not an offset"),
        (&["--after", "channels:0:0", "--wait-ms", "30001"], "--wait-ms 30001: at most 30000"),
        (&["--after", "channels:0:0", "--data-dir", "x"], "cannot be used with"),
    ];
    for (extra, says) in refused {
        let args = [&["view", "get", "channel_page", "c1"][..], extra].concat();
        let out = run_with(&channels, &server, &args, "");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}

/// `view get` and `view watch` print JSON the same way: keys sorted.
#[test]
fn view_get_and_view_watch_print_keys_sorted() {
    let channels = common::example_binary("channels");
    let temp = tempfile::tempdir().unwrap();
    let server = Server::start_binary_in(&channels, &temp.path().join("data"), &[]);
    let out = run_with(
        &channels,
        &server,
        &["produce", "channels", "--format", "json", "--print-after"],
        &format!("{}\n", channel_created("s1", "Sorted")),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let after = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let out = run_with(
        &channels,
        &server,
        &["view", "get", "channel_page", "s1", "--after", &after, "--wait-ms", "30000"],
        "",
    );
    let got = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success() && keys_sorted(got.trim()), "{got}: {}", String::from_utf8_lossy(&out.stderr));
    let mut watch = Follower::spawn(&channels, &server, &["view", "watch", "channel_page", "s1"]);
    let snapshot = watch.wait_for(&server, "the snapshot", |e| e["type"] == "snapshot");
    let line = watch.seen.last().unwrap().clone();
    watch.stop();
    assert!(keys_sorted(&line), "watch printed {line}");
    assert_eq!(snapshot["items"][0]["value"].to_string(), got.trim(), "the same value, printed the same way");
}

/// Offline commands on a data directory where a view never ran refuse to read its state
/// (exit 4, naming the views there) and create nothing — but an as-of read, which replays
/// the inputs, answers; offline user errors exit 2 as over HTTP.
#[test]
fn offline_view_commands_create_nothing_and_exit_as_over_http() {
    let channels = common::example_binary("channels");
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path().join("data");
    // The plain binary has no views: its data directory holds none, but it holds the topic
    // the channels views read, with a record.
    let mut server = Server::start_in(&data, &[]);
    let create = [
        "topic",
        "create",
        "channels",
        "--partitions",
        "4",
        "--config",
        "cleanup.policy=compact",
        "--config",
        "kappa.compaction.subkey.header=contentId",
    ];
    let out = kappa(&server, &create, "");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out =
        kappa(&server, &["produce", "channels", "--format", "json"], &format!("{}\n", channel_created("n1", "Never")));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let produced_by = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    server.stop();
    let offline = |args: &[&str], dir: &std::path::Path| {
        Command::new(&channels).args(args).arg("--data-dir").arg(dir).env_remove("KAPPA_DATA_DIR").output().unwrap()
    };
    let files = |dir: &std::path::Path| -> Vec<String> {
        let mut found = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path.clone());
                }
                found.push(path.display().to_string());
            }
        }
        found.sort();
        found
    };
    let before = files(&data.join("views"));
    for command in [&["view", "get", "channel_page", "c1"][..], &["view", "dump", "channel_stats"][..]] {
        let out = offline(command, &data);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(4), "{command:?}: {stderr}");
        assert!(stderr.contains("has no state") && stderr.contains("views there: none"), "{command:?}: {stderr}");
    }
    let out = offline(&["view", "list"], &data);
    assert!(out.status.success() && out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    // As of a point: the inputs replayed with the view's code, no state read or made.
    let as_of = produced_by.to_string();
    let out = offline(&["view", "get", "channel_page", "n1", "--as-of", &as_of], &data);
    let got = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && got.contains("Never"), "{got}: {}", String::from_utf8_lossy(&out.stderr));
    let out = offline(&["view", "get", "channel_page", "nope", "--as-of", &as_of], &data);
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    let after = files(&data.join("views"));
    assert!(!after.iter().any(|path| path.ends_with("state.redb")), "{after:?}");
    assert_eq!(after, before, "an offline command created files");

    // Where the views ran: bad input exits 2 (as the same read over HTTP), a missing key 4.
    let data = temp.path().join("ran");
    let mut server = Server::start_binary_in(&channels, &data, &[]);
    let produce = ["produce", "channels", "--format", "json", "--print-after"];
    let out = run_with(&channels, &server, &produce, &format!("{}\n", channel_created("o1", "Offline")));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let after = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let get = ["view", "get", "channel_page", "o1", "--after", &after, "--wait-ms", "30000"];
    let out = run_with(&channels, &server, &get, "");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    server.stop();
    let cases: [(&[&str], i32, &str); 4] = [
        (&["view", "get", "channel_page", "o1", "--as-of", "yesterday"], 2, "--as-of"),
        (&["view", "get", "channel_page", "o1", "--as-of", "channels/9=0"], 2, "channels/9"),
        (&["view", "get", "channel_page", "nope"], 4, "no key 'nope'"),
        (&["view", "get", "no_such_view", "o1"], 4, "views there: channel_page, channel_stats, owner_channels"),
    ];
    for (command, code, says) in cases {
        let out = offline(command, &data);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{command:?}: {stderr}");
        assert!(stderr.contains(says), "{command:?}: {stderr}");
    }
    let out = offline(&["view", "get", "channel_page", "o1"], &data);
    let got = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && keys_sorted(got.trim()) && got.contains("Offline"),
        "{got}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
