//! kappa's coordinators: consumer groups (membership and committed offsets) and
//! transactions, with their state in internal compacted topics of the log.
//!
//! Invariant: this crate knows the log and the coordination state machines, not the wire
//! protocol. The broker decodes requests, calls these, and encodes the answers.

pub mod error;
pub mod group;
mod internal;
pub mod offsets;
pub mod txn;

pub use error::{GroupError, TxnError};
pub use group::{GroupConfig, GroupCoordinator, JoinOutcome, JoinRequest, SyncRequest};
pub use offsets::{CONSUMER_OFFSETS_TOPIC, CommittedOffset, OffsetStore};
pub use txn::{
    OngoingTxn, RESERVED_TRANSACTIONAL_ID_PREFIX, TRANSACTION_STATE_TOPIC, TXN_PARTITIONS_MAX_LIMIT, TxnConfig,
    TxnCoordinator,
};
