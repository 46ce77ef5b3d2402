//! `/v1/groups`: consumer groups — list, describe (members, assignments, committed offsets
//! and lag), and commit offsets from outside the group (`kappa group reset-offsets`,
//! `kappa consume --group`).
//!
//! This crate does not know the Kafka broker: the application passes a [`GroupAdmin`]
//! over its group coordinator, the way `/metrics` gets the broker's counters.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::AppState;
use crate::error::ApiError;

/// Offsets in one commit request.
pub const COMMIT_OFFSETS_MAX: usize = 10_000;

/// One group in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSummary {
    pub group: String,
    /// Kafka's names: Empty, PreparingRebalance, CompletingRebalance, Stable.
    pub state: String,
    pub protocol_type: String,
    pub members: usize,
}

/// One member of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMember {
    pub member_id: String,
    pub instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    /// (topic, partitions) assigned by the group's leader, when the assignment is a
    /// consumer-protocol one.
    pub assignment: Vec<(String, Vec<i32>)>,
}

/// A group in detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupDetails {
    pub group: String,
    pub state: String,
    pub protocol: String,
    pub members: Vec<GroupMember>,
    /// (topic, partition, committed offset)
    pub offsets: Vec<(String, i32, i64)>,
}

/// Why a commit was refused.
#[derive(Debug, thiserror::Error)]
pub enum GroupAdminError {
    #[error(
        "group {group} has {members} active member(s); stop its consumers first (they would overwrite these offsets with their own commits), or force it"
    )]
    Active { group: String, members: usize },
    /// The group id is not one the coordinator takes (too long).
    #[error("{0}")]
    InvalidGroupId(String),
    #[error("{0}")]
    Failed(String),
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The group coordinator, as the HTTP API needs it.
pub trait GroupAdmin: Send + Sync {
    fn list(&self) -> Vec<GroupSummary>;
    /// Refuses a group id the coordinator would not take (too long): describing or
    /// committing for it answers 400 `invalid_group_id` before anything is read or written.
    fn check_group_id(&self, group: &str) -> Result<(), GroupAdminError>;
    /// None when the coordinator knows nothing of the group (no members, no offsets).
    fn describe(&self, group: &str) -> Option<GroupDetails>;
    /// Commits (topic, partition, offset)s for the group outside any generation, durably;
    /// refused with [`GroupAdminError::Active`] while it has members, unless `force`.
    fn commit(
        &self,
        group: &str,
        offsets: Vec<(String, i32, i64)>,
        force: bool,
    ) -> BoxFuture<'_, Result<(), GroupAdminError>>;
}

fn admin(state: &AppState) -> Result<&Arc<dyn GroupAdmin>, ApiError> {
    state.groups.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "groups_unavailable",
            "this server runs without a Kafka broker, so it has no consumer groups",
        )
    })
}

/// `GET /v1/groups`
pub async fn list(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let groups: Vec<Value> = admin(&state)?
        .list()
        .into_iter()
        .map(|g| json!({"group": g.group, "state": g.state, "protocol_type": g.protocol_type, "members": g.members}))
        .collect();
    Ok(Json(json!({"groups": groups})))
}

/// `GET /v1/groups/{group}`: members with their assignments; committed offsets with the
/// partition's end offset and the lag.
pub async fn describe(State(state): State<Arc<AppState>>, Path(group): Path<String>) -> Result<Json<Value>, ApiError> {
    let admin = admin(&state)?;
    // Checked only for a group the coordinator does not know: one stored with a longer id
    // before the check existed stays readable.
    let Some(details) = admin.describe(&group) else {
        admin.check_group_id(&group).map_err(invalid_group_id)?;
        return Err(ApiError::not_found(
            "unknown_group",
            format!("no group {group}: it has no members and no committed offsets"),
        ));
    };
    let members: Vec<Value> = details
        .members
        .iter()
        .map(|m| {
            let assignment: Vec<Value> =
                m.assignment.iter().map(|(t, ps)| json!({"topic": t, "partitions": ps})).collect();
            json!({"member_id": m.member_id, "instance_id": m.instance_id, "client_id": m.client_id,
                   "client_host": m.client_host, "assignment": assignment})
        })
        .collect();
    let offsets: Vec<Value> = details
        .offsets
        .iter()
        .map(|(topic, partition, committed)| {
            let end = state.log.partition(topic, *partition).map(|p| p.high_watermark()).ok();
            json!({"topic": topic, "partition": partition, "committed": committed, "end_offset": end,
                   "lag": end.map(|end| (end - committed).max(0))})
        })
        .collect();
    Ok(Json(json!({"group": details.group, "state": details.state, "protocol": details.protocol,
                   "members": members, "offsets": offsets})))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommitRequest {
    offsets: Vec<CommitOffset>,
    #[serde(default)]
    force: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommitOffset {
    topic: String,
    partition: i32,
    offset: i64,
}

fn invalid_group_id(e: GroupAdminError) -> ApiError {
    ApiError::bad_request("invalid_group_id", e.to_string())
}

/// `POST /v1/groups/{group}/offsets` `{"offsets": [{"topic","partition","offset"}], "force"?}`:
/// all or nothing; 409 `group_active` while the group has members (unless `force`).
pub async fn commit(
    State(state): State<Arc<AppState>>,
    Path(group): Path<String>,
    request: Result<Json<CommitRequest>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let request = crate::topics::body(request, "{\"offsets\": [{\"topic\", \"partition\", \"offset\"}], \"force\"?}")?;
    let admin = admin(&state)?;
    admin.check_group_id(&group).map_err(invalid_group_id)?;
    if request.offsets.is_empty() || request.offsets.len() > COMMIT_OFFSETS_MAX {
        return Err(ApiError::bad_request(
            "invalid_offsets",
            format!("commit 1 to {COMMIT_OFFSETS_MAX} offsets per request"),
        ));
    }
    for o in &request.offsets {
        state.log.partition(&o.topic, o.partition)?;
        if o.offset < 0 {
            return Err(ApiError::bad_request(
                "invalid_offsets",
                format!("{}/{}: offset {} is negative", o.topic, o.partition, o.offset),
            ));
        }
    }
    let offsets: Vec<(String, i32, i64)> =
        request.offsets.into_iter().map(|o| (o.topic, o.partition, o.offset)).collect();
    admin.commit(&group, offsets.clone(), request.force).await.map_err(|e| match e {
        GroupAdminError::Active { .. } => ApiError::new(StatusCode::CONFLICT, "group_active", e.to_string()),
        GroupAdminError::InvalidGroupId(_) => invalid_group_id(e),
        GroupAdminError::Failed(message) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "commit_failed", message),
    })?;
    let committed: Vec<Value> =
        offsets.iter().map(|(t, p, o)| json!({"topic": t, "partition": p, "offset": o})).collect();
    Ok(Json(json!({"group": group, "committed": committed})))
}
