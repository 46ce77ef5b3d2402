//! Kafka error codes and the mapping from kappa's typed errors to them.

use kappa_coordinator::{GroupError, TxnError};
use kappa_log::LogError;
use kappa_log::batch::BatchError;

pub const UNKNOWN_SERVER_ERROR: i16 = -1;
pub const NONE: i16 = 0;
pub const OFFSET_OUT_OF_RANGE: i16 = 1;
pub const CORRUPT_MESSAGE: i16 = 2;
pub const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;
pub const MESSAGE_TOO_LARGE: i16 = 10;
pub const OFFSET_METADATA_TOO_LARGE: i16 = 12;
pub const COORDINATOR_NOT_AVAILABLE: i16 = 15;
pub const INVALID_TOPIC_EXCEPTION: i16 = 17;
pub const INVALID_REQUIRED_ACKS: i16 = 21;
pub const ILLEGAL_GENERATION: i16 = 22;
pub const INCONSISTENT_GROUP_PROTOCOL: i16 = 23;
pub const INVALID_GROUP_ID: i16 = 24;
pub const UNKNOWN_MEMBER_ID: i16 = 25;
pub const INVALID_SESSION_TIMEOUT: i16 = 26;
pub const REBALANCE_IN_PROGRESS: i16 = 27;
pub const TOPIC_ALREADY_EXISTS: i16 = 36;
pub const INVALID_PARTITIONS: i16 = 37;
pub const INVALID_REPLICATION_FACTOR: i16 = 38;
pub const INVALID_REPLICA_ASSIGNMENT: i16 = 39;
pub const INVALID_CONFIG: i16 = 40;
pub const INVALID_REQUEST: i16 = 42;
pub const POLICY_VIOLATION: i16 = 44;
pub const OUT_OF_ORDER_SEQUENCE_NUMBER: i16 = 45;
pub const INVALID_PRODUCER_EPOCH: i16 = 47;
pub const INVALID_TXN_STATE: i16 = 48;
pub const TRANSACTIONAL_ID_AUTHORIZATION_FAILED: i16 = 53;
pub const INVALID_PRODUCER_ID_MAPPING: i16 = 49;
pub const INVALID_TRANSACTION_TIMEOUT: i16 = 50;
pub const CONCURRENT_TRANSACTIONS: i16 = 51;
pub const KAFKA_STORAGE_ERROR: i16 = 56;
pub const NON_EMPTY_GROUP: i16 = 68;
pub const GROUP_ID_NOT_FOUND: i16 = 69;
pub const UNSUPPORTED_COMPRESSION_TYPE: i16 = 76;
pub const MEMBER_ID_REQUIRED: i16 = 79;
pub const GROUP_MAX_SIZE_REACHED: i16 = 81;
pub const FENCED_INSTANCE_ID: i16 = 82;
pub const GROUP_SUBSCRIBED_TO_TOPIC: i16 = 86;
pub const INVALID_RECORD: i16 = 87;
pub const UNSTABLE_OFFSET_COMMIT: i16 = 88;
pub const UNKNOWN_TOPIC_ID: i16 = 100;

/// The Kafka code for a batch the log refused, as Kafka tells them apart: a CRC or length
/// that does not hold, or an unknown magic, is CORRUPT_MESSAGE (Kafka's
/// CorruptRecordException; KafkaJS and the Java client retry it, librdkafka and kafka-python
/// do not); a batch that breaks the format's rules — a count that disagrees with its offset
/// deltas, a partial batch (a whole request frame arrived, so it was sent that way), an
/// unknown codec (Kafka answers that one UNKNOWN_SERVER_ERROR) — is INVALID_RECORD
/// (LogValidator's InvalidRecordException), which no client retries: the same bytes would
/// fail again. v0/v1 message sets never reach the log (`produce.rs` converts them).
fn batch_code(error: &BatchError) -> i16 {
    match error {
        BatchError::BadLength { .. } | BatchError::BadCrc { .. } | BatchError::BadMagic(_) => CORRUPT_MESSAGE,
        BatchError::Truncated { .. }
        | BatchError::CountMismatch { .. }
        | BatchError::BadCodec(_)
        | BatchError::Empty(_) => INVALID_RECORD,
    }
}

/// The Kafka code for a log error.
pub fn log_code(error: &LogError) -> i16 {
    match error {
        LogError::InvalidBatch(e) => batch_code(e),
        LogError::InvalidRecords(_) | LogError::MissingKey { .. } => INVALID_RECORD,
        LogError::MessageTooLarge { .. } => MESSAGE_TOO_LARGE,
        LogError::OffsetOutOfRange { .. } => OFFSET_OUT_OF_RANGE,
        // Produce answers a fenced epoch with INVALID_PRODUCER_EPOCH, which every client knows.
        LogError::ProducerFenced { .. } => INVALID_PRODUCER_EPOCH,
        LogError::OutOfOrderSequence { .. } => OUT_OF_ORDER_SEQUENCE_NUMBER,
        LogError::InvalidTxnMarker { .. } => INVALID_TXN_STATE,
        LogError::UnknownTopic(_) | LogError::UnknownPartition { .. } => UNKNOWN_TOPIC_OR_PARTITION,
        LogError::TopicExists(_) => TOPIC_ALREADY_EXISTS,
        LogError::InvalidTopicName { .. } => INVALID_TOPIC_EXCEPTION,
        LogError::InvalidPartitions { .. } => INVALID_PARTITIONS,
        LogError::UnknownConfig(_) | LogError::InvalidConfig { .. } => INVALID_CONFIG,
        // Kafka's ReplicaManager refuses DeleteRecords on a topic without cleanup.policy=delete.
        LogError::DeleteRecordsPolicy { .. } => POLICY_VIOLATION,
        LogError::Poisoned { .. } | LogError::Io { .. } | LogError::Corrupt { .. } | LogError::Closed => {
            KAFKA_STORAGE_ERROR
        }
        // Only HTTP produce appends conditionally, and only the view engine makes a chosen
        // offset durable; a Kafka request never sees these.
        LogError::EndMoved { .. } | LogError::NotWritten { .. } => -1, // UNKNOWN_SERVER_ERROR
    }
}

pub fn group_code(error: &GroupError) -> i16 {
    match error {
        GroupError::InvalidGroupId(_) => INVALID_GROUP_ID,
        GroupError::UnknownMemberId => UNKNOWN_MEMBER_ID,
        GroupError::IllegalGeneration => ILLEGAL_GENERATION,
        GroupError::RebalanceInProgress => REBALANCE_IN_PROGRESS,
        GroupError::InconsistentGroupProtocol => INCONSISTENT_GROUP_PROTOCOL,
        GroupError::InvalidSessionTimeout { .. } => INVALID_SESSION_TIMEOUT,
        GroupError::MemberIdRequired(_) => MEMBER_ID_REQUIRED,
        GroupError::FencedInstanceId => FENCED_INSTANCE_ID,
        GroupError::GroupMaxSizeReached { .. } => GROUP_MAX_SIZE_REACHED,
        GroupError::CoordinatorFull { .. } | GroupError::Storage(_) => COORDINATOR_NOT_AVAILABLE,
        GroupError::GroupIdNotFound => GROUP_ID_NOT_FOUND,
        GroupError::NonEmptyGroup => NON_EMPTY_GROUP,
        GroupError::GroupSubscribedToTopic => GROUP_SUBSCRIBED_TO_TOPIC,
        GroupError::MetadataTooLarge { .. } => OFFSET_METADATA_TOO_LARGE,
        GroupError::UnstableOffsetCommit => UNSTABLE_OFFSET_COMMIT,
    }
}

pub fn txn_code(error: &TxnError) -> i16 {
    match error {
        TxnError::ProducerFenced => INVALID_PRODUCER_EPOCH,
        TxnError::InvalidProducerIdMapping => INVALID_PRODUCER_ID_MAPPING,
        TxnError::InvalidTxnState(_) => INVALID_TXN_STATE,
        TxnError::ConcurrentTransactions => CONCURRENT_TRANSACTIONS,
        TxnError::InvalidTransactionTimeout { .. } => INVALID_TRANSACTION_TIMEOUT,
        TxnError::InvalidTransactionalId(_) | TxnError::TooManyPartitions { .. } => INVALID_REQUEST,
        TxnError::Storage(_) => COORDINATOR_NOT_AVAILABLE,
    }
}
