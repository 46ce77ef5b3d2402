//! The README's tour against the real channels application: events produced with kcat
//! (headers), KafkaJS (headers), kafka-node (type in the payload) and HTTP reach the three
//! views, which answer over HTTP; a transaction aborted by a real client never shows up.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Server, example_binary, repo_root, run};
use serde_json::{Value, json};

#[path = "../../kappa-http/tests/common/http.rs"]
mod http;

fn kcat_produce(server: &Server, key: &str, value: &str, headers: &[&str]) {
    let mut command = Command::new("sh");
    let headers: String = headers.iter().map(|h| format!(" -H '{h}'")).collect();
    command.arg("-c").arg(format!(
        "printf '%s\\n' '{value}' | kcat -b {} -X partitioner=murmur2_random -t channels -P -k {key}{headers}",
        server.bootstrap()
    ));
    run(&mut command, Duration::from_secs(30), server);
}

/// Polls a view key until it equals `want` (views apply events asynchronously).
fn wait_for_key(server: &Server, view: &str, key: &str, want: &Value) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = http::request(server.http, "GET", &format!("/v1/views/{view}/keys/{key}"), None, &[]);
        if status == 200 && &body["value"] == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{view}/{key}: last answer {status} {body}, want {want}\nserver log:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn events_from_kcat_kafkajs_kafka_node_and_http_reach_the_views() {
    let temp = tempfile::tempdir().unwrap();
    let server = Server::start_binary_in(&example_binary("channels"), temp.path(), &[]);
    kcat_produce(
        &server,
        "c1",
        r#"{"channelId":"c1","name":"News","ownerId":"u1"}"#,
        &["kappa.type=ChannelCreated", "kappa.version=1"],
    );
    kcat_produce(
        &server,
        "c1",
        r#"{"channelId":"c1","contentId":"x1","action":"upsert","content":{"title":"Hi","body":"first"}}"#,
        &["kappa.type=ChannelContentMutated", "kappa.version=2", "contentId=x1"],
    );
    kcat_produce(
        &server,
        "c1",
        r#"{"type":"ChannelContentMutated","version":1,"channelId":"c1","contentId":"x2","op":"added","text":"old shape"}"#,
        &[],
    );
    let body = json!({"records": [{"key": "c2", "value": {"channelId": "c2", "name": "Sport", "ownerId": "u1"}, "headers": {"kappa.type": "ChannelCreated"}}]});
    let (status, answer) =
        http::request(server.http, "POST", "/v1/topics/channels/records", Some(body.to_string().as_bytes()), &[]);
    assert_eq!(status, 200, "{answer}");
    let mut node = Command::new("node");
    node.current_dir(repo_root().join("tests/clients/node")).arg("channels-produce.js").arg(server.bootstrap());
    run(&mut node, Duration::from_secs(90), &server);

    wait_for_key(
        &server,
        "channel_page",
        "c1",
        &json!({
            "channelId": "c1", "name": "News", "ownerId": "u1",
            "content": {"x1": {"title": "Hi", "body": "first"}, "x2": {"title": null, "body": "old shape"}}
        }),
    );
    wait_for_key(&server, "channel_stats", "c1", &json!({"contentCount": 2}));
    wait_for_key(&server, "owner_channels", "u1", &json!({"channels": ["c1", "c2"]}));
    wait_for_key(
        &server,
        "channel_page",
        "js1",
        &json!({
            "channelId": "js1", "name": "From KafkaJS", "ownerId": "u-js", "content": {"a": {"title": "T", "body": "B"}}
        }),
    );
    wait_for_key(
        &server,
        "channel_page",
        "kn1",
        &json!({
            "channelId": "kn1", "name": "From kafka-node", "ownerId": "u-kn", "content": {"a": {"title": null, "body": "v1 text"}}
        }),
    );

    // Removing an item (tombstone with contentId) and deleting a channel (tombstone without).
    let body = json!({"records": [
        {"key": "c1", "value": null, "headers": {"kappa.type": "ChannelContentMutated", "contentId": "x1"}},
        {"key": "c2", "value": null, "headers": {"kappa.type": "ChannelDeleted"}},
    ]});
    assert_eq!(
        http::request(server.http, "POST", "/v1/topics/channels/records", Some(body.to_string().as_bytes()), &[]).0,
        200
    );
    wait_for_key(&server, "channel_stats", "c1", &json!({"contentCount": 1}));
    wait_for_key(&server, "owner_channels", "u1", &json!({"channels": ["c1"]}));
    let deadline = Instant::now() + Duration::from_secs(30);
    while http::request(server.http, "GET", "/v1/views/channel_page/keys/c2", None, &[]).0 != 404 {
        assert!(Instant::now() < deadline, "c2 was not deleted");
        std::thread::sleep(Duration::from_millis(50));
    }

    // A transaction aborted by a real client (confluent-kafka) never reaches a view.
    let script = repo_root().join("tests/clients/python/channels_events.py");
    let mut python = Command::new("python3");
    python.arg(script).args(["aborted", "--bootstrap", &server.bootstrap()]);
    run(&mut python, Duration::from_secs(60), &server);
    wait_for_key(
        &server,
        "channel_page",
        "after-abort",
        &json!({
            "channelId": "after-abort", "name": "committed", "ownerId": "u9", "content": {}
        }),
    );
    let (status, _) = http::request(server.http, "GET", "/v1/views/channel_page/keys/aborted", None, &[]);
    assert_eq!(status, 404, "the aborted transaction's channel is not in the view");
    // /metrics: the broker's counters and a consumer group's lag.
    let mut python = Command::new("python3");
    python.arg(repo_root().join("tests/clients/python/channels_events.py")).args([
        "commit-one",
        "--bootstrap",
        &server.bootstrap(),
        "--group",
        "metrics-group",
    ]);
    run(&mut python, Duration::from_secs(60), &server);
    let (status, metrics) = http::request_text(server.http, "GET", "/metrics", None, &[]);
    assert_eq!(status, 200);
    let value = |prefix: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} in\n{metrics}"))
    };
    assert!(value("kappa_kafka_produce_requests_total ") >= 4.0, "{metrics}");
    assert!(value("kappa_kafka_produce_bytes_total ") > 0.0);
    assert!(value("kappa_kafka_produce_inline_fallbacks_total ") >= 0.0, "{metrics}");
    assert!(value("kappa_kafka_fetch_requests_total ") >= 1.0);
    assert!(value("kappa_consumer_group_lag_records{group=\"metrics-group\"") >= 0.0);
    assert!(metrics.contains("kappa_view_lag_records{view=\"channel_page\",version=\"1\"} 0"), "{metrics}");
    let (_, views) = http::request(server.http, "GET", "/v1/views", None, &[]);
    let statuses: Vec<&str> =
        views["views"].as_array().unwrap().iter().map(|v| v["versions"][0]["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, vec!["serving", "serving", "serving"], "{views}");
}

fn cli(server: &Server, args: &[&str]) -> std::process::Output {
    Command::new(example_binary("channels"))
        .arg("view")
        .args(args)
        .env("KAPPA_SERVER", format!("http://{}", server.http))
        .output()
        .expect("run the CLI")
}

#[test]
fn the_view_command_line_talks_to_a_running_server() {
    let temp = tempfile::tempdir().unwrap();
    let server = Server::start_binary_in(&example_binary("channels"), temp.path(), &[]);
    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() - 1;
    std::thread::sleep(Duration::from_millis(20));
    let body = json!({"records": [{"key": "c1", "value": {"channelId": "c1", "name": "News", "ownerId": "u1"}, "headers": {"kappa.type": "ChannelCreated"}}]});
    assert_eq!(
        http::request(server.http, "POST", "/v1/topics/channels/records", Some(body.to_string().as_bytes()), &[]).0,
        200
    );
    wait_for_key(&server, "channel_stats", "c1", &json!({"contentCount": 0}));
    wait_for_key(
        &server,
        "channel_page",
        "c1",
        &json!({"channelId": "c1", "name": "News", "ownerId": "u1", "content": {}}),
    );
    // Each view serves from its own first catch-up, on its own thread.
    wait_for_key(&server, "owner_channels", "u1", &json!({"channels": ["c1"]}));

    let list = cli(&server, &["list"]);
    assert!(list.status.success(), "{list:?}");
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(text.contains("channel_page\tv1\tserving") && text.contains("owner_channels\tv1\tserving"), "{text}");
    let get = cli(&server, &["get", "channel_stats", "c1"]);
    assert_eq!(String::from_utf8_lossy(&get.stdout).trim(), r#"{"contentCount":0}"#, "{get:?}");
    let as_of = cli(&server, &["get", "channel_page", "c1", "--as-of", &before.to_string()]);
    assert!(!as_of.status.success(), "c1 did not exist before the produce");
    assert!(String::from_utf8_lossy(&as_of.stderr).contains("unknown_key"), "{as_of:?}");
    let status = cli(&server, &["status", "channel_page", "--once"]);
    assert!(String::from_utf8_lossy(&status.stdout).contains("v1\tserving"), "{status:?}");
    // Bad requests: a nonzero exit and a message that says what is wrong.
    let switch = cli(&server, &["switch", "channel_page", "7"]);
    assert!(
        !switch.status.success() && String::from_utf8_lossy(&switch.stderr).contains("has no version 7"),
        "{switch:?}"
    );
    let retire = cli(&server, &["retire", "channel_page", "1"]);
    assert!(!retire.status.success() && String::from_utf8_lossy(&retire.stderr).contains("serves reads"), "{retire:?}");
    let unknown = cli(&server, &["get", "nope", "k"]);
    assert!(
        !unknown.status.success() && String::from_utf8_lossy(&unknown.stderr).contains("no view named 'nope'"),
        "{unknown:?}"
    );
    let unreachable = Command::new(example_binary("channels"))
        .args(["view", "list", "--server", "http://127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(
        !unreachable.status.success() && String::from_utf8_lossy(&unreachable.stderr).contains("cannot reach"),
        "{unreachable:?}"
    );
    // watch: the snapshot first, as a JSON line.
    let mut watch = Command::new(example_binary("channels"))
        .args(["view", "watch", "channel_page", "c1"])
        .env("KAPPA_SERVER", format!("http://{}", server.http))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut reader = std::io::BufReader::new(watch.stdout.take().unwrap());
    std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
    let snapshot: Value = serde_json::from_str(&line).unwrap();
    assert_eq!((snapshot["type"].as_str(), snapshot["items"][0]["key"].as_str()), (Some("snapshot"), Some("c1")));
    // The reader goes away (`| head -1`): at the next change the watch ends quietly, exit 0.
    drop(reader);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut n = 0;
    let status = loop {
        if let Some(status) = watch.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = watch.kill();
            panic!("view watch did not end after its reader left");
        }
        n += 1;
        kcat_produce(
            &server,
            "c1",
            &format!(r#"{{"channelId":"c1","name":"N{n}","ownerId":"u1"}}"#),
            &["kappa.type=ChannelUpdated"],
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(status.success(), "view watch after a closed pipe: {status}");
}

/// One record no view can read (not JSON, from a client that sends anything): the views stop
/// at it; `/ready` says so (503, the stopped versions named; `/health` stays 200 with the
/// same body), and `view status` exits 1 naming them and why, with what to do — it exited 0
/// and `/health` said ok.
#[test]
fn a_record_the_views_cannot_read_shows_in_ready_health_and_view_status() {
    let temp = tempfile::tempdir().unwrap();
    let server = Server::start_binary_in(&example_binary("channels"), temp.path(), &[]);
    kcat_produce(&server, "zz", "hello", &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    // Each view stops on its own thread: wait for the one `view status` is asked about.
    let health = loop {
        let (status, body) = http::request(server.http, "GET", "/ready", None, &[]);
        let stopped = |view: &Value| view["view"] == "channel_page";
        if status == 503 && body["views_failed"].as_array().is_some_and(|views| views.iter().any(stopped)) {
            break body;
        }
        assert!(Instant::now() < deadline, "never unready: {status} {body}\n{}", server.log());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(health["status"], "degraded", "{health}");
    assert_eq!(http::request(server.http, "GET", "/health", None, &[]).0, 200, "liveness stays 200");
    let status = cli(&server, &["status", "channel_page", "--once"]);
    let stderr = String::from_utf8_lossy(&status.stderr);
    assert_eq!(status.status.code(), Some(1), "{status:?}");
    assert!(stderr.contains("view channel_page has stopped versions — v1:"), "{stderr}");
    assert!(stderr.contains("not valid JSON") && stderr.contains("dead-letter"), "{stderr}");
    assert!(String::from_utf8_lossy(&status.stdout).contains("v1\tfailed"), "{status:?}");
}
