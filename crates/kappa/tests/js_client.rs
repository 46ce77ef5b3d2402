//! The JavaScript client (`clients/js`) and the page kappa serves at `/`, tested by Node's
//! test runner against the real `channels` example binary (built beside this test by
//! `cargo build --examples`). The Node tests start, SIGKILL and restart the server
//! themselves (`clients/js/test/helpers.js`), since they decide when to kill it mid-stream.
//!
//! Needs `npm ci` in clients/js (ws, playwright-core, typescript) and, for the page,
//! Debian's `chromium`; `scripts/test-all` installs all three. By hand:
//! `cd clients/js && KAPPA_CHANNELS_BIN=../../target/debug/examples/channels npm test`.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{example_binary, repo_root};

const TIMEOUT: Duration = Duration::from_secs(300);

fn client_dir() -> PathBuf {
    let dir = repo_root().join("clients/js");
    for package in ["ws", "playwright-core", "typescript"] {
        assert!(
            dir.join("node_modules").join(package).is_dir(),
            "clients/js dev dependencies are not installed (missing {package}): run `npm ci` in {} (scripts/test-all does)",
            dir.display()
        );
    }
    dir
}

/// Runs `node --test FILES...` in clients/js; panics with its output when a test fails.
fn node_test(files: &[&str]) {
    let dir = client_dir();
    let mut child = Command::new("node")
        .current_dir(&dir)
        .args(["--test", "--test-reporter=spec"])
        .args(files)
        .env("KAPPA_CHANNELS_BIN", example_binary("channels"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run node (scripts/test-all installs it): {e}"));
    // Read both pipes on threads so a chatty child never blocks on a full pipe.
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("stderr")));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for node") {
            break Some(status);
        }
        if started.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (stdout, stderr) = (stdout.join().unwrap_or_default(), stderr.join().unwrap_or_default());
    let what = format!("node --test {} (in {})", files.join(" "), dir.display());
    match status {
        None => panic!("{what} timed out after {TIMEOUT:?}\nstdout:\n{stdout}\nstderr:\n{stderr}"),
        Some(status) if !status.success() => {
            panic!("{what} failed with {status}\nstdout:\n{stdout}\nstderr:\n{stderr}")
        }
        Some(_) => eprintln!("{what} passed in {:.1} s\n{stdout}", started.elapsed().as_secs_f64()),
    }
}

#[test]
fn js_client_reads_follows_keys_and_prefixes_and_resumes_across_kill9() {
    node_test(&["test/client.test.js", "test/resume.test.js", "test/types.test.js", "test/token.test.js"]);
}

#[test]
fn page_watches_a_view_live_in_headless_chromium() {
    let chromium =
        std::env::var_os("KAPPA_CHROMIUM").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        Path::new(&chromium).exists(),
        "no Chromium at {}: `apt-get install chromium` (scripts/test-all does)",
        chromium.display()
    );
    node_test(&["test/page.test.js"]);
}
