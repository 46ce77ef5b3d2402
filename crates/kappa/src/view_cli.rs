//! `kappa view ...` against a running server, over its HTTP API.

use std::io::IsTerminal;
use std::time::Duration;

use std::io::Write;

use anyhow::{Context, bail};
use serde_json::Value;

use crate::cli::{BadInput, RECONNECT_WITHIN, Reconnect, encode, expect_ok, outln, stdout_error};
use crate::http_client;

/// How `view list` / `view status` mark a version switched away from (`"auto_switch": false`).
pub const NO_AUTO_SWITCH_NOTE: &str = "\tno auto-switch (switched away from)";

/// How often `view status` polls while following a rebuild.
const STATUS_POLL: Duration = Duration::from_millis(500);

fn version_line(name: &str, version: &Value) -> String {
    let mut line = format!(
        "{name}\tv{}\t{}\tevents={}\tlag={}",
        version["version"],
        version["status"].as_str().unwrap_or("?"),
        version["events_applied"],
        version["lag"]
    );
    if version["auto_switch"] == false {
        line.push_str(NO_AUTO_SWITCH_NOTE);
    }
    if let Some(error) = version["error"].as_str() {
        line.push_str(&format!("\terror: {error}"));
    }
    line
}

pub fn list(server: &str) -> anyhow::Result<()> {
    let views = expect_ok(http_client::request(server, "GET", "/v1/views", None)?, "listing views")?;
    for view in views["views"].as_array().into_iter().flatten() {
        for version in view["versions"].as_array().into_iter().flatten() {
            outln!("{}", version_line(view["name"].as_str().unwrap_or("?"), version))?;
        }
    }
    Ok(())
}

/// How `view get` reads: now, as of a past point, or after offsets were applied.
pub struct Read<'a> {
    pub as_of: Option<&'a str>,
    /// `topic:partition:offset` items, each possibly a comma-separated list.
    pub after: &'a [String],
    pub wait_ms: Option<u64>,
}

pub fn get(server: &str, view: &str, key: &str, read: Read<'_>) -> anyhow::Result<()> {
    let mut path = format!("/v1/views/{}/keys/{}", encode(view), encode(key));
    let mut query = Vec::new();
    if let Some(at) = read.as_of {
        query.push(format!("as_of={}", encode(at)));
    }
    if !read.after.is_empty() {
        // Checked here too, so a typo is exit 2 with the flag's name before any request.
        let list = read.after.join(",");
        kappa_http::views::parse_after_offsets(&list).map_err(|e| BadInput(format!("--after: {e}")))?;
        query.push(format!("after_offsets={}", encode(&list)));
    }
    if let Some(ms) = read.wait_ms {
        if ms > kappa_views::READ_WAIT_MS_MAX {
            let max = kappa_views::READ_WAIT_MS_MAX;
            return Err(BadInput(format!(
                "--wait-ms {ms}: at most {max} (ms); give less, and read again if the view is still behind"
            ))
            .into());
        }
        query.push(format!("wait_ms={ms}"));
    }
    if !query.is_empty() {
        path.push_str(&format!("?{}", query.join("&")));
    }
    let answer = expect_ok(http_client::request(server, "GET", &path, None)?, &format!("reading {view}/{key}"))?;
    outln!("{}", answer["value"])
}

pub fn switch(server: &str, view: &str, version: u32, force: bool) -> anyhow::Result<()> {
    let body = serde_json::json!({"version": version, "force": force}).to_string();
    let path = format!("/v1/views/{}/switch", encode(view));
    expect_ok(http_client::request(server, "POST", &path, Some(&body))?, &format!("switching {view} to v{version}"))?;
    outln!("{view}: version {version} serves reads")
}

pub fn retire(server: &str, view: &str, version: u32) -> anyhow::Result<()> {
    let path = format!("/v1/views/{}/versions/{version}", encode(view));
    expect_ok(http_client::request(server, "DELETE", &path, None)?, &format!("retiring {view} v{version}"))?;
    outln!("{view}: version {version} retired")
}

/// Follows a key or prefix over SSE, printing each event's data as a line. When the server
/// goes away (a restart), reconnects with backoff for up to [`RECONNECT_WITHIN`] and resumes
/// after the last event's token (the live API's `?resume=`): exactly the changes after it, or
/// a `reset` and a fresh snapshot, printed as they come.
pub fn watch(server: &str, view: &str, key: Option<&str>, prefix: Option<&str>) -> anyhow::Result<()> {
    let query = match (key, prefix) {
        (Some(key), _) => format!("key={}", encode(key)),
        (None, Some(prefix)) => format!("prefix={}", encode(prefix)),
        (None, None) => bail!("give a key or --prefix"),
    };
    let base = format!("/v1/views/{}/watch?{query}", encode(view));
    let mut token: Option<String> = None;
    let mut reconnect = Reconnect::default();
    let mut out = std::io::stdout().lock();
    // Only a watch that was under way reconnects: a server that cannot be reached at first
    // (a typo in --server) is an error at once, as for every other command.
    let mut streamed = false;
    loop {
        let path = match &token {
            Some(token) => format!("{base}&resume={}", encode(token)),
            None => base.clone(),
        };
        let ended = match http_client::open_events(server, &path) {
            Ok(Ok(mut stream)) => loop {
                let event = match stream.next_event() {
                    Ok(event) => event,
                    Err(e) => break Ended::Lost(e.into()),
                };
                // Connected once an event came, not at the headers: a server that answers
                // and closes at once is retried with backoff, not every 200 ms for good.
                streamed = true;
                reconnect.connected(|| match &token {
                    Some(token) => format!("reconnected; watching {view} on after {token}"),
                    None => format!("reconnected; watching {view} from a fresh snapshot"),
                });
                if event.name == "error" {
                    let code = serde_json::from_str::<Value>(&event.data).ok().map(|v| v["code"].clone());
                    // Cut off for reading too slowly: resume where it was (a note, not a
                    // line of the watch's output).
                    if code.as_ref().and_then(Value::as_str) == Some("slow_consumer") {
                        break Ended::Slow(event.data);
                    }
                    bail!("the subscription ended: {}", event.data);
                }
                // Line by line, as changes come; a closed pipe (`| head -1`) ends the watch
                // quietly. Keys sorted, as `view get` and `view dump` print them.
                let line = serde_json::from_str::<Value>(&event.data).map_or(event.data, |v| v.to_string());
                writeln!(out, "{line}").and_then(|()| out.flush()).map_err(stdout_error)?;
                if let Some(id) = event.id {
                    token = Some(id);
                }
            },
            Ok(Err(refused)) => {
                expect_ok(refused, &format!("watching {view}"))?;
                bail!("watching {view}: the server did not start a stream");
            }
            Err(e) if !streamed => return Err(e.into()),
            Err(e) => Ended::Lost(e.into()),
        };
        let resume = |what: &str| match &token {
            Some(token) => format!("{what} to resume after {token}"),
            None => what.to_owned(),
        };
        match ended {
            Ended::Slow(error) => {
                eprintln!("note: the server ended the stream: {error}; {}", resume("reconnecting"));
                reconnect.pause();
            }
            // Not a lost connection: the error, at once.
            Ended::Lost(error) => {
                reconnect.lost(error, || resume(&format!("reconnecting for up to {} s", RECONNECT_WITHIN.as_secs())))?
            }
        }
    }
}

/// How one stream of `view watch` ended.
enum Ended {
    /// The connection went (or could not be opened): `Reconnect` decides.
    Lost(anyhow::Error),
    /// The server cut this reader off for reading too slowly (its error event).
    Slow(String),
}

/// Prints a view's versions; while one builds (or waits to restart), follows it with a
/// progress bar (a terminal) or a line per poll (anything else) until none does. Ends with
/// an error (exit 1) when a version is stopped, naming it and why, so a script can tell.
pub fn status(server: &str, view: &str, once: bool) -> anyhow::Result<()> {
    let path = format!("/v1/views/{}", encode(view));
    let fetch = || -> anyhow::Result<Value> {
        expect_ok(http_client::request(server, "GET", &path, None)?, &format!("reading view {view}"))
    };
    let info = fetch()?;
    for version in info["versions"].as_array().into_iter().flatten() {
        outln!("{}", version_line(view, version))?;
    }
    let building = |info: &Value| -> Option<Value> {
        let mut versions = info["versions"].as_array().into_iter().flatten();
        // A serving version waiting to restart (a full disk) may wait long: not followed.
        versions.find(|v| v["status"] == "building" || (v["status"] == "restarting" && v["serving"] != true)).cloned()
    };
    let Some(first) = building(&info) else { return stopped_versions(view, &info) };
    if once {
        return stopped_versions(view, &info);
    }
    let terminal = std::io::stderr().is_terminal();
    let bar = indicatif::ProgressBar::new(total(&first));
    if terminal {
        bar.set_style(
            indicatif::ProgressStyle::with_template("{prefix} [{bar:40}] {pos}/{len} events {msg}")
                .context("progress bar template")?
                .progress_chars("=> "),
        );
        bar.set_prefix(format!("{view} v{}", first["version"]));
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    loop {
        let info = fetch()?;
        let Some(version) = building(&info) else {
            stopped_versions(view, &info)?;
            bar.finish_with_message("caught up");
            if !terminal {
                outln!("{view}: caught up")?;
            }
            return Ok(());
        };
        let applied = version["events_applied"].as_u64().unwrap_or(0);
        let rate = version["rate_per_second"].as_f64().unwrap_or(0.0);
        let eta = version["eta_seconds"].as_f64().map_or("?".to_owned(), |s| format!("{s:.0} s"));
        let message = format!("{rate:.0}/s, ETA {eta}");
        bar.set_length(total(&version));
        bar.set_position(applied);
        bar.set_message(message.clone());
        if !terminal {
            outln!("{view} v{}: {applied}/{} events, {message}", version["version"], total(&version))?;
        }
        std::thread::sleep(STATUS_POLL);
    }
}

/// Err naming every version of `info` that stopped, with why.
fn stopped_versions(view: &str, info: &Value) -> anyhow::Result<()> {
    let stopped: Vec<String> = info["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["status"] == "failed")
        .map(|v| format!("v{}: {}", v["version"], v["error"].as_str().unwrap_or("no reason given")))
        .collect();
    anyhow::ensure!(stopped.is_empty(), "view {view} has stopped versions — {}", stopped.join("; "));
    Ok(())
}

fn total(version: &Value) -> u64 {
    version["events_applied"].as_u64().unwrap_or(0) + version["lag"].as_u64().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::version_line;

    /// A version switched away from says so in `view list` / `view status`: it explains why
    /// it does not take over when it catches up.
    #[test]
    fn a_version_line_says_when_the_version_does_not_switch_by_itself() {
        let version = json!({"version": 2, "status": "ready", "events_applied": 5, "lag": 0, "auto_switch": false});
        assert_eq!(version_line("v", &version), "v\tv2\tready\tevents=5\tlag=0\tno auto-switch (switched away from)");
        let version = json!({"version": 1, "status": "serving", "events_applied": 5, "lag": 0, "auto_switch": true});
        assert_eq!(version_line("v", &version), "v\tv1\tserving\tevents=5\tlag=0");
    }
}
