//! CPU seconds (user + system, all threads) of a process, from /proc/<pid>/stat.

use anyhow::{Context, Result};

/// Clock ticks per second of /proc's utime and stime (`getconf CLK_TCK`; 100 on Linux).
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;

pub fn process_seconds(pid: u32) -> Result<f64> {
    stat_seconds(&format!("/proc/{pid}/stat"))
}

pub fn self_seconds() -> Result<f64> {
    stat_seconds("/proc/self/stat")
}

fn stat_seconds(path: &str) -> Result<f64> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = &text[text.rfind(')').context("no ')' in stat")? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).context("short stat line");
    Ok((ticks(11)? + ticks(12)?) as f64 / CLOCK_TICKS_PER_SECOND)
}
