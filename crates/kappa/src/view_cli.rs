//! `kappa view ...` against a running server, over its HTTP API.

use std::io::IsTerminal;
use std::time::Duration;

use std::io::Write;

use anyhow::{Context, bail};
use serde_json::Value;

use crate::cli::{encode, expect_ok, outln};
use crate::http_client;

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

pub fn get(server: &str, view: &str, key: &str, as_of: Option<&str>) -> anyhow::Result<()> {
    let mut path = format!("/v1/views/{}/keys/{}", encode(view), encode(key));
    if let Some(at) = as_of {
        path.push_str(&format!("?as_of={}", encode(at)));
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

pub fn watch(server: &str, view: &str, key: Option<&str>, prefix: Option<&str>) -> anyhow::Result<()> {
    let query = match (key, prefix) {
        (Some(key), _) => format!("key={}", encode(key)),
        (None, Some(prefix)) => format!("prefix={}", encode(prefix)),
        (None, None) => bail!("give a key or --prefix"),
    };
    let path = format!("/v1/views/{}/watch?{query}", encode(view));
    let mut failed = None;
    let mut reader_gone = false;
    let mut out = std::io::stdout().lock();
    let refused = http_client::stream_events(server, &path, |name, data| {
        // Line by line, as changes come; a closed pipe (`| head -1`) ends the watch quietly.
        if let Err(e) = writeln!(out, "{data}").and_then(|()| out.flush()) {
            reader_gone = e.kind() == std::io::ErrorKind::BrokenPipe;
            failed = (!reader_gone).then(|| format!("writing to stdout: {e}"));
            return false;
        }
        if name == "error" {
            failed = Some(data.to_owned());
            return false;
        }
        true
    })?;
    if reader_gone {
        return Ok(());
    }
    if let Some(response) = refused {
        expect_ok(response, &format!("watching {view}"))?;
        bail!("watching {view}: the server did not start a stream");
    }
    if let Some(error) = failed {
        bail!("the subscription ended: {error}");
    }
    bail!("the server closed the stream (stopped?); run the command again for a fresh snapshot")
}

/// Prints a view's versions; while one builds, follows it with a progress bar (a terminal)
/// or a line per poll (anything else) until no version is building.
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
        info["versions"].as_array().into_iter().flatten().find(|v| v["status"] == "building").cloned()
    };
    let Some(first) = building(&info) else { return Ok(()) };
    if once {
        return Ok(());
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

fn total(version: &Value) -> u64 {
    version["events_applied"].as_u64().unwrap_or(0) + version["lag"].as_u64().unwrap_or(0)
}
