//! `kappa consume <topic>`: records over `GET /v1/topics/{t}/partitions/{p}/records`, one
//! reader thread per partition feeding the main thread, which prints (and, with `--group`,
//! commits) in the order each partition's records arrive.
//!
//! `--group` reads from and commits to the group's committed offsets *without joining the
//! group*, so it refuses while the group has active members (their assignment would
//! overlap ours, and their commits would overwrite ours). Partitions the group has no
//! offset for start at `--from`. An offset is committed only after its records are printed.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::sync::mpsc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde_json::{Value, json};

use crate::cli::{
    ApiFailure, BadInput, NotFound, Progress, RECONNECT_WITHIN, Reconnect, ServerArgs, call, encode, partitions_phrase,
    stdout_error, topic_offsets,
};

/// Partitions one run reads (a thread each); more needs --partition.
pub const PARTITIONS_MAX: usize = 256;
/// Records asked for per request.
const RECORDS_PER_REQUEST: usize = 500;
/// How long one `--follow` request waits on the server for new records.
const FOLLOW_WAIT_MS: u64 = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// The value (or key<SEP>value with --key-separator), one record per line.
    Text,
    /// JSON lines: {"topic","partition","offset","timestamp","key","value","headers"}.
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IsolationLevel {
    ReadCommitted,
    ReadUncommitted,
}

impl IsolationLevel {
    fn name(self) -> &'static str {
        match self {
            Self::ReadCommitted => "read_committed",
            Self::ReadUncommitted => "read_uncommitted",
        }
    }
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    kappa consume channels --from beginning --format json\n  \
    kappa consume channels --from 2026-11-26T10:00:00Z --partition 2 --follow\n  \
    kappa consume channels --group audit --max-records 100\n\n\
    Without --follow, reads up to the end offsets seen at start and exits.\n\
    With --group: starts at the group's committed offsets and commits what it printed; the\n\
    group must have no active members (this command does not join the group).")]
pub struct ConsumeArgs {
    pub topic: String,
    /// Where to start: beginning, end, an offset, or an RFC 3339 time (first record at or
    /// after it). With --group, only for partitions the group has no offset for.
    #[arg(long, default_value = "beginning")]
    pub from: String,
    /// Read only this partition.
    #[arg(long)]
    pub partition: Option<i32>,
    /// Start from and commit to this consumer group's offsets (see above).
    #[arg(long)]
    pub group: Option<String>,
    #[arg(long, value_enum, default_value = "read-committed")]
    pub isolation: IsolationLevel,
    #[arg(long, value_enum, default_value = "text")]
    pub format: OutputFormat,
    /// Text output as key<SEP>value.
    #[arg(long, value_name = "SEP")]
    pub key_separator: Option<String>,
    /// Keep waiting for new records (long-poll) instead of exiting at the end.
    #[arg(long)]
    pub follow: bool,
    /// Stop after this many records.
    #[arg(long, value_name = "N")]
    pub max_records: Option<u64>,
    #[command(flatten)]
    pub server: ServerArgs,
}

/// What a partition reader sends the main thread.
enum Message {
    Records { partition: i32, records: Vec<Value>, next_offset: i64 },
    Done,
    Failed(anyhow::Error),
}

pub fn run(args: ConsumeArgs) -> anyhow::Result<()> {
    let topic_path = format!("/v1/topics/{}", encode(&args.topic));
    let topic = call(&args.server, "GET", &topic_path, None, &format!("reading topic {}", args.topic))?;
    let count = topic["partitions"].as_array().map_or(0, Vec::len) as i32;
    let partitions: Vec<i32> = match args.partition {
        Some(p) if (0..count).contains(&p) => vec![p],
        Some(p) => {
            return Err(NotFound(format!(
                "topic {} has no partition {p}; it has {}",
                args.topic,
                partitions_phrase(count)
            ))
            .into());
        }
        None => (0..count).collect(),
    };
    if partitions.len() > PARTITIONS_MAX {
        return Err(BadInput(format!(
            "{} has {} partitions; read at most {PARTITIONS_MAX} at once: pick one with --partition",
            args.topic,
            partitions.len()
        ))
        .into());
    }
    let committed = match &args.group {
        Some(group) => group_offsets(&args.server, group, &args.topic)?,
        None => BTreeMap::new(),
    };
    let starts = start_offsets(&args, &partitions, &committed)?;
    let ends = if args.follow { None } else { Some(offsets_at(&args, "latest")?) };
    let (tx, rx) = mpsc::channel();
    for &partition in &partitions {
        let start = starts[&partition];
        let end = ends.as_ref().map(|e| e[&partition]);
        let (tx, server, path, isolation) = (
            tx.clone(),
            args.server.clone(),
            format!("{topic_path}/partitions/{partition}/records"),
            args.isolation.name(),
        );
        let max = args.max_records.map_or(RECORDS_PER_REQUEST, |m| (m as usize).clamp(1, RECORDS_PER_REQUEST));
        std::thread::spawn(move || read_partition(tx, &server, &path, partition, start, end, isolation, max));
    }
    drop(tx);
    print_records(&args, rx, partitions.len())
}

/// The group's committed offsets for `topic`; refuses a group with active members.
fn group_offsets(server: &ServerArgs, group: &str, topic: &str) -> anyhow::Result<BTreeMap<i32, i64>> {
    let path = format!("/v1/groups/{}", encode(group));
    let answer = match call(server, "GET", &path, None, &format!("reading group {group}")) {
        Ok(answer) => answer,
        Err(e) if e.downcast_ref::<ApiFailure>().is_some_and(|f| f.status == 404) => return Ok(BTreeMap::new()),
        Err(e) => return Err(e),
    };
    let members = answer["members"].as_array().map_or(0, Vec::len);
    if members > 0 {
        return Err(ApiFailure {
            status: 409,
            what: format!("consuming as group {group}"),
            message: format!(
                "the group has {members} active member(s); kappa consume --group reads and commits the group's offsets without joining it, so stop those consumers first (or consume without --group)"
            ),
        }
        .into());
    }
    Ok(answer["offsets"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|o| o["topic"] == topic)
        .filter_map(|o| Some((o["partition"].as_i64()? as i32, o["committed"].as_i64()?)))
        .collect())
}

fn offsets_at(args: &ConsumeArgs, at: &str) -> anyhow::Result<BTreeMap<i32, i64>> {
    topic_offsets(&args.server, &args.topic, at, args.isolation.name())
}

fn start_offsets(
    args: &ConsumeArgs,
    partitions: &[i32],
    committed: &BTreeMap<i32, i64>,
) -> anyhow::Result<BTreeMap<i32, i64>> {
    let from = match args.from.as_str() {
        "beginning" => offsets_at(args, "earliest")?,
        "end" => offsets_at(args, "latest")?,
        text => match text.parse::<i64>() {
            Ok(offset) if offset >= 0 => {
                let uncovered: Vec<i32> = partitions.iter().copied().filter(|p| !committed.contains_key(p)).collect();
                check_from_offset(args, &uncovered, offset)?;
                partitions.iter().map(|&p| (p, offset)).collect()
            }
            _ => match kappa_views::asof::parse_rfc3339_ms(text) {
                Some(ms) => offsets_at(args, &ms.to_string())?,
                None => {
                    return Err(BadInput(format!(
                        "--from '{text}': use beginning, end, an offset, or an RFC 3339 time like 2026-11-26T10:00:00Z"
                    ))
                    .into());
                }
            },
        },
    };
    Ok(partitions.iter().map(|p| (*p, committed.get(p).or(from.get(p)).copied().unwrap_or(0))).collect())
}

/// `--from <offset>` must lie within each partition it applies to: a read past the end (or
/// before the start) is refused by the server, and without `--follow` would print nothing.
fn check_from_offset(args: &ConsumeArgs, partitions: &[i32], offset: i64) -> anyhow::Result<()> {
    if partitions.is_empty() {
        return Ok(());
    }
    let starts = offsets_at(args, "earliest")?;
    let ends = topic_offsets(&args.server, &args.topic, "latest", "read_uncommitted")?;
    for p in partitions {
        let (start, end) = (starts.get(p).copied().unwrap_or(0), ends.get(p).copied().unwrap_or(0));
        let topic = &args.topic;
        if offset > end {
            return Err(BadInput(format!(
                "--from {offset}: partition {p} of {topic} ends at offset {end} (its next record gets offset {end}); \
                 give an offset up to {end}, or --from end{}",
                if partitions.len() > 1 { " (or pick a partition with --partition)" } else { "" }
            ))
            .into());
        }
        if offset < start {
            return Err(BadInput(format!(
                "--from {offset}: partition {p} of {topic} starts at offset {start} (the records before it were \
                 deleted); give an offset from {start}, or --from beginning"
            ))
            .into());
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn read_partition(
    tx: mpsc::Sender<Message>,
    server: &ServerArgs,
    path: &str,
    partition: i32,
    mut offset: i64,
    end: Option<i64>,
    isolation: &str,
    max_records: usize,
) {
    let mut reconnect = Reconnect::default();
    loop {
        if end.is_some_and(|end| offset >= end) {
            let _ = tx.send(Message::Done);
            return;
        }
        let wait = if end.is_none() { FOLLOW_WAIT_MS } else { 0 };
        let query = format!("{path}?offset={offset}&isolation={isolation}&max_records={max_records}&wait_ms={wait}");
        match call(server, "GET", &query, None, &format!("reading partition {partition}")) {
            Ok(answer) => {
                reconnect.connected(|| format!("reconnected to {}; reading on", server.server));
                let next_offset = answer["next_offset"].as_i64().unwrap_or(offset);
                let records = answer["records"].as_array().cloned().unwrap_or_default();
                let stalled = records.is_empty() && next_offset == offset;
                if !records.is_empty() || next_offset != offset {
                    let message = Message::Records { partition, records, next_offset };
                    if tx.send(message).is_err() {
                        return;
                    }
                }
                offset = next_offset;
                if stalled && end.is_some() {
                    // Below the end but nothing readable yet (an open transaction): wait a little.
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            // The server went away (a restart): read on from the next offset once it is back.
            Err(e) => {
                let retried = reconnect.lost(e, || {
                    format!(
                        "reconnecting for up to {} s, each partition from its next offset",
                        RECONNECT_WITHIN.as_secs()
                    )
                });
                if let Err(e) = retried {
                    let _ = tx.send(Message::Failed(e));
                    return;
                }
            }
        }
    }
}

/// Prints records as they arrive; commits each partition's position after printing it.
fn print_records(args: &ConsumeArgs, rx: mpsc::Receiver<Message>, mut readers: usize) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    // A bar only when records go elsewhere than the terminal the bar is drawn on.
    let progress = Progress::new(None, "{spinner} {pos} records consumed ({per_sec})");
    if std::io::stdout().is_terminal() {
        progress.bar().set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut printed = 0u64;
    while readers > 0 {
        let Ok(message) = rx.recv() else { break };
        let (partition, records, next_offset) = match message {
            Message::Records { partition, records, next_offset } => (partition, records, next_offset),
            Message::Done => {
                readers -= 1;
                continue;
            }
            Message::Failed(e) => return Err(e),
        };
        let mut position = next_offset;
        for record in &records {
            if args.max_records.is_some_and(|max| printed >= max) {
                position = record["offset"].as_i64().unwrap_or(position);
                break;
            }
            if let Err(e) = write_record(&mut out, args, partition, record) {
                return reader_gone(e);
            }
            printed += 1;
        }
        if let Err(e) = out.flush() {
            return reader_gone(e);
        }
        progress.bar().set_position(printed);
        if let Some(group) = &args.group {
            commit(args, group, partition, position)?;
        }
        if args.max_records.is_some_and(|max| printed >= max) {
            break;
        }
    }
    progress.bar().finish_and_clear();
    if !std::io::stderr().is_terminal() || !std::io::stdout().is_terminal() {
        eprintln!("{}: {printed} records consumed", args.topic);
    }
    Ok(())
}

/// A closed pipe (`kappa consume t | head`) ends the run quietly (`OutputClosed`, exit 0),
/// committing nothing more; any other write error is an error.
fn reader_gone(e: std::io::Error) -> anyhow::Result<()> {
    Err(stdout_error(e))
}

fn write_record(out: &mut impl Write, args: &ConsumeArgs, partition: i32, record: &Value) -> std::io::Result<()> {
    match args.format {
        OutputFormat::Json => {
            let mut line = record.clone();
            line["topic"] = json!(args.topic);
            line["partition"] = json!(partition);
            writeln!(out, "{line}")?;
        }
        OutputFormat::Text => {
            let value = record["value"].as_str().unwrap_or_default();
            match &args.key_separator {
                Some(sep) => writeln!(out, "{}{sep}{value}", record["key"].as_str().unwrap_or_default())?,
                None => writeln!(out, "{value}")?,
            }
        }
    }
    Ok(())
}

/// Commits one partition's position (again after a lost connection: committing the same
/// offset twice is harmless).
fn commit(args: &ConsumeArgs, group: &str, partition: i32, offset: i64) -> anyhow::Result<()> {
    let body = json!({"offsets": [{"topic": args.topic, "partition": partition, "offset": offset}]});
    let path = format!("/v1/groups/{}/offsets", encode(group));
    let what = format!("committing {}/{partition} for group {group}", args.topic);
    let mut reconnect = Reconnect::default();
    loop {
        match call(&args.server, "POST", &path, Some(&body), &what) {
            Ok(_) => {
                reconnect.connected(|| format!("reconnected to {}; committed", args.server.server));
                return Ok(());
            }
            Err(e) => {
                reconnect.lost(e, || format!("retrying the commit for up to {} s", RECONNECT_WITHIN.as_secs()))?
            }
        }
    }
}
