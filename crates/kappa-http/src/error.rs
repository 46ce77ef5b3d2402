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
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
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
        json!({"error": {"code": self.code, "message": self.message}})
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

impl From<ViewError> for ApiError {
    fn from(e: ViewError) -> Self {
        let message = e.to_string();
        match e {
            ViewError::UnknownView(_) => Self::not_found("unknown_view", message),
            ViewError::UnknownVersion { .. } => Self::not_found("unknown_version", message),
            ViewError::NotReady { .. } => Self::new(StatusCode::SERVICE_UNAVAILABLE, "view_not_ready", message),
            ViewError::VersionNotCaughtUp { .. } => Self::new(StatusCode::CONFLICT, "version_not_caught_up", message),
            ViewError::RetireActive { .. } => Self::new(StatusCode::CONFLICT, "version_serving", message),
            ViewError::AsOf { .. } => Self::new(StatusCode::UNPROCESSABLE_ENTITY, "as_of_unavailable", message),
            ViewError::AsOfInvalid { .. } => Self::bad_request("invalid_as_of", message),
            ViewError::Log(e) => e.into(),
            _ => Self::new(StatusCode::INTERNAL_SERVER_ERROR, "view_error", message),
        }
    }
}

impl From<LogError> for ApiError {
    fn from(e: LogError) -> Self {
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
