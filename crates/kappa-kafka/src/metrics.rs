//! The worker's counters, written as Prometheus text at `/metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Metrics {
    /// Changelog records replayed by restores on assignment.
    pub restored_records: AtomicU64,
    /// Restores finished (one per view per assigned partition).
    pub restores: AtomicU64,
    /// Input partitions this worker owns now.
    pub owned_partitions: AtomicI64,
    /// Input partitions stopped by a view error.
    pub failed_partitions: AtomicI64,
    /// Transactions committed / aborted.
    pub transactions_committed: AtomicU64,
    pub transactions_aborted: AtomicU64,
    /// Input records applied (per view: counted once per view).
    pub events_applied: AtomicU64,
    /// Changelog records read by the read replica.
    pub replica_records: AtomicU64,
    /// Repartition partitions purged (one per partition per DeleteRecords).
    pub repartition_purges: AtomicU64,
}

impl Metrics {
    pub fn render(&self) -> String {
        let mut out = String::new();
        let counters: [(&str, &str, u64); 7] = [
            (
                "kappa_work_restored_records_total",
                "changelog records replayed by restores",
                self.restored_records.load(Ordering::Relaxed),
            ),
            (
                "kappa_work_restores_total",
                "restores finished (view x partition)",
                self.restores.load(Ordering::Relaxed),
            ),
            (
                "kappa_work_transactions_committed_total",
                "steps committed",
                self.transactions_committed.load(Ordering::Relaxed),
            ),
            (
                "kappa_work_transactions_aborted_total",
                "steps aborted",
                self.transactions_aborted.load(Ordering::Relaxed),
            ),
            (
                "kappa_work_events_applied_total",
                "input records applied, per view",
                self.events_applied.load(Ordering::Relaxed),
            ),
            (
                "kappa_work_replica_records_total",
                "changelog records read by the read replica",
                self.replica_records.load(Ordering::Relaxed),
            ),
            (
                "kappa_work_repartition_purges_total",
                "repartition partitions purged of what stage 2 committed",
                self.repartition_purges.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
        }
        let gauges = [
            ("kappa_work_owned_partitions", "input partitions owned", self.owned_partitions.load(Ordering::Relaxed)),
            (
                "kappa_work_failed_partitions",
                "input partitions stopped by a view error",
                self.failed_partitions.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
        }
        out
    }
}
