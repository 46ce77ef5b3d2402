//! kappa's log: an append-only, partitioned, compacting store of Kafka RecordBatch v2
//! batches in segment files.
//!
//! Invariant: this crate knows record batches and files. It knows nothing of requests,
//! connections, consumer groups or views.

pub mod batch;
mod clean_prefix;
pub mod clock;
pub mod codec;
pub mod compaction;
pub mod compression;
pub mod config;
pub mod error;
pub mod fuzzing;
pub mod health;
pub mod index;
pub mod io;
pub mod log;
pub mod partition;
pub mod partitioner;
pub mod producer;
pub mod records;
pub mod segment;

pub use crate::config::TopicConfig;
pub use crate::error::{LogError, Result};
pub use crate::log::{Log, LogOptions, RecoveryReport, Topic};
pub use crate::partition::{AppendOutcome, Isolation, Partition, ReadOutcome, SyncPolicy};
