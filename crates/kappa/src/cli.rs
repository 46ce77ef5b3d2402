//! What every client command shares: the server address, the API's answers as errors with
//! exit codes, path encoding and progress output.
//!
//! Exit codes (documented in README.md, "Command line"): 0 ok, 1 any other error, 2 bad
//! usage or input (clap's usage errors, HTTP 400), 3 conflict (HTTP 409: an expected
//! offset that does not match, a topic that exists, a group with active members), 4 not
//! found (HTTP 404: unknown topic, partition, group or view), 5 the server is unreachable.
//!
//! Output goes through [`outln!`] (or [`reportln!`]): a closed pipe (`kappa topic list |
//! head -1`) ends a command quietly with exit 0, as `kappa consume` always did, instead of
//! the panic `println!` gives. The process keeps ignoring SIGPIPE (Rust's default, which
//! `serve` and `work` rely on for their sockets); the write's EPIPE is what ends the output.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::Value;

use crate::http_client::{self, ClientError, Response};

pub const EXIT_ERROR: i32 = 1;
pub const EXIT_USAGE: i32 = 2;
pub const EXIT_CONFLICT: i32 = 3;
pub const EXIT_NOT_FOUND: i32 = 4;
pub const EXIT_UNREACHABLE: i32 = 5;

#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// A running server's HTTP address
    #[arg(long, env = "KAPPA_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,
}

/// The server refused a request: what we were doing and the API's message.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {message}")]
pub struct ApiFailure {
    pub status: u16,
    pub what: String,
    pub message: String,
}

/// Bad input found before anything was sent (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);

/// Something named on the command line does not exist, found before anything was sent
/// (exit code 4, as the server's 404).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotFound(pub String);

pub use kappa_http::topics::partitions_phrase;

/// Standard output was closed (its reader left, as `| head -1` does): the command ends
/// quietly, exit 0 (see [`exit_code`]).
#[derive(Debug, thiserror::Error)]
#[error("standard output was closed")]
pub struct OutputClosed;

/// A failed write to stdout as an error: a closed pipe is [`OutputClosed`].
pub fn stdout_error(error: std::io::Error) -> anyhow::Error {
    if error.kind() == std::io::ErrorKind::BrokenPipe {
        return OutputClosed.into();
    }
    anyhow::Error::new(error).context("writing to stdout")
}

/// Whether `error` is (or was caused by) stdout closing.
pub fn output_closed(error: &anyhow::Error) -> bool {
    error.downcast_ref::<OutputClosed>().is_some()
}

/// Writes one line of a command's output; [`outln!`] calls it. Each line is flushed as it
/// is written (stdout is line-buffered), so a closed pipe shows at the next line.
pub fn print_line(line: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(line).and_then(|()| out.write_all(b"\n")).map_err(stdout_error)
}

/// A line reporting what a command did while it goes on doing more (a produce's offsets, a
/// reset's plan); [`reportln!`] calls it. A closed pipe drops the line and lets the command
/// finish its work: the records or offsets the user asked to write are written.
pub fn report_line(line: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    match print_line(line) {
        Err(e) if output_closed(&e) => Ok(()),
        other => other,
    }
}

/// `println!` for command output: `outln!(...)?` ends the command quietly (exit 0) once
/// stdout is closed.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::print_line(format_args!($($arg)*))
    };
}
pub(crate) use outln;

/// `println!` for a line about work that goes on (see [`report_line`]).
macro_rules! reportln {
    ($($arg:tt)*) => {
        $crate::cli::report_line(format_args!($($arg)*))
    };
}
pub(crate) use reportln;

/// The exit code for an error from any command (0 for [`OutputClosed`], which `App::main`
/// does not print).
pub fn exit_code(error: &anyhow::Error) -> i32 {
    if output_closed(error) {
        return 0;
    }
    if let Some(failure) = error.downcast_ref::<ApiFailure>() {
        return status_exit_code(failure.status);
    }
    // Offline view commands: the code the server's answer to the same error would give.
    if let Some(view_error) = error.downcast_ref::<kappa_views::ViewError>() {
        return status_exit_code(kappa_http::error::view_error_status(view_error).as_u16());
    }
    if error.downcast_ref::<BadInput>().is_some() {
        return EXIT_USAGE;
    }
    if error.downcast_ref::<NotFound>().is_some() {
        return EXIT_NOT_FOUND;
    }
    match error.downcast_ref::<ClientError>() {
        Some(ClientError::Connect { .. } | ClientError::BadAddress(_)) => EXIT_UNREACHABLE,
        _ => EXIT_ERROR,
    }
}

/// The exit code for an HTTP status the server answered (or would answer) with.
fn status_exit_code(status: u16) -> i32 {
    match status {
        400 | 413 | 416 | 422 => EXIT_USAGE,
        404 => EXIT_NOT_FOUND,
        409 => EXIT_CONFLICT,
        _ => EXIT_ERROR,
    }
}

/// How long a command keeps trying to reach a server that went away mid-command (a
/// restart) before it gives up: `consume` and `view watch` pick up where they were.
pub const RECONNECT_WITHIN: Duration = Duration::from_secs(60);
/// The first wait before trying again; it doubles up to [`RECONNECT_BACKOFF_MAX`].
const RECONNECT_BACKOFF_FIRST: Duration = Duration::from_millis(200);
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Whether a note about a lost connection is on stderr and no "reconnected" note yet: the
/// partitions `consume` reads on threads of their own share one pair of notes.
static LOSS_NOTED: AtomicBool = AtomicBool::new(false);

/// Whether `error` is a lost connection (refused, closed or reset) rather than an answer.
pub fn is_connection_lost(error: &anyhow::Error) -> bool {
    error.downcast_ref::<ClientError>().is_some_and(ClientError::is_connection_lost)
}

/// Retrying after lost connections, with backoff, for at most [`RECONNECT_WITHIN`] from the
/// loss; a connection that works again starts over.
pub struct Reconnect {
    lost_at: Option<Instant>,
    backoff: Duration,
}

impl Default for Reconnect {
    fn default() -> Self {
        Self { lost_at: None, backoff: RECONNECT_BACKOFF_FIRST }
    }
}

impl Reconnect {
    /// After `error`: for a lost connection within [`RECONNECT_WITHIN`], notes it on stderr
    /// (`note()` says what happens next), waits and returns Ok to try again; else the error.
    pub fn lost(&mut self, error: anyhow::Error, note: impl FnOnce() -> String) -> anyhow::Result<()> {
        if !is_connection_lost(&error) {
            return Err(error);
        }
        let lost_at = *self.lost_at.get_or_insert_with(|| {
            if !LOSS_NOTED.swap(true, Ordering::Relaxed) {
                eprintln!("note: {error:#}; {}", note());
            }
            Instant::now()
        });
        if lost_at.elapsed() >= RECONNECT_WITHIN {
            return Err(
                error.context(format!("gave up after trying to reconnect for {} s", RECONNECT_WITHIN.as_secs()))
            );
        }
        std::thread::sleep(self.backoff);
        self.backoff = (self.backoff * 2).min(RECONNECT_BACKOFF_MAX);
        Ok(())
    }

    /// Waits before trying again after an ending that is not a lost connection (a slow
    /// reader cut off), with the same backoff, so a repeat is paced.
    pub fn pause(&mut self) {
        std::thread::sleep(self.backoff);
        self.backoff = (self.backoff * 2).min(RECONNECT_BACKOFF_MAX);
    }

    /// A request worked (again); `note()` says so on stderr after a loss.
    pub fn connected(&mut self, note: impl FnOnce() -> String) {
        if self.lost_at.take().is_some() && LOSS_NOTED.swap(false, Ordering::Relaxed) {
            eprintln!("note: {}", note());
        }
        self.backoff = RECONNECT_BACKOFF_FIRST;
    }
}

/// The JSON of a 2xx answer; anything else becomes an [`ApiFailure`].
pub fn expect_ok(response: Response, what: &str) -> anyhow::Result<Value> {
    if (200..300).contains(&response.status) {
        return Ok(response.json());
    }
    Err(ApiFailure { status: response.status, what: what.to_owned(), message: response.error_message() }.into())
}

/// One request whose answer must be a success.
pub fn call(server: &ServerArgs, method: &str, path: &str, body: Option<&Value>, what: &str) -> anyhow::Result<Value> {
    let body = body.map(Value::to_string);
    expect_ok(http_client::request(&server.server, method, path, body.as_deref())?, what)
}

/// Per-partition offsets of `topic` for `at` (earliest, latest or milliseconds since the
/// epoch) under `isolation` (read_committed or read_uncommitted).
pub fn topic_offsets(
    server: &ServerArgs,
    topic: &str,
    at: &str,
    isolation: &str,
) -> anyhow::Result<std::collections::BTreeMap<i32, i64>> {
    let path = format!("/v1/topics/{}/offsets?at={at}&isolation={isolation}", encode(topic));
    let answer = call(server, "GET", &path, None, &format!("finding offsets of {topic}"))?;
    Ok(answer["offsets"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| Some((o["partition"].as_i64()? as i32, o["offset"].as_i64()?)))
        .collect())
}

/// Percent-encodes one path segment or query value.
pub fn encode(segment: &str) -> String {
    let mut out = String::new();
    for byte in segment.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(byte as char),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

/// Progress of a long operation: a bar on a terminal (stderr), nothing otherwise — callers
/// print plain lines themselves when [`Progress::is_terminal`] is false.
pub struct Progress {
    bar: indicatif::ProgressBar,
    terminal: bool,
}

impl Progress {
    /// `template` is an indicatif template, e.g. "{spinner} {pos} records {msg}".
    pub fn new(length: Option<u64>, template: &str) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let bar = match length {
            Some(n) => indicatif::ProgressBar::new(n),
            None => indicatif::ProgressBar::no_length(),
        };
        match indicatif::ProgressStyle::with_template(template) {
            Ok(style) if terminal => bar.set_style(style.progress_chars("=> ")),
            _ => bar.set_draw_target(indicatif::ProgressDrawTarget::hidden()),
        }
        Self { bar, terminal }
    }

    pub fn is_terminal(&self) -> bool {
        self.terminal
    }

    pub fn bar(&self) -> &indicatif::ProgressBar {
        &self.bar
    }

    pub fn finish(&self, message: String) {
        self.bar.finish_and_clear();
        eprintln!("{message}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(status: u16) -> anyhow::Error {
        ApiFailure { status, what: "doing".into(), message: "no".into() }.into()
    }

    #[test]
    fn errors_map_to_the_documented_exit_codes() {
        assert_eq!(exit_code(&api(400)), EXIT_USAGE);
        assert_eq!(exit_code(&api(404)), EXIT_NOT_FOUND);
        assert_eq!(exit_code(&api(409)), EXIT_CONFLICT);
        assert_eq!(exit_code(&api(503)), EXIT_ERROR);
        assert_eq!(exit_code(&BadInput("x".into()).into()), EXIT_USAGE);
        assert_eq!(exit_code(&NotFound("x".into()).into()), EXIT_NOT_FOUND);
        let unreachable =
            ClientError::Connect { address: "x".into(), error: std::io::ErrorKind::ConnectionRefused.into() };
        assert_eq!(exit_code(&unreachable.into()), EXIT_UNREACHABLE);
        // Context added on the way up keeps the code.
        assert_eq!(exit_code(&api(409).context("producing")), EXIT_CONFLICT);
        assert_eq!(exit_code(&anyhow::anyhow!("other")), EXIT_ERROR);
        // Offline view errors as the server would answer them.
        let unknown = kappa_views::ViewError::UnknownView("v".into());
        assert_eq!(exit_code(&anyhow::Error::from(unknown).context("reading")), EXIT_NOT_FOUND);
        let invalid = kappa_views::ViewError::AsOfInvalid { view: "v".into(), reason: "x".into() };
        assert_eq!(exit_code(&invalid.into()), EXIT_USAGE);
        let failed = kappa_views::ViewError::Changelog { view: "v".into(), version: 1, reason: "x".into() };
        assert_eq!(exit_code(&failed.into()), EXIT_ERROR);
        // A closed stdout ends a command quietly, with context or without.
        let closed = stdout_error(std::io::ErrorKind::BrokenPipe.into());
        assert_eq!(exit_code(&closed.context("listing topics")), 0);
        assert_eq!(exit_code(&stdout_error(std::io::ErrorKind::StorageFull.into())), EXIT_ERROR);
    }

    #[test]
    fn partition_ranges_are_worded_for_people() {
        assert_eq!(partitions_phrase(1), "1 partition (0)");
        assert_eq!(partitions_phrase(4), "4 partitions (0 to 3)");
    }

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(encode("a b/c%"), "a%20b%2Fc%25");
        assert_eq!(encode("topic.name_1-x~"), "topic.name_1-x~");
    }
}
