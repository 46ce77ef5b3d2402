//! Work mode's errors: each says which topic, partition or setting it is about.

use rdkafka::error::KafkaError;

#[derive(Debug, thiserror::Error)]
pub enum WorkError {
    #[error("Kafka client ({context}): {source}")]
    Kafka { context: String, source: KafkaError },
    #[error("topic '{topic}' exists with {found} but this worker needs {wanted}; {fix}")]
    TopicMismatch { topic: String, found: String, wanted: String, fix: String },
    #[error("input topic '{topic}' does not exist and the application does not declare it; create it first")]
    MissingInput { topic: String },
    #[error(
        "input topic '{topic}' grew: this worker was assigned its partition {partition}, but it had {partitions} partitions when the worker started and changelog '{changelog}' has one partition per input partition; a view cannot follow a topic whose partitions grew (keys of the old partitions now land in the new ones). Stop every worker, delete the view's topics derived from the input (its changelog, and for a repartitioned view its repartition topics), then start the workers again: they rebuild the view from the input"
    )]
    InputGrew { topic: String, partition: i32, partitions: i32, changelog: String },
    #[error("restoring {topic}/{partition}: {reason}")]
    Restore { topic: String, partition: i32, reason: String },
    #[error(
        "the transactional producer of {topic}/{partition} was fenced ({source}): another worker owns this partition now; this worker stops so it cannot write as a zombie"
    )]
    Fenced { topic: String, partition: i32, source: KafkaError },
    #[error(
        "the transaction of a step of {topic}/{partition} failed in {op} ({source}) and can neither complete nor be aborted (retriable failures were retried {attempts_max} times): this worker stops; its partitions' next owner fences this producer and restores them from the changelogs",
        attempts_max = crate::config::TRANSACTION_CALL_ATTEMPTS_MAX
    )]
    // Boxed: keeps `WorkError` (and every `Result` of this crate) small.
    Transaction { topic: String, partition: i32, op: &'static str, source: Box<KafkaError> },
    #[error("view: {0}")]
    View(#[from] kappa_views::ViewError),
    #[error("invalid --kafka-config '{0}': expected key=value")]
    BadConfig(String),
    #[error("no view named '{0}' among the views this worker runs (--views, --repartition)")]
    UnknownView(String),
    #[error("HTTP listener {addr}: {source}")]
    Http { addr: String, source: std::io::Error },
}

pub type Result<T, E = WorkError> = std::result::Result<T, E>;

/// Wraps a client error with what was being done.
pub(crate) fn kafka(context: impl Into<String>) -> impl FnOnce(KafkaError) -> WorkError {
    let context = context.into();
    move |source| WorkError::Kafka { context, source }
}
