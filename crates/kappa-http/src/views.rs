//! `/v1/views`: list, describe, read keys (now or as of a past point), switch and retire
//! versions.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use std::time::Duration;

use kappa_views::{AsOf, InputPosition, Phase, READ_WAIT_MS_MAX, ScanLimit, VersionInfo, ViewInfo};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use crate::AppState;
use crate::error::ApiError;
use crate::live::Token;

/// A stored value as raw JSON. The view engine writes only JSON, but a changelog is a topic
/// Kafka clients can produce into (work mode writes changelogs that way), and the engine
/// restores its store from the changelog: a value may not be JSON.
pub(crate) fn raw(json: Vec<u8>) -> Result<Box<RawValue>, serde_json::Error> {
    let text = String::from_utf8(json).map_err(|e| serde::de::Error::custom(format!("not UTF-8: {e}")))?;
    RawValue::from_string(text)
}

/// [`raw`] for an answer about `key` of `view`: a value that is not JSON is a 500 naming it.
pub(crate) fn stored(json: Vec<u8>, view: &str, key: &str) -> Result<Box<RawValue>, ApiError> {
    raw(json).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "invalid_stored_value",
            format!(
                "the stored value of key '{key}' in view {view} is not JSON ({e}); something other than the view \
                 engine wrote it into the changelog: rebuild the view version"
            ),
        )
    })
}

/// A read's position as a resume token: `offset` in the changelog of `version`.
fn position(state: &AppState, view: &str, version: u32, offset: i64) -> Result<Token, ApiError> {
    let topic = kappa_views::changelog::topic_name(view, version);
    Ok(Token { version, changelog: Some(crate::live::changelog_of(state, &topic)?), offset })
}

/// How a version is doing, in the API's words.
fn version_status(version: &VersionInfo) -> &'static str {
    match &version.status.phase {
        // A serving version that stopped still answers reads, from where it stopped:
        // `serving` says so, the status says it no longer follows its inputs.
        Phase::Failed(_) => "failed",
        Phase::Restarting { .. } => "restarting",
        _ if version.serving => "serving",
        Phase::Restoring | Phase::Building => "building",
        Phase::Live => "ready",
        Phase::Stopped => "stopped",
    }
}

/// The error a version stopped on: for good (failed), or until it starts again by itself.
fn version_error(phase: &Phase) -> Option<&str> {
    match phase {
        Phase::Failed(reason) | Phase::Restarting { reason, .. } => Some(reason),
        _ => None,
    }
}

/// When a restarting version starts again, in milliseconds since the epoch.
fn retry_at_ms(phase: &Phase) -> Option<u128> {
    match phase {
        Phase::Restarting { retry_at, .. } => {
            retry_at.duration_since(std::time::UNIX_EPOCH).ok().map(|d| d.as_millis())
        }
        _ => None,
    }
}

pub(crate) fn view_json(view: &ViewInfo) -> Value {
    let versions: Vec<Value> = view
        .versions
        .iter()
        .map(|v| {
            let status = &v.status;
            let lag = status.lag();
            let applied = status.events_applied;
            let total = applied + lag;
            json!({
                "version": v.version,
                "status": version_status(v),
                "phase": status.phase.name(),
                "serving": v.serving,
                "running": v.running,
                "auto_switch": v.auto_switch,
                "events_applied": applied,
                "lag": lag,
                "progress": if total == 0 { 1.0 } else { applied as f64 / total as f64 },
                "rate_per_second": status.rate_per_second,
                "eta_seconds": status.eta_seconds(),
                "positions": status.positions,
                "changelog_topic": v.changelog_topic,
                "changelog_position": status.changelog_next,
                "error": version_error(&status.phase),
                "retry_at_ms": retry_at_ms(&status.phase),
            })
        })
        .collect();
    json!({"name": view.name, "active": view.active, "inputs": view.inputs, "versions": versions})
}

pub async fn list(State(state): State<Arc<AppState>>) -> Json<Value> {
    let views: Vec<Value> = state.engine.list().iter().map(view_json).collect();
    Json(json!({"views": views}))
}

pub async fn describe(State(state): State<Arc<AppState>>, Path(view): Path<String>) -> Result<Json<Value>, ApiError> {
    Ok(Json(view_json(&state.engine.describe(&view)?)))
}

/// What `GET /v1/views/{view}/keys/{key}` accepts.
const KEY_QUERY: &str = "?as_of=<an RFC 3339 time such as 2026-11-26T10:00:00Z, ms since the epoch, or topic/partition=offset,...>, or [?after_offsets=<topic>:<partition>:<offset>,...][&wait_ms=<ms>], or no query";

/// How long a read with `after_offsets` waits by default for the view to apply them.
pub const READ_WAIT_MS_DEFAULT: u64 = 5_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyQuery {
    as_of: Option<String>,
    after_offsets: Option<String>,
    wait_ms: Option<u64>,
}

/// Read-your-writes: `after_offsets` (offsets a produce answered, `topic:partition:offset`,
/// comma-separated) makes a read wait, up to `wait_ms`, until the serving version has applied
/// them (named so because a page's `after` is its cursor). The offsets to wait for and how
/// long, or None for a read that does not wait.
fn read_wait(
    after_offsets: Option<&str>,
    wait_ms: Option<u64>,
) -> Result<Option<(Vec<InputPosition>, Duration)>, ApiError> {
    let Some(list) = after_offsets else {
        return match wait_ms {
            Some(_) => Err(ApiError::bad_request(
                "invalid_wait_ms",
                "wait_ms says how long to wait for after_offsets: give after_offsets=<topic>:<partition>:<offset>,... too",
            )),
            None => Ok(None),
        };
    };
    let wait_ms = wait_ms.unwrap_or(READ_WAIT_MS_DEFAULT);
    if wait_ms > READ_WAIT_MS_MAX {
        return Err(ApiError::bad_request(
            "invalid_wait_ms",
            format!(
                "wait_ms={wait_ms}: wait_ms is at most {READ_WAIT_MS_MAX} (ms, READ_WAIT_MS_MAX); give less, and read again if the view is still behind"
            ),
        ));
    }
    let offsets = parse_after_offsets(list).map_err(|e| ApiError::bad_request("invalid_after_offsets", e))?;
    Ok(Some((offsets, Duration::from_millis(wait_ms))))
}

/// `topic:partition:offset,...` (topic names hold no `:` or `,`) as positions; an empty list
/// or a malformed item is an error saying what was expected.
pub fn parse_after_offsets(list: &str) -> Result<Vec<InputPosition>, String> {
    let expected = "expected after_offsets=<topic>:<partition>:<offset>,... with the partition and offset a produce answered (e.g. channels:0:41,channels:3:7)";
    let parse = |item: &str| -> Option<InputPosition> {
        let mut parts = item.rsplitn(3, ':');
        let offset = parts.next()?.parse::<i64>().ok().filter(|o| *o >= 0)?;
        let partition = parts.next()?.parse::<i32>().ok().filter(|p| *p >= 0)?;
        let topic = parts.next().filter(|t| !t.is_empty())?;
        Some(InputPosition { topic: topic.to_owned(), partition, offset })
    };
    list.split(',')
        .map(|item| parse(item.trim()).ok_or_else(|| format!("'{item}' is not an offset: {expected}")))
        .collect()
}

pub async fn get_key(
    State(state): State<Arc<AppState>>,
    Path((view, key)): Path<(String, String)>,
    query: Result<Query<KeyQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::invalid_query(e, KEY_QUERY))?;
    let wait = read_wait(query.after_offsets.as_deref(), query.wait_ms)?;
    if query.as_of.is_some() && wait.is_some() {
        return Err(ApiError::bad_request(
            "invalid_query",
            "as_of reads the past, after_offsets waits for recent writes: give one of them",
        ));
    }
    if let Some(at) = query.as_of {
        let at = AsOf::parse(&at).map_err(|e| ApiError::bad_request("invalid_as_of", e))?;
        let permit = state.try_as_of_permit()?;
        let engine = state.engine.clone();
        let wanted = key.clone();
        let view_name = view.clone();
        // The permit goes with the replay, which runs on even if the client goes away.
        let result = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            engine.as_of(&view_name, None, &at, Some(&wanted))
        })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))??;
        return match result.values.into_iter().next() {
            Some((key, value)) => {
                let value = stored(value, &view, &key)?;
                Ok(Json(json!({"key": key, "value": value, "position": result.positions})))
            }
            None => Err(ApiError::not_found(
                "unknown_key",
                format!("view {view} had no key '{key}' as of {:?}", result.positions),
            )),
        };
    }
    let read = match wait {
        Some((after, timeout)) => state.engine.get_after(&view, &key, &after, timeout).await?,
        None => state.engine.get(&view, &key)?,
    };
    let token = position(&state, &view, read.version, read.position)?;
    match read.value {
        Some(item) => {
            let value = stored(item.json, &view, &item.key)?;
            Ok(Json(json!({"key": item.key, "value": value, "position": token.to_string(), "version": read.version})))
        }
        None => Err(ApiError::not_found("unknown_key", format!("view {view} has no key '{key}'"))),
    }
}

/// What `GET /v1/views/{view}/keys` accepts.
/// A page of `GET /v1/views/{view}/keys` ends after the key whose value takes its keys and
/// values past this many bytes, with a cursor, even under `limit` keys: 1,000 values of
/// up to 4 MiB each would otherwise make one 4 GiB answer. A fixed limit.
pub const PAGE_BYTES_MAX: usize = 8 * 1024 * 1024;

const SCAN_QUERY: &str = "[?prefix=<key prefix>][&after=<the previous page's cursor>][&limit=<items, 1 to --http-page-items-max>][&after_offsets=<topic>:<partition>:<offset>,...][&wait_ms=<ms>]";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScanQuery {
    #[serde(default)]
    prefix: String,
    after: Option<String>,
    limit: Option<usize>,
    after_offsets: Option<String>,
    wait_ms: Option<u64>,
}

pub async fn scan(
    State(state): State<Arc<AppState>>,
    Path(view): Path<String>,
    query: Result<Query<ScanQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::invalid_query(e, SCAN_QUERY))?;
    let max = state.config.page_items_max;
    let limit = query.limit.unwrap_or(100);
    if limit == 0 || limit > max {
        return Err(ApiError::bad_request(
            "invalid_limit",
            format!(
                "limit must be between 1 and {max} (the server's --http-page-items-max); page with ?after=<cursor>"
            ),
        ));
    }
    let page_limit = ScanLimit { items: limit, bytes: PAGE_BYTES_MAX };
    let read = match read_wait(query.after_offsets.as_deref(), query.wait_ms)? {
        Some((after, timeout)) => {
            let page = (query.prefix.as_str(), query.after.as_deref(), page_limit);
            state.engine.scan_after(&view, page, &after, timeout).await?
        }
        None => state.engine.scan(&view, &query.prefix, query.after.as_deref(), page_limit)?,
    };
    let cursor = if read.value.more { read.value.items.last().map(|i| i.key.clone()) } else { None };
    let items = read
        .value
        .items
        .into_iter()
        .map(|i| Ok(json!({"value": stored(i.json, &view, &i.key)?, "key": i.key})))
        .collect::<Result<Vec<Value>, ApiError>>()?;
    let token = position(&state, &view, read.version, read.position)?;
    Ok(Json(json!({"items": items, "cursor": cursor, "position": token.to_string(), "version": read.version})))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchBody {
    version: u32,
    #[serde(default)]
    force: bool,
}

pub async fn switch(
    State(state): State<Arc<AppState>>,
    Path(view): Path<String>,
    body: Result<Json<SwitchBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(body) =
        body.map_err(|e| ApiError::bad_request("invalid_body", format!("expected {{\"version\": N}}: {e}")))?;
    state.engine.switch(&view, body.version, body.force)?;
    Ok(Json(json!({"view": view, "active": body.version})))
}

pub async fn retire(
    State(state): State<Arc<AppState>>,
    Path((view, version)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let version: u32 = version
        .parse()
        .map_err(|_| ApiError::bad_request("invalid_version", format!("'{version}' is not a version number")))?;
    let engine = state.engine.clone();
    let name = view.clone();
    tokio::task::spawn_blocking(move || engine.retire(&name, version))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))??;
    Ok(Json(json!({"view": view, "retired": version})))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::{Duration, UNIX_EPOCH};

    use kappa_views::RunnerStatus;

    use super::*;

    fn view_with(phase: Phase) -> Value {
        let status = RunnerStatus {
            phase,
            events_applied: 3,
            positions: BTreeMap::new(),
            ends: BTreeMap::new(),
            changelog_next: 4,
            rate_per_second: 0.0,
        };
        let version = VersionInfo {
            version: 2,
            serving: false,
            running: true,
            changelog_topic: "c".to_owned(),
            status,
            auto_switch: true,
        };
        let view = ViewInfo { name: "v".to_owned(), active: Some(1), inputs: Vec::new(), versions: vec![version] };
        view_json(&view)["versions"][0].clone()
    }

    #[test]
    fn a_restarting_version_shows_why_and_when_it_starts_again() {
        let retry_at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let version = view_with(Phase::Restarting { reason: "disk full".to_owned(), retry_at });
        assert_eq!(version["status"], "restarting", "{version}");
        assert_eq!(version["phase"], "restarting", "{version}");
        assert_eq!(version["error"], "disk full", "{version}");
        assert_eq!(version["retry_at_ms"], 1_700_000_000_123u64, "{version}");

        let failed = view_with(Phase::Failed("bad event".to_owned()));
        assert_eq!(
            (&failed["status"], &failed["error"], &failed["retry_at_ms"]),
            (&json!("failed"), &json!("bad event"), &Value::Null)
        );
    }
}
