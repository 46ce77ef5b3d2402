//! `kappa topic create|list|describe|alter|delete-records|delete` against a running server.

use std::collections::BTreeMap;

use clap::Subcommand;
use serde_json::{Value, json};

use crate::cli::{BadInput, ServerArgs, call, encode, outln, reportln};

#[derive(Debug, Subcommand)]
pub enum TopicCommand {
    /// Create a topic.
    #[command(after_help = "Example:\n  kappa topic create channels --partitions 4 \\\n    \
        --config cleanup.policy=compact --config kappa.compaction.subkey.header=contentId")]
    Create {
        topic: String,
        #[arg(long, default_value_t = 1)]
        partitions: i32,
        /// A topic config as key=value (repeatable): cleanup.policy, retention.ms,
        /// segment.bytes, kappa.compaction.subkey.header, ...
        #[arg(long = "config", value_name = "KEY=VALUE")]
        configs: Vec<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// List topics with their partition counts (internal topics with --internal).
    #[command(after_help = "Example:\n  kappa topic list")]
    List {
        /// Also list kappa's internal topics (__consumer_offsets, view changelogs, ...).
        #[arg(long)]
        internal: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Show a topic's configs and, per partition, start and end offsets, size and (for a
    /// compacted topic) the cleaner's state.
    #[command(after_help = "Example:\n  kappa topic describe channels\n  kappa topic describe channels --json")]
    Describe {
        topic: String,
        /// Print the server's JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Change configs or add partitions (all configs are validated before any changes).
    #[command(
        after_help = "Example:\n  kappa topic alter channels --set retention.ms=604800000 --delete segment.bytes\n  \
        kappa topic alter channels --partitions 8"
    )]
    Alter {
        topic: String,
        /// Set a config, key=value (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Reset a config to its default (repeatable).
        #[arg(long = "delete", value_name = "KEY")]
        delete: Vec<String>,
        /// Grow the topic to this many partitions (never shrinks).
        #[arg(long)]
        partitions: Option<i32>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Delete the records before an offset in partitions of a topic (Kafka's DeleteRecords):
    /// each partition's start offset moves there for good.
    #[command(after_help = "Example:\n  kappa topic delete-records channels --before 0=1200 --before 1=-1 --yes")]
    DeleteRecords {
        topic: String,
        /// partition=offset: delete that partition's records before the offset (-1: all of
        /// them); repeatable.
        #[arg(long = "before", value_name = "PARTITION=OFFSET", required = true)]
        before: Vec<String>,
        /// Confirm: the records are gone for good.
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Delete a topic and all its records.
    #[command(after_help = "Example:\n  kappa topic delete scratch --yes")]
    Delete {
        topic: String,
        /// Confirm: the records are gone for good.
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
}

pub fn run(command: TopicCommand) -> anyhow::Result<()> {
    match command {
        TopicCommand::Create { topic, partitions, configs, server } => {
            let body = json!({"name": topic, "partitions": partitions, "configs": key_values(&configs)?});
            call(&server, "POST", "/v1/topics", Some(&body), &format!("creating topic {topic}"))?;
            outln!("created topic {topic} with {partitions} partition(s)")?;
        }
        TopicCommand::List { internal, server } => {
            let answer = call(&server, "GET", "/v1/topics", None, "listing topics")?;
            for t in answer["topics"].as_array().into_iter().flatten() {
                if internal || t["internal"] != true {
                    outln!("{}\t{} partition(s)", t["name"].as_str().unwrap_or("?"), t["partitions"])?;
                }
            }
        }
        TopicCommand::Describe { topic, json, server } => {
            let path = format!("/v1/topics/{}", encode(&topic));
            let answer = call(&server, "GET", &path, None, &format!("describing topic {topic}"))?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&answer)?)?;
            } else {
                print_description(&answer)?;
            }
        }
        TopicCommand::Alter { topic, set, delete, partitions, server } => {
            alter(&server, &topic, &set, delete, partitions)?
        }
        TopicCommand::DeleteRecords { topic, before, yes, server } => {
            let partitions = before.iter().map(|pair| partition_offset(pair)).collect::<anyhow::Result<Vec<_>>>()?;
            if !yes {
                return Err(BadInput(format!(
                    "deleting records of {topic} removes them for good; add --yes to confirm"
                ))
                .into());
            }
            let body = json!({"partitions": partitions});
            let path = format!("/v1/topics/{}/delete-records", encode(&topic));
            let answer = call(&server, "POST", &path, Some(&body), &format!("deleting records of {topic}"))?;
            for p in answer["partitions"].as_array().into_iter().flatten() {
                outln!("{topic}/{}: records start at {}", p["partition"], p["start_offset"])?;
            }
        }
        TopicCommand::Delete { topic, yes, server } => {
            if !yes {
                return Err(BadInput(format!(
                    "deleting {topic} removes all its records for good; add --yes to confirm"
                ))
                .into());
            }
            let path = format!("/v1/topics/{}", encode(&topic));
            call(&server, "DELETE", &path, None, &format!("deleting topic {topic}"))?;
            outln!("deleted topic {topic}")?;
        }
    }
    Ok(())
}

fn alter(
    server: &ServerArgs,
    topic: &str,
    set: &[String],
    delete: Vec<String>,
    partitions: Option<i32>,
) -> anyhow::Result<()> {
    if set.is_empty() && delete.is_empty() && partitions.is_none() {
        return Err(BadInput("nothing to change: give --set, --delete or --partitions".into()).into());
    }
    let what = format!("altering topic {topic}");
    if !set.is_empty() || !delete.is_empty() {
        let body = json!({"set": key_values(set)?, "delete": delete});
        call(server, "POST", &format!("/v1/topics/{}/configs", encode(topic)), Some(&body), &what)?;
        // The partitions may still change: a closed stdout must not stop that.
        reportln!("{topic}: configs changed")?;
    }
    if let Some(count) = partitions {
        let body = json!({"count": count});
        call(server, "POST", &format!("/v1/topics/{}/partitions", encode(topic)), Some(&body), &what)?;
        outln!("{topic}: now {count} partitions")?;
    }
    Ok(())
}

/// `key=value` arguments as a map; a malformed one is a usage error.
/// `--before partition=offset` as the HTTP API's `{"partition","before"}`.
fn partition_offset(pair: &str) -> anyhow::Result<Value> {
    let parsed =
        pair.split_once('=').and_then(|(p, o)| Some((p.trim().parse::<i32>().ok()?, o.trim().parse::<i64>().ok()?)));
    match parsed {
        Some((partition, before)) => Ok(json!({"partition": partition, "before": before})),
        None => Err(BadInput(format!("'{pair}' is not partition=offset (e.g. 0=1200, or 0=-1 for all)")).into()),
    }
}

fn key_values(pairs: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    pairs
        .iter()
        .map(|pair| match pair.split_once('=') {
            Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
            _ => Err(BadInput(format!("'{pair}' is not key=value (e.g. cleanup.policy=compact)")).into()),
        })
        .collect()
}

fn print_description(topic: &Value) -> anyhow::Result<()> {
    outln!("topic {}", topic["name"].as_str().unwrap_or("?"))?;
    outln!("configs:")?;
    for (key, value) in topic["configs"].as_object().into_iter().flatten() {
        outln!("  {key}={}", value.as_str().unwrap_or_default())?;
    }
    outln!("partition\tstart\tend\tsize_bytes\tsegments\tcompaction")?;
    for p in topic["partitions"].as_array().into_iter().flatten() {
        let compaction = match p.get("compaction") {
            Some(c) => format!(
                "cleaned_up_to={} dirty_ratio={:.2} dirty_bytes={}",
                c["cleaned_up_to"].as_i64().map_or("never".to_owned(), |o| o.to_string()),
                c["dirty_ratio"].as_f64().unwrap_or(0.0),
                c["dirty_bytes"]
            ),
            None => "-".to_owned(),
        };
        outln!(
            "{}\t{}\t{}\t{}\t{}\t{compaction}",
            p["partition"],
            p["start_offset"],
            p["end_offset"],
            p["size_bytes"],
            p["segments"]
        )?;
    }
    Ok(())
}
