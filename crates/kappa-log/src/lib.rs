//! kappa's log: an append-only, partitioned, compacting store of Kafka RecordBatch v2
//! batches in segment files.
//!
//! Invariant: this crate knows record batches and files. It knows nothing of requests,
//! connections, consumer groups or views.

pub mod batch;
pub mod compression;
pub mod io;
pub mod records;
