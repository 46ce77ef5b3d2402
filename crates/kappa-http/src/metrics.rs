//! `GET /metrics`: Prometheus text exposition, computed at scrape time from the log, the
//! view engine and the live layer. A handful of gauges read when scraped need no metrics
//! registry, so this writes the text format directly.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use crate::AppState;

/// Counters the HTTP layer keeps, and the application's extra metrics.
#[derive(Default)]
pub struct Metrics {
    pub records_produced: AtomicU64,
    pub extra: Option<crate::ExtraMetrics>,
}

fn escape(label: &str) -> String {
    label.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

pub async fn render(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, rows: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (labels, value) in rows {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    };
    let mut ends = Vec::new();
    let mut starts = Vec::new();
    let mut sizes = Vec::new();
    for topic in state.log.topics() {
        for p in topic.partitions() {
            let labels = format!("topic=\"{}\",partition=\"{}\"", escape(topic.name()), p.index());
            ends.push((labels.clone(), p.log_end_offset() as f64));
            starts.push((labels.clone(), p.log_start_offset() as f64));
            sizes.push((labels, p.size_bytes() as f64));
        }
    }
    gauge("kappa_partition_end_offset", "Next offset to be written.", ends);
    gauge("kappa_partition_start_offset", "First offset still stored.", starts);
    gauge("kappa_partition_size_bytes", "Bytes stored.", sizes);
    let mut lag = Vec::new();
    let mut applied = Vec::new();
    let mut rate = Vec::new();
    let mut progress = Vec::new();
    let mut serving = Vec::new();
    let mut failed = Vec::new();
    let mut restarting = Vec::new();
    for view in state.engine.list() {
        for v in &view.versions {
            let labels = format!("view=\"{}\",version=\"{}\"", escape(&view.name), v.version);
            let status = &v.status;
            let total = status.events_applied + status.lag();
            lag.push((labels.clone(), status.lag() as f64));
            applied.push((labels.clone(), status.events_applied as f64));
            rate.push((labels.clone(), status.rate_per_second));
            progress.push((labels.clone(), if total == 0 { 1.0 } else { status.events_applied as f64 / total as f64 }));
            serving.push((labels.clone(), f64::from(u8::from(v.serving))));
            failed.push((labels.clone(), f64::from(u8::from(matches!(status.phase, kappa_views::Phase::Failed(_))))));
            restarting
                .push((labels, f64::from(u8::from(matches!(status.phase, kappa_views::Phase::Restarting { .. })))));
        }
    }
    gauge("kappa_view_lag_records", "Input records not yet applied by the view version.", lag);
    gauge("kappa_view_events_applied", "Events applied by the view version since it was created.", applied);
    gauge("kappa_view_rate_per_second", "Input offsets applied per second recently.", rate);
    gauge("kappa_view_rebuild_progress", "Applied / (applied + lag), 1 when caught up.", progress);
    gauge("kappa_view_serving", "1 for the version that serves reads.", serving);
    gauge("kappa_view_failed", "1 when the version stopped on an error.", failed);
    gauge(
        "kappa_view_restarting",
        "1 while the version waits to start again by itself after an error that may pass (a full disk).",
        restarting,
    );
    let subscriptions = state.hubs.subscriptions.load(Ordering::Relaxed) as f64;
    gauge("kappa_subscriptions", "Open WebSocket and SSE subscriptions.", vec![(String::new(), subscriptions)]);
    let produced = state.metrics.records_produced.load(Ordering::Relaxed) as f64;
    let _ = writeln!(
        out,
        "# HELP kappa_http_records_produced_total Records appended over HTTP.\n# TYPE kappa_http_records_produced_total counter\nkappa_http_records_produced_total {produced}"
    );
    if let Some(extra) = &state.metrics.extra {
        extra(&mut out);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
