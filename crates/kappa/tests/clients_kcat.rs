//! End-to-end compatibility with kcat (Debian's, librdkafka 2.0.2): metadata, keyed produce
//! and consume with headers, every compression codec, the idempotent producer, a balanced
//! consumer group with members joining and leaving, committed offsets across a restart and
//! consuming from a timestamp.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Server, run};

fn kcat(server: &Server) -> Command {
    let mut command = Command::new("kcat");
    command.arg("-b").arg(server.bootstrap());
    command
}

fn produce(server: &Server, topic: &str, extra: &[&str], lines: &str) {
    let mut child = kcat(server)
        .args(["-P", "-t", topic, "-K:"])
        .args(extra)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kcat");
    child.stdin.take().unwrap().write_all(lines.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "kcat produce {extra:?} failed: {}\nserver log:\n{}",
        String::from_utf8_lossy(&output.stderr),
        server.log()
    );
}

fn consume(server: &Server, topic: &str, extra: &[&str], format: &str) -> Vec<String> {
    let out = run(
        kcat(server).args(["-C", "-t", topic, "-e", "-q", "-f", format]).args(extra),
        Duration::from_secs(30),
        server,
    );
    out.lines().map(str::to_owned).collect()
}

/// Creates a topic with the Python admin client (kcat cannot create topics).
fn create_topic(server: &Server, topic: &str, partitions: u32) {
    let code = format!(
        "from confluent_kafka.admin import AdminClient, NewTopic\n\
         a = AdminClient({{'bootstrap.servers': '{}'}})\n\
         a.create_topics([NewTopic('{topic}', {partitions}, 1)])['{topic}'].result(15)",
        server.bootstrap()
    );
    run(Command::new("python3").arg("-c").arg(code), Duration::from_secs(30), server);
}

#[test]
fn metadata_lists_the_broker_and_topic_partitions() {
    let server = Server::start();
    produce(&server, "meta", &[], "a:1\n");
    let out = run(kcat(&server).args(["-L", "-J"]), Duration::from_secs(30), &server);
    assert!(out.contains(&format!("\"name\":\"{}\"", server.bootstrap())), "broker address in {out}");
    assert!(out.contains("\"topic\":\"meta\""), "topic in {out}");
    let out = run(kcat(&server).args(["-L", "-t", "meta"]), Duration::from_secs(30), &server);
    assert!(out.contains("partition 0, leader"), "{out}");
}

#[test]
fn keyed_produce_and_consume_in_order_with_headers() {
    let server = Server::start();
    let mut lines = String::new();
    for seq in 0..50 {
        for key in ["alpha", "beta", "gamma"] {
            lines.push_str(&format!("{key}:{key}-{seq}\n"));
        }
    }
    produce(&server, "keyed", &["-H", "eventType=ChannelUpdated", "-H", "schema=2"], &lines);
    let got = consume(&server, "keyed", &[], "%k|%s|%h\n");
    assert_eq!(got.len(), 150, "{got:?}");
    let mut per_key: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in &got {
        let parts: Vec<&str> = line.split('|').collect();
        assert_eq!(parts[2], "eventType=ChannelUpdated,schema=2", "headers of {line}");
        per_key.entry(parts[0].to_owned()).or_default().push(parts[1].to_owned());
    }
    for (key, values) in per_key {
        let want: Vec<String> = (0..50).map(|s| format!("{key}-{s}")).collect();
        assert_eq!(values, want, "order of {key}");
    }
}

#[test]
fn every_compression_codec_round_trips() {
    let server = Server::start();
    let lines: String = (0..300).map(|i| format!("k{}:value-{i}-{}\n", i % 7, "x".repeat(i % 40))).collect();
    let want: Vec<String> = lines.lines().map(str::to_owned).collect();
    for codec in ["none", "gzip", "snappy", "lz4", "zstd"] {
        let topic = format!("codec-{codec}");
        produce(&server, &topic, &["-z", codec, "-X", "linger.ms=50"], &lines);
        assert_eq!(consume(&server, &topic, &[], "%k:%s\n"), want, "{codec}");
    }
    // librdkafka silently falls back to no compression when a feature gate (e.g. zstd needs
    // Produce v7 and Fetch v10) is not met; the stored batches show what it really sent.
    let stored = |topic: &str| -> u64 {
        let dir = server.data_dir.join("topics").join(topic).join("0");
        std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap())
            .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
            .map(|e| e.metadata().unwrap().len())
            .sum()
    };
    let plain = stored("codec-none");
    for codec in ["gzip", "snappy", "lz4", "zstd"] {
        let size = stored(&format!("codec-{codec}"));
        assert!(size * 2 < plain, "{codec}: {size} bytes stored vs {plain} uncompressed; was it compressed?");
    }
}

#[test]
fn idempotent_producer() {
    let server = Server::start();
    let lines: String = (0..2000).map(|i| format!("k{}:{i}\n", i % 10)).collect();
    produce(&server, "idem", &["-X", "enable.idempotence=true", "-X", "acks=all"], &lines);
    let got = consume(&server, "idem", &[], "%k:%s\n");
    assert_eq!(got, lines.lines().collect::<Vec<_>>());
}

#[test]
fn consume_from_a_timestamp() {
    let server = Server::start();
    produce(&server, "times", &[], "a:before-1\na:before-2\n");
    std::thread::sleep(Duration::from_millis(1100));
    let cut = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis();
    std::thread::sleep(Duration::from_millis(50));
    produce(&server, "times", &[], "a:after-1\na:after-2\n");
    let got = consume(&server, "times", &["-o", &format!("s@{cut}")], "%s\n");
    assert_eq!(got, ["after-1", "after-2"]);
    let got = consume(&server, "times", &["-o", &format!("s@{}", cut + 3_600_000)], "%s\n");
    assert!(got.is_empty(), "nothing after a future timestamp: {got:?}");
    // kcat -Q: ListOffsets by timestamp.
    let out = run(kcat(&server).args(["-Q", "-t", &format!("times:0:{cut}")]), Duration::from_secs(30), &server);
    assert!(out.contains("times [0] offset 2"), "first offset at or after the cut is 2: {out}");
}

/// A `kcat -G` balanced consumer writing `partition offset value` lines to a file.
struct Member {
    child: Child,
    out: std::path::PathBuf,
}

impl Member {
    fn start(server: &Server, group: &str, topic: &str, dir: &std::path::Path, name: &str) -> Self {
        let out = dir.join(name);
        let child = kcat(server)
            .args(["-G", group, topic, "-q", "-f", "%p %o %s\n"])
            .args(["-X", "auto.offset.reset=earliest", "-X", "auto.commit.interval.ms=100"])
            .args(["-X", "session.timeout.ms=10000", "-X", "heartbeat.interval.ms=300", "-u"])
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(dir.join(format!("{name}.err"))).unwrap())
            .spawn()
            .expect("kcat -G");
        Self { child, out }
    }

    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.out).unwrap_or_default().lines().map(str::to_owned).collect()
    }

    /// SIGTERM: kcat closes its consumer, committing and leaving the group.
    fn stop(mut self) -> Vec<String> {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let started = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            assert!(started.elapsed() < Duration::from_secs(20), "kcat -G did not exit on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
        self.lines()
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits (60 s at most) until `group` is Stable with `members` members that between them
/// own all `partitions` partitions of `topic`, and, with `committed`, until the offsets the
/// group committed on `topic` add up to it (every record consumed so far committed).
fn wait_group(server: &Server, group: &str, topic: &str, partitions: u32, members: usize, committed: Option<usize>) {
    let code = format!(
        "import sys, time\n\
         from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition\n\
         from confluent_kafka.admin import AdminClient\n\
         g, t = '{group}', '{topic}'\n\
         a = AdminClient({{'bootstrap.servers': '{}'}})\n\
         deadline = time.time() + 60\n\
         while True:\n\
         \x20   d = a.describe_consumer_groups([g])[g].result(15)\n\
         \x20   owned = sum(len(m.assignment.topic_partitions) for m in d.members)\n\
         \x20   tps = [TopicPartition(t, p) for p in range({partitions})]\n\
         \x20   offs = a.list_consumer_group_offsets([ConsumerGroupTopicPartitions(g, tps)])[g].result(15)\n\
         \x20   done = sum(tp.offset for tp in offs.topic_partitions if tp.offset >= 0)\n\
         \x20   seen = f'state {{d.state}}, {{len(d.members)}} members owning {{owned}} partitions, {{done}} committed'\n\
         \x20   if str(d.state).endswith('STABLE') and len(d.members) == {members} and owned == {partitions} \\\n\
         \x20           and {want} in (None, done):\n\
         \x20       break\n\
         \x20   if time.time() > deadline:\n\
         \x20       sys.exit(f'after 60 s group {{g}}: {{seen}}; want Stable, {members} members, {partitions} partitions, {want} committed')\n\
         \x20   time.sleep(0.1)\n\
         print(seen)\n",
        server.bootstrap(),
        want = committed.map_or("None".to_owned(), |n| n.to_string()),
    );
    run(Command::new("python3").arg("-c").arg(code), Duration::from_secs(90), server);
}

fn wait_for(what: &str, server: &Server, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "timed out waiting for {what}; server log:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn balanced_consumer_group_rebalances_on_join_and_leave_without_loss_or_duplicates() {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    // kcat cannot create topics and auto-created ones have one partition.
    let topic = "grp";
    let group = "kgroup";
    create_topic(&server, topic, 6);
    let batch = |from: usize| -> String { (from..from + 100).map(|i| format!("k{}:{i}\n", i % 13)).collect() };
    produce(&server, topic, &[], &batch(0));
    let a = Member::start(&server, group, topic, dir.path(), "a");
    wait_for("a to consume the first batch", &server, || a.lines().len() >= 100);
    // Each step waits for the rebalance it caused to finish (the group Stable, every
    // partition owned), so every batch is produced to the membership the test means.
    let b = Member::start(&server, group, topic, dir.path(), "b");
    wait_group(&server, group, topic, 6, 2, None);
    produce(&server, topic, &[], &batch(100));
    let c = Member::start(&server, group, topic, dir.path(), "c");
    wait_group(&server, group, topic, 6, 3, None);
    produce(&server, topic, &[], &batch(200));
    wait_for("300 consumed", &server, || a.lines().len() + b.lines().len() + c.lines().len() >= 300);
    let a_lines = a.stop();
    wait_group(&server, group, topic, 6, 2, Some(300));
    produce(&server, topic, &[], &batch(300));
    wait_for("400 consumed", &server, || a_lines.len() + b.lines().len() + c.lines().len() >= 400);
    // Everything consumed is committed before b and c leave.
    wait_group(&server, group, topic, 6, 2, Some(400));
    let b_lines = b.stop();
    let c_lines = c.stop();
    let mut values: Vec<usize> = Vec::new();
    for line in a_lines.iter().chain(&b_lines).chain(&c_lines) {
        values.push(line.rsplit(' ').next().unwrap().parse().unwrap());
    }
    values.sort();
    let distinct: BTreeSet<usize> = values.iter().copied().collect();
    assert_eq!(values.len(), distinct.len(), "records consumed twice");
    assert_eq!(distinct, (0..400).collect::<BTreeSet<_>>(), "records lost");
    let after_a_left = b_lines.len() + c_lines.len();
    assert!(
        after_a_left >= 100 && !b_lines.is_empty() && !c_lines.is_empty(),
        "b and c shared the work: a {}, b {}, c {}",
        a_lines.len(),
        b_lines.len(),
        c_lines.len()
    );
}

#[test]
fn committed_group_offsets_survive_a_restart() {
    let mut server = Server::start();
    produce(&server, "resume", &[], "a:1\nb:2\nc:3\n");
    let group_consume = |server: &Server| -> Vec<String> {
        let out = run(
            kcat(server).args([
                "-G",
                "resume-group",
                "resume",
                "-e",
                "-q",
                "-f",
                "%s\n",
                "-X",
                "auto.offset.reset=earliest",
            ]),
            Duration::from_secs(60),
            server,
        );
        out.lines().map(str::to_owned).collect()
    };
    assert_eq!(group_consume(&server), ["1", "2", "3"]);
    server.stop();
    server.restart(&[]);
    produce(&server, "resume", &[], "d:4\n");
    assert_eq!(group_consume(&server), ["4"], "the group resumes at its committed offset");
}

#[test]
fn read_committed_and_read_uncommitted_see_transactions_correctly() {
    let server = Server::start();
    // kcat cannot produce transactionally; confluent-kafka writes one committed, one aborted
    // and one still-open transaction.
    let code = format!(
        "from confluent_kafka import Producer\n\
         p = Producer({{'bootstrap.servers': '{}', 'transactional.id': 'kcat-txn'}})\n\
         p.init_transactions(60)\n\
         for name, commit in [('committed', True), ('aborted', False), ('open', None)]:\n\
         \x20   p.begin_transaction()\n\
         \x20   for i in range(3): p.produce('txn', key=b'k', value=f'{{name}}-{{i}}'.encode())\n\
         \x20   assert p.flush(60) == 0, 'not delivered within 60 s'\n\
         \x20   if commit is True: p.commit_transaction(60)\n\
         \x20   elif commit is False: p.abort_transaction(60)\n\
         print('done', flush=True)\n\
         import time; time.sleep(120)\n",
        server.bootstrap()
    );
    let mut txn = Command::new("python3").arg("-c").arg(code).stdout(Stdio::piped()).spawn().expect("python3");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(txn.stdout.as_mut().unwrap()), &mut line).unwrap();
    assert_eq!(line.trim(), "done", "transactional producer failed; server log:\n{}", server.log());
    let committed = consume(&server, "txn", &["-X", "isolation.level=read_committed"], "%s\n");
    let uncommitted = consume(&server, "txn", &["-X", "isolation.level=read_uncommitted"], "%s\n");
    let _ = txn.kill();
    let _ = txn.wait();
    assert_eq!(committed, ["committed-0", "committed-1", "committed-2"]);
    let want: Vec<String> =
        ["committed", "aborted", "open"].iter().flat_map(|n| (0..3).map(move |i| format!("{n}-{i}"))).collect();
    assert_eq!(uncommitted, want);
}

#[test]
fn compacted_topic_shows_latest_per_key_to_kcat() {
    let temp = tempfile::tempdir().unwrap();
    let server = Server::start_in(temp.path(), &["--maintenance-interval-ms", "200"]);
    let code = format!(
        "from confluent_kafka.admin import AdminClient, NewTopic\n\
         a = AdminClient({{'bootstrap.servers': '{}'}})\n\
         cfg = {{'cleanup.policy': 'compact', 'segment.bytes': '1024', 'min.cleanable.dirty.ratio': '0.01'}}\n\
         a.create_topics([NewTopic('compacted', 1, 1, config=cfg)])['compacted'].result(15)",
        server.bootstrap()
    );
    run(Command::new("python3").arg("-c").arg(code), Duration::from_secs(30), &server);
    let mut lines = String::new();
    for round in 0..15 {
        for key in 0..5 {
            lines.push_str(&format!("key-{key}:v{round}-{}\n", "p".repeat(40)));
        }
    }
    for filler in 0..30 {
        lines.push_str(&format!("filler-{filler}:{}\n", "f".repeat(60)));
    }
    // One record per request so segments of 1 KiB roll often.
    produce(&server, "compacted", &["-X", "linger.ms=0", "-X", "batch.num.messages=1"], &lines);
    let want: Vec<String> = (0..5).map(|k| format!("{} key-{k}:v14-{}", 70 + k, "p".repeat(40))).collect();
    let started = Instant::now();
    loop {
        let got = consume(&server, "compacted", &[], "%o %k:%s\n");
        let keyed: Vec<String> = got.iter().filter(|l| l.contains(" key-")).cloned().collect();
        let fillers = got.iter().filter(|l| l.contains(" filler-")).count();
        if keyed == want && fillers == 30 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "not compacted within 30 s: {} key-* records (want the 5 latest at their offsets), {fillers} fillers\nserver log:\n{}",
            keyed.len(),
            server.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}
