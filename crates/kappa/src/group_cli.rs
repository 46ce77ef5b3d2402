//! `kappa group list|describe|reset-offsets` against a running server.

use std::collections::BTreeMap;

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::cli::{ApiFailure, BadInput, ServerArgs, call, encode, outln, reportln, topic_offsets};

#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// List consumer groups with their state and member count.
    #[command(after_help = "Example:\n  kappa group list")]
    List {
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Show a group's members (with their assigned partitions) and committed offsets with lag.
    #[command(after_help = "Example:\n  kappa group describe billing")]
    Describe {
        group: String,
        /// Print the server's JSON instead of tables.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Move a group's committed offsets; refused while the group has active members.
    #[command(after_help = "Examples:\n  \
        kappa group reset-offsets billing --topic channels --to-earliest --dry-run\n  \
        kappa group reset-offsets billing --to-timestamp 2026-11-26T10:00:00Z\n  \
        kappa group reset-offsets billing --topic channels --to-offset 120\n\n\
        Without --topic: every topic the group has committed offsets for.")]
    ResetOffsets(ResetArgs),
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("to").required(true).multiple(false))]
pub struct ResetArgs {
    group: String,
    /// A topic to reset (repeatable).
    #[arg(long = "topic")]
    topics: Vec<String>,
    /// Each partition's first offset.
    #[arg(long, group = "to")]
    to_earliest: bool,
    /// Each partition's end.
    #[arg(long, group = "to")]
    to_latest: bool,
    /// The first record at or after this RFC 3339 time (or the end when there is none).
    #[arg(long, group = "to", value_name = "TIME")]
    to_timestamp: Option<String>,
    /// This offset on every partition, moved into the partition's start..end range.
    #[arg(long, group = "to", value_name = "OFFSET")]
    to_offset: Option<i64>,
    /// Print the plan and commit nothing.
    #[arg(long)]
    dry_run: bool,
    /// Commit even while the group has active members (they will overwrite it with their
    /// own commits unless they are stopped).
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    server: ServerArgs,
}

pub fn run(command: GroupCommand) -> anyhow::Result<()> {
    match command {
        GroupCommand::List { server } => {
            let answer = call(&server, "GET", "/v1/groups", None, "listing groups")?;
            for g in answer["groups"].as_array().into_iter().flatten() {
                outln!(
                    "{}\t{}\t{} member(s)",
                    g["group"].as_str().unwrap_or("?"),
                    g["state"].as_str().unwrap_or("?"),
                    g["members"]
                )?;
            }
            Ok(())
        }
        GroupCommand::Describe { group, json, server } => {
            let answer = describe(&server, &group)?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&answer)?)?;
            } else {
                print_description(&answer)?;
            }
            Ok(())
        }
        GroupCommand::ResetOffsets(args) => reset(args),
    }
}

fn describe(server: &ServerArgs, group: &str) -> anyhow::Result<Value> {
    call(server, "GET", &format!("/v1/groups/{}", encode(group)), None, &format!("describing group {group}"))
}

fn print_description(group: &Value) -> anyhow::Result<()> {
    outln!("group {} ({})", group["group"].as_str().unwrap_or("?"), group["state"].as_str().unwrap_or("?"))?;
    let members = group["members"].as_array().cloned().unwrap_or_default();
    outln!("{} member(s)", members.len())?;
    for m in &members {
        let assigned: Vec<String> = m["assignment"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| format!("{}{}", a["topic"].as_str().unwrap_or("?"), a["partitions"]))
            .collect();
        outln!(
            "  {}\tclient={}\thost={}\t{}",
            m["member_id"].as_str().unwrap_or("?"),
            m["client_id"].as_str().unwrap_or(""),
            m["client_host"].as_str().unwrap_or(""),
            assigned.join(" ")
        )?;
    }
    outln!("topic\tpartition\tcommitted\tend\tlag")?;
    for o in group["offsets"].as_array().into_iter().flatten() {
        outln!(
            "{}\t{}\t{}\t{}\t{}",
            o["topic"].as_str().unwrap_or("?"),
            o["partition"],
            o["committed"],
            o["end_offset"],
            o["lag"]
        )?;
    }
    Ok(())
}

/// One partition's move.
struct Move {
    topic: String,
    partition: i32,
    current: Option<i64>,
    target: i64,
}

fn reset(args: ResetArgs) -> anyhow::Result<()> {
    let group = match describe(&args.server, &args.group) {
        Ok(group) => group,
        Err(e) if e.downcast_ref::<ApiFailure>().is_some_and(|f| f.status == 404) => json!({}),
        Err(e) => return Err(e),
    };
    let members = group["members"].as_array().map_or(0, Vec::len);
    if members > 0 && !args.force && !args.dry_run {
        return Err(ApiFailure {
            status: 409,
            what: format!("resetting group {}", args.group),
            message: format!("the group has {members} active member(s); stop its consumers first, or pass --force (they will overwrite the reset with their own commits)"),
        }
        .into());
    }
    let current: BTreeMap<(String, i32), i64> = group["offsets"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| {
            Some(((o["topic"].as_str()?.to_owned(), o["partition"].as_i64()? as i32), o["committed"].as_i64()?))
        })
        .collect();
    let mut topics = args.topics.clone();
    if topics.is_empty() {
        topics = current.keys().map(|(t, _)| t.clone()).collect();
        topics.dedup();
    }
    if topics.is_empty() {
        return Err(
            BadInput(format!("group {} has no committed offsets; name the topics with --topic", args.group)).into()
        );
    }
    let mut plan = Vec::new();
    for topic in &topics {
        for (partition, target) in targets(&args, topic)? {
            plan.push(Move {
                topic: topic.clone(),
                partition,
                current: current.get(&(topic.clone(), partition)).copied(),
                target,
            });
        }
    }
    // The plan is a report: without --dry-run the reset goes on if stdout closes.
    reportln!("topic\tpartition\tcurrent\tnew")?;
    for m in &plan {
        let current = m.current.map_or("-".to_owned(), |c| c.to_string());
        reportln!("{}\t{}\t{current}\t{}", m.topic, m.partition, m.target)?;
    }
    if args.dry_run {
        eprintln!("dry run: nothing committed");
        return Ok(());
    }
    let offsets: Vec<Value> =
        plan.iter().map(|m| json!({"topic": m.topic, "partition": m.partition, "offset": m.target})).collect();
    let body = json!({"offsets": offsets, "force": args.force});
    let path = format!("/v1/groups/{}/offsets", encode(&args.group));
    call(&args.server, "POST", &path, Some(&body), &format!("resetting group {}", args.group))?;
    eprintln!("group {}: {} offset(s) committed", args.group, plan.len());
    Ok(())
}

/// Each partition's new offset for the chosen --to-*.
fn targets(args: &ResetArgs, topic: &str) -> anyhow::Result<BTreeMap<i32, i64>> {
    let at = |at: &str| topic_offsets(&args.server, topic, at, "read_committed");
    if args.to_earliest {
        return at("earliest");
    }
    if args.to_latest {
        return at("latest");
    }
    if let Some(time) = &args.to_timestamp {
        let ms = kappa_views::asof::parse_rfc3339_ms(time)
            .or_else(|| time.parse().ok())
            .ok_or_else(|| BadInput(format!("--to-timestamp '{time}': use an RFC 3339 time like 2026-11-26T10:00:00Z or milliseconds since the epoch")))?;
        return at(&ms.to_string());
    }
    let offset = args.to_offset.expect("clap requires one --to-* option");
    let (earliest, latest) = (at("earliest")?, at("latest")?);
    Ok(earliest
        .iter()
        .map(|(&p, &start)| {
            let end = latest.get(&p).copied().unwrap_or(start);
            let target = offset.clamp(start, end.max(start));
            if target != offset {
                eprintln!(
                    "{topic}/{p}: offset {offset} is outside the partition's offsets {start} to {end}; using {target}"
                );
            }
            (p, target)
        })
        .collect())
}
