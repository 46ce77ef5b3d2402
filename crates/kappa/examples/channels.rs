//! The brief's application: channels with content, and three views over them.
//!
//! Run: `cargo run --release --example channels -- serve` (the same flags as `kappa serve`).
//! It creates the `channels` topic (4 partitions, compacted per channelId + contentId) when
//! missing, and serves the views `channel_page`, `channel_stats` and `owner_channels`
//! (their code is in `crates/kappa/src/channels.rs`).

use kappa::{App, channels};

/// Many small, short-lived allocations (records, view state): glibc's malloc and free were
/// ~17 % of a view rebuild's profile (BENCHMARKS.md, run 10).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    App::new()
        .topic(channels::TOPIC, channels::PARTITIONS, channels::topic_configs())
        .schemas(channels::schemas())
        .views(channels::views())
        .main()
}
