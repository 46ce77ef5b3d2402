//! Every error is JSON `{"error":{"code","message"}}` with a stable code and a message that
//! says what to fix.

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kappa_log::LogError;
use kappa_views::ViewError;
use serde_json::json;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// More about the error, merged into the `error` object (e.g. `view_behind`'s positions).
    pub details: Option<serde_json::Map<String, serde_json::Value>>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), details: None }
    }

    /// This error with `details`' fields beside its code and message.
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        if let serde_json::Value::Object(fields) = details {
            self.details = Some(fields);
        }
        self
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    /// A query string that does not parse (or names a parameter the endpoint does not
    /// take), with what the endpoint accepts.
    pub fn invalid_query(rejection: QueryRejection, accepted: &str) -> Self {
        Self::bad_request("invalid_query", format!("{}; expected {accepted}", rejection.body_text()))
    }

    /// A path whose parameters do not parse, with what the endpoint accepts.
    pub fn invalid_path(rejection: PathRejection, accepted: &str) -> Self {
        Self::bad_request("invalid_path", format!("{}; expected {accepted}", rejection.body_text()))
    }

    pub fn body(&self) -> serde_json::Value {
        let mut error = self.details.clone().unwrap_or_default();
        error.insert("code".to_owned(), self.code.into());
        error.insert("message".to_owned(), self.message.clone().into());
        json!({ "error": error })
    }
}

/// The message alone (the code travels beside it wherever the error is sent).
impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// The HTTP status a view error is answered with; the command line's offline view commands
/// map it to the same exit code as the answer would give.
pub fn view_error_status(e: &ViewError) -> StatusCode {
    ApiError::from_view(e).status
}

impl From<ViewError> for ApiError {
    fn from(e: ViewError) -> Self {
        Self::from_view(&e)
    }
}

impl ApiError {
    fn from_view(e: &ViewError) -> Self {
        let message = e.to_string();
        match e {
            // 504: the server gave up waiting for what the read needs; the read may be
            // retried as it is (the records are in the log). The positions say how far it is.
            ViewError::ReadBehind { view, version, waited_ms, behind } => {
                let behind: Vec<serde_json::Value> = behind
                    .iter()
                    .map(|b| json!({"topic": b.topic, "partition": b.partition, "offset": b.offset, "position": b.position}))
                    .collect();
                Self::new(StatusCode::GATEWAY_TIMEOUT, "view_behind", message)
                    .with_details(json!({"view": view, "version": version, "waited_ms": waited_ms, "behind": behind}))
            }
            ViewError::NotAnInput { .. } => Self::bad_request("not_an_input", message),
            ViewError::OffsetNotWritten { .. } => Self::bad_request("offset_not_written", message),
            ViewError::UnknownView(_) => Self::not_found("unknown_view", message),
            ViewError::UnknownVersion { .. } => Self::not_found("unknown_version", message),
            ViewError::NotReady { .. } => Self::new(StatusCode::SERVICE_UNAVAILABLE, "view_not_ready", message),
            ViewError::ShuttingDown => Self::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", message),
            // A failed write closed the store: it is reopened (and reads answer again) once
            // a full disk has room.
            e if e.is_store_unavailable() => Self::new(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", message),
            ViewError::VersionNotCaughtUp { .. } => Self::new(StatusCode::CONFLICT, "version_not_caught_up", message),
            ViewError::RetireActive { .. } => Self::new(StatusCode::CONFLICT, "version_serving", message),
            ViewError::AsOf { .. } => Self::new(StatusCode::UNPROCESSABLE_ENTITY, "as_of_unavailable", message),
            ViewError::AsOfInvalid { .. } => Self::bad_request("invalid_as_of", message),
            ViewError::Log(e) => Self::from_log(e),
            _ => Self::new(StatusCode::INTERNAL_SERVER_ERROR, "view_error", message),
        }
    }
}

impl From<LogError> for ApiError {
    fn from(e: LogError) -> Self {
        Self::from_log(&e)
    }
}

impl ApiError {
    fn from_log(e: &LogError) -> Self {
        let message = e.to_string();
        match e {
            LogError::UnknownTopic(_) => Self::not_found("unknown_topic", message),
            LogError::UnknownPartition { .. } => Self::not_found("unknown_partition", message),
            LogError::TopicExists(_) => Self::new(StatusCode::CONFLICT, "topic_exists", message),
            LogError::InvalidTopicName { .. } => Self::bad_request("invalid_topic_name", message),
            LogError::InvalidPartitions { .. } => Self::bad_request("invalid_partitions", message),
            LogError::UnknownConfig(_) => Self::bad_request("unknown_config", message),
            LogError::InvalidConfig { .. } => Self::bad_request("invalid_config", message),
            LogError::MissingKey { .. } => Self::bad_request("missing_key", message),
            LogError::MessageTooLarge { .. } => Self::new(StatusCode::PAYLOAD_TOO_LARGE, "records_too_large", message),
            LogError::Poisoned { .. } => Self::new(StatusCode::SERVICE_UNAVAILABLE, "storage_failed", message),
            // The topic's own config forbids it (Kafka: POLICY_VIOLATION); altering it allows it.
            LogError::DeleteRecordsPolicy { .. } => Self::new(StatusCode::CONFLICT, "policy_violation", message),
            _ => Self::new(StatusCode::INTERNAL_SERVER_ERROR, "log_error", message),
        }
    }
}
