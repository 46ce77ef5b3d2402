//! kappa's view engine: folds events from the log into materialized views, in order per
//! input partition, exactly once, with a changelog per view version.
//!
//! Code map: `event` (records → events), `schema` (upcasting), `view` (how applications
//! define views), `backend` (the narrow log interface) and `embedded` (it over kappa's log),
//! `store` (redb state per version), `changelog` (the change stream's record format),
//! `runner` (the processing loop and recovery), `engine` (versions, switching, reads),
//! `asof` (point-in-time replays), `partitioned` (one input partition's fold for an
//! outside runner: work mode).
//!
//! Invariant: this crate reads records through [`backend::LogBackend`]; it knows nothing of
//! the Kafka wire protocol, HTTP or JSON request shapes.

pub mod asof;
pub mod backend;
pub mod changelog;
pub mod embedded;
pub mod engine;
pub mod error;
pub mod event;
pub mod partitioned;
pub mod runner;
pub mod schema;
pub mod store;
pub mod view;

#[cfg(test)]
mod read_after_tests;

pub use crate::asof::{AsOf, AsOfView};
pub use crate::backend::LogBackend;
pub use crate::embedded::EmbeddedLog;
pub use crate::engine::{
    ChangelogFold, EngineConfig, Item, Page, READ_WAIT_MS_MAX, Read, VersionInfo, ViewEngine, ViewInfo,
};
pub use crate::error::{Behind, EventError, InputPosition, Result, ViewError};
pub use crate::event::{Event, JsonCodec, PayloadCodec, TypedPayload};
pub use crate::partitioned::{PartitionView, Step};
pub use crate::runner::{Phase, RunnerStatus};
pub use crate::schema::Schemas;
pub use crate::store::ScanLimit;
pub use crate::view::{ErrorPolicy, Processor, Reducer, StateAccess, View};
