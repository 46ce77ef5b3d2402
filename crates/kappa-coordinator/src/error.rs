//! The coordinators' typed errors. The broker maps each to its Kafka error code.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum GroupError {
    #[error("invalid group id: {0}")]
    InvalidGroupId(String),
    #[error("the member id is not known to this group; rejoin with an empty member id")]
    UnknownMemberId,
    #[error("the generation id does not match the group's current generation; rejoin the group")]
    IllegalGeneration,
    #[error("the group is rebalancing; rejoin the group")]
    RebalanceInProgress,
    #[error("the member's protocol type or protocols are incompatible with the group's members")]
    InconsistentGroupProtocol,
    #[error("session timeout must be between {min} and {max} ms")]
    InvalidSessionTimeout { min: i32, max: i32 },
    #[error("a member id is required: rejoin with member id {0}")]
    MemberIdRequired(String),
    #[error("another member with the same group.instance.id has taken over")]
    FencedInstanceId,
    #[error("the group already has {members_max} members (group.max.size)")]
    GroupMaxSizeReached { members_max: usize },
    #[error("the coordinator already holds {groups_max} groups")]
    CoordinatorFull { groups_max: usize },
    #[error("the group does not exist")]
    GroupIdNotFound,
    #[error("the group still has members; stop them before deleting the group")]
    NonEmptyGroup,
    #[error("the group is subscribed to this topic; stop its members first")]
    GroupSubscribedToTopic,
    #[error("the offsets could not be stored: {0}")]
    Storage(String),
    #[error("offset commit metadata is {len} bytes, over the limit of {max}")]
    MetadataTooLarge { len: usize, max: usize },
    #[error("an open transaction holds a newer offset for this partition; retry once it ends")]
    UnstableOffsetCommit,
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum TxnError {
    #[error("the producer epoch is stale: a newer producer with this transactional id fenced it")]
    ProducerFenced,
    #[error("the producer id and epoch do not match the transactional id's current ones")]
    InvalidProducerIdMapping,
    #[error("the transaction is in state {0}, which does not allow this operation")]
    InvalidTxnState(&'static str),
    #[error("another operation on this transactional id is in progress; retry")]
    ConcurrentTransactions,
    #[error("transaction timeout {requested_ms} ms is above the maximum {max_ms} ms (transaction.max.timeout.ms)")]
    InvalidTransactionTimeout { requested_ms: i32, max_ms: i32 },
    #[error("invalid transactional id: {0}")]
    InvalidTransactionalId(String),
    #[error("the transaction state could not be stored: {0}")]
    Storage(String),
    #[error("the transaction touches {count} partitions, over the limit of {max}")]
    TooManyPartitions { count: usize, max: usize },
}
