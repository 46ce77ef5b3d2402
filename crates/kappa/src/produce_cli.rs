//! `kappa produce <topic>`: records from stdin or a file, over `POST /v1/topics/{t}/records`.
//!
//! Input is sent as it is read, in requests of up to [`RECORDS_PER_REQUEST`] records (each
//! request is all or nothing). A malformed record stops the run before its request is sent.
//! With `--expected-offset` the whole input is one request, so a conflict writes nothing
//! at all; so is everything from the first JSON record that carries `expected_offset` on.

use std::collections::BTreeMap;
use std::io::{BufRead, Read};
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::cli::{BadInput, Progress, ServerArgs, encode, expect_ok, reportln};
use crate::http_client;

/// Records per produce request.
pub const RECORDS_PER_REQUEST: usize = 1_000;
/// Request body size at which a request is sent early (the server takes up to 8 MiB).
pub const REQUEST_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Records in a run with expected offsets (one request; the server's limit).
pub const GUARDED_RECORDS_MAX: usize = 10_000;
/// The longest input line (one record).
pub const LINE_BYTES_MAX: usize = 8 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InputFormat {
    /// One record per line: `value`, or `key<sep>value` with --key-separator.
    Text,
    /// One JSON object per line: {"key", "value", "headers"?, "partition"?, "expected_offset"?}.
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Acks {
    /// Acknowledged once durable (fsynced); on a one-node server the same as 1.
    All,
    #[value(name = "1")]
    One,
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    printf 'c1:{\"name\":\"news\"}\\n' | kappa produce channels --key-separator :\n  \
    echo '{\"key\":\"c1\",\"value\":{\"name\":\"news\"},\"headers\":{\"kappa.type\":\"ChannelCreated\"}}' | kappa produce channels --format json\n  \
    echo 'c1:{\"name\":\"renamed\"}' | kappa produce channels --key-separator : --expected-offset 41\n\n\
    JSON values: a string is stored as its text, any other JSON as its JSON text, null is a tombstone;\n\
    \"value\" is required (a record without it is refused, not taken for a tombstone).\n\
    The output of `kappa consume --format json` is valid input (topic, offset and timestamp are ignored).\n\
    Blank lines are skipped.")]
pub struct ProduceArgs {
    pub topic: String,
    /// Read records from this file instead of stdin.
    #[arg(long)]
    pub file: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "text")]
    pub format: InputFormat,
    /// Text lines are key<SEP>value, split at the first SEP (without it: value only, no key).
    #[arg(long, value_name = "SEP")]
    pub key_separator: Option<String>,
    /// A header for every text record, name=value (repeatable).
    #[arg(long = "header", short = 'H', value_name = "NAME=VALUE")]
    pub headers: Vec<String>,
    /// Write every record to this partition (default: by key, as Kafka's partitioner does).
    #[arg(long)]
    pub partition: Option<i32>,
    /// Only write if the latest record with this key is at this offset (-1: no record with
    /// this key yet); a mismatch writes nothing and exits with 3.
    #[arg(long, allow_negative_numbers = true)]
    pub expected_offset: Option<i64>,
    /// Acknowledgement: records are acknowledged once durable (kappa is one node, so 1 and
    /// all are the same; acks=0 is not offered: an HTTP produce always answers).
    #[arg(long, value_enum, default_value = "all")]
    pub acks: Acks,
    /// Print each record's partition and offset (tab-separated) on stdout.
    #[arg(long)]
    pub print_offsets: bool,
    /// At the end, print one line for `kappa view get --after` (and the HTTP API's
    /// `after_offsets`): topic:partition:offset of the last record written to each partition,
    /// comma-separated.
    #[arg(long)]
    pub print_after: bool,
    #[command(flatten)]
    pub server: ServerArgs,
}

/// One record as the HTTP API takes it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    #[serde(default)]
    key: Option<String>,
    /// Required in JSON input (`None`: absent, refused); `null` is a tombstone.
    #[serde(default, deserialize_with = "kappa_http::topics::present")]
    value: Option<Box<RawValue>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    headers: BTreeMap<String, Option<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    partition: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expected_offset: Option<i64>,
    /// Accepted and ignored, so `kappa consume --format json` output can be produced again.
    #[serde(default, skip_serializing, rename = "topic")]
    _topic: Option<String>,
    #[serde(default, skip_serializing, rename = "offset")]
    _offset: Option<i64>,
    #[serde(default, skip_serializing, rename = "timestamp")]
    _timestamp: Option<i64>,
}

pub fn run(args: ProduceArgs) -> anyhow::Result<()> {
    let input: Box<dyn BufRead> = match &args.file {
        Some(path) => Box::new(std::io::BufReader::new(
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?,
        )),
        None => Box::new(std::io::stdin().lock()),
    };
    let headers = header_flags(&args.headers)?;
    let mut sender = Sender::new(&args);
    let guarded = args.expected_offset.is_some();
    let mut records = Vec::new();
    let mut body_bytes = 0;
    let mut input = input;
    let mut line = Vec::new();
    let mut number = 0;
    while let Some(text) = next_line(&mut input, &mut line, number + 1)? {
        number += 1;
        if text.trim().is_empty() {
            continue;
        }
        let record = parse_line(&args, &headers, text)
            .map_err(|e| BadInput(format!("line {number}: {e}{}", sender.written_so_far())))?;
        // As sent: JSON escaping and headers can make a record far larger than its line.
        let record_bytes = serde_json::to_vec(&record).map_or(text.len(), |json| json.len()) + 1;
        let guarded = guarded || record.expected_offset.is_some();
        if guarded {
            sender.guarded = true;
        }
        if !sender.guarded && !records.is_empty() && body_bytes + record_bytes > REQUEST_BYTES_MAX {
            sender.send(std::mem::take(&mut records))?;
            body_bytes = 0;
        }
        body_bytes += record_bytes;
        records.push(record);
        if !sender.guarded && records.len() == RECORDS_PER_REQUEST {
            sender.send(std::mem::take(&mut records))?;
            body_bytes = 0;
        }
        if sender.guarded && records.len() > GUARDED_RECORDS_MAX {
            return Err(BadInput(format!(
                "records with an expected offset go in one request of at most {GUARDED_RECORDS_MAX} records{}",
                sender.written_so_far()
            ))
            .into());
        }
    }
    if !records.is_empty() {
        sender.send(records)?;
    }
    sender.finish();
    if args.print_after && !sender.latest.is_empty() {
        let topic = &args.topic;
        let after: Vec<String> = sender.latest.iter().map(|(p, o)| format!("{topic}:{p}:{o}")).collect();
        reportln!("{}", after.join(","))?;
    }
    Ok(())
}

/// The next input line (without its `\n` or `\r\n`), read into `buf`: at most
/// [`LINE_BYTES_MAX`] bytes are held, so an endless line is refused, not swallowed whole.
fn next_line<'b>(input: &mut dyn BufRead, buf: &'b mut Vec<u8>, number: usize) -> anyhow::Result<Option<&'b str>> {
    buf.clear();
    let read = input.take(LINE_BYTES_MAX as u64 + 1).read_until(b'\n', buf).context("reading the input")?;
    if read == 0 {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
    } else if buf.len() > LINE_BYTES_MAX {
        return Err(BadInput(format!("line {number}: longer than {LINE_BYTES_MAX} bytes")).into());
    }
    let text = std::str::from_utf8(buf).map_err(|e| BadInput(format!("line {number}: not UTF-8 ({e})")))?;
    Ok(Some(text))
}

fn header_flags(flags: &[String]) -> anyhow::Result<BTreeMap<String, Option<String>>> {
    flags
        .iter()
        .map(|h| match h.split_once('=') {
            Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), Some(value.to_owned()))),
            _ => Err(BadInput(format!("header '{h}' is not name=value")).into()),
        })
        .collect()
}

fn parse_line(args: &ProduceArgs, headers: &BTreeMap<String, Option<String>>, line: &str) -> Result<Record, String> {
    let mut record = match args.format {
        InputFormat::Json => serde_json::from_str::<Record>(line).map_err(|e| {
            format!("not a JSON record ({e}); expected {{\"key\", \"value\", \"headers\"?, \"partition\"?, \"expected_offset\"?}}")
        })?,
        InputFormat::Text => {
            let (key, value) = match &args.key_separator {
                Some(sep) => match line.split_once(sep.as_str()) {
                    Some((key, value)) => (Some(key.to_owned()), value),
                    None => return Err(format!("no key separator '{sep}' in the line")),
                },
                None => (None, line),
            };
            let value = RawValue::from_string(Value::from(value).to_string()).map_err(|e| e.to_string())?;
            Record {
                key,
                value: Some(value),
                headers: headers.clone(),
                partition: None,
                expected_offset: None,
                _topic: None,
                _offset: None,
                _timestamp: None,
            }
        }
    };
    if record.value.is_none() {
        // Never a tombstone by omission: on a compacted topic it deletes the key.
        return Err(
            "no \"value\"; send \"value\": null for a tombstone (it deletes the key), else the value to write".into()
        );
    }
    if record.partition.is_none() {
        record.partition = args.partition;
    }
    if record.expected_offset.is_none() {
        record.expected_offset = args.expected_offset;
    }
    if record.expected_offset.is_some() && record.key.is_none() {
        return Err("an expected offset needs a key (--key-separator, or \"key\" in JSON)".into());
    }
    Ok(record)
}

#[derive(Serialize)]
struct RequestBody<'a> {
    records: &'a [Record],
    text_values: bool,
}

/// Sends requests and reports progress.
struct Sender<'a> {
    args: &'a ProduceArgs,
    path: String,
    written: u64,
    requests: u64,
    guarded: bool,
    progress: Progress,
    /// Partition → the offset of the last record written to it (for `--print-after`).
    latest: BTreeMap<i64, i64>,
}

impl<'a> Sender<'a> {
    fn new(args: &'a ProduceArgs) -> Self {
        Self {
            args,
            path: format!("/v1/topics/{}/records", encode(&args.topic)),
            written: 0,
            requests: 0,
            guarded: false,
            progress: Progress::new(None, "{spinner} {pos} records produced ({per_sec})"),
            latest: BTreeMap::new(),
        }
    }

    fn written_so_far(&self) -> String {
        match self.written {
            0 => "; nothing was written".to_owned(),
            n => format!("; the {n} records before it were written"),
        }
    }

    fn send(&mut self, records: Vec<Record>) -> anyhow::Result<()> {
        let n = records.len() as u64;
        // Serialized directly: through a serde_json::Value the raw JSON values would be
        // re-parsed and lose their key order.
        let body = serde_json::to_string(&RequestBody { records: &records, text_values: true })?;
        let what = match self.written {
            0 => format!("producing to {}", self.args.topic),
            n => format!("producing to {} (the {n} records sent before this request were written)", self.args.topic),
        };
        let answer =
            expect_ok(http_client::request(&self.args.server.server, "POST", &self.path, Some(&body))?, &what)?;
        for o in answer["offsets"].as_array().into_iter().flatten() {
            if let (Some(partition), Some(offset)) = (o["partition"].as_i64(), o["offset"].as_i64()) {
                let latest = self.latest.entry(partition).or_insert(offset);
                *latest = (*latest).max(offset);
            }
        }
        if self.args.print_offsets {
            for o in answer["offsets"].as_array().into_iter().flatten() {
                // A closed stdout drops the offsets, not the records still to send.
                reportln!("{}\t{}", o["partition"], o["offset"])?;
            }
        }
        self.written += n;
        self.requests += 1;
        self.progress.bar().set_position(self.written);
        if !self.progress.is_terminal() && self.requests.is_multiple_of(10) {
            eprintln!("{}: {} records produced", self.args.topic, self.written);
        }
        Ok(())
    }

    fn finish(&self) {
        self.progress.finish(format!("{}: {} records produced", self.args.topic, self.written));
    }
}
