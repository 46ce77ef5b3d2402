//! Exactly once across crashes: the channels example application is SIGKILLed at random
//! moments while its views apply freshly produced events, and restarted, many times. At
//! the end every view equals a reference fold of everything produced (computed by
//! `tests/clients/python/channels_events.py`, independently of the Rust code), both in the
//! state store and folded from the view's changelog — no change lost or applied twice.
//!
//! `SOAK=1` runs 500 cycles instead of 50; `SEED=n` replays one run.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use common::{
    Server, example_binary, expected_views as expected, next_random, produce_channel_events as produce, random_seed,
    run,
};
use serde_json::Value;

const VIEWS: [&str; 3] = ["channel_page", "channel_stats", "owner_channels"];

/// `channels view dump <view>` on the stopped server's data directory.
fn dump(server: &Server, view: &str, args: &[&str]) -> BTreeMap<String, Value> {
    let mut command = Command::new(example_binary("channels"));
    command.args(["view", "dump", view, "--data-dir"]).arg(&server.data_dir).args(args);
    let out = run(&mut command, Duration::from_secs(300), server);
    out.lines()
        .map(|line| {
            let item: Value = serde_json::from_str(line).expect("a JSON line");
            (item["key"].as_str().expect("key").to_owned(), item["value"].clone())
        })
        .collect()
}

#[test]
fn views_apply_every_event_exactly_once_across_kill9() {
    let soak = std::env::var("SOAK").is_ok_and(|v| v == "1");
    let cycles: u64 = if soak { 500 } else { 50 };
    let per_cycle: u64 = 1_000;
    let seed: u64 = std::env::var("SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(random_seed);
    eprintln!(
        "views_kill9: seed {seed} ({cycles} cycles); replay with SEED={seed} cargo nextest run -p kappa --test views_kill9"
    );
    let temp = tempfile::tempdir().expect("temp dir");
    let mut server = Server::start_binary_in(&example_binary("channels"), temp.path(), &[]);
    let mut rng = seed;
    for cycle in 0..cycles {
        produce(&server, seed, cycle * per_cycle, per_cycle);
        // Kill while the views apply what was just produced (or while they restore).
        std::thread::sleep(Duration::from_micros(next_random(&mut rng) % 30_000));
        server.kill9();
        server.restart(&[]);
    }
    server.kill9();
    let expected = expected(&server, seed, cycles * per_cycle);
    for view in VIEWS {
        let store = dump(&server, view, &["--catch-up"]);
        assert_eq!(store, expected[view], "view {view} (seed {seed}): the state store differs from the reference fold");
        let changelog = dump(&server, view, &["--source", "changelog"]);
        assert_eq!(
            changelog, expected[view],
            "view {view} (seed {seed}): the changelog differs from the reference fold"
        );
    }
}
