//! The brief's application: channels with content, and three views over them.
//!
//! Run: `cargo run --release --example channels -- serve` (the same flags as `kappa serve`).
//! It creates the `channels` topic (4 partitions, compacted per channelId + contentId) when
//! missing, and serves the views `channel_page`, `channel_stats` and `owner_channels`
//! (their code is in `crates/kappa/src/channels.rs`).

use kappa::{App, channels};

/// mimalloc, configured by `App::main` (`kappa::allocator`).
#[global_allocator]
static ALLOCATOR: kappa::allocator::MiMalloc = kappa::allocator::MiMalloc;

fn main() -> anyhow::Result<()> {
    App::new()
        .topic(channels::TOPIC, channels::PARTITIONS, channels::topic_configs())
        .schemas(channels::schemas())
        .views(channels::views())
        .main()
}
