//! Fault injection: fsync EIO, disk full (simulated and, when the machine allows mounting
//! a tmpfs, real).
//!
//! The contract under test (see health.rs): after a failed fsync (or a failed write) the
//! data directory is poisoned. The failing append gets the I/O error; every later append
//! gets [`LogError::Poisoned`], even once the cause is gone (the kernel may have dropped
//! dirty pages, so a retried fsync could acknowledge lost data). Reads keep working. A
//! restart (a new [`Log`] on the same directory) recovers: the log then holds the
//! acknowledged prefix, plus possibly the failed batch, whole, and appends work again.
//!
//! A full disk is the exception: a segment write refused with ENOSPC is cut off and only
//! that append fails; appends resume once space is freed, without a restart.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use common::*;
use kappa_log::clock::ManualClock;
use kappa_log::io::sim::{SimFs, Trigger};
use kappa_log::io::{RealFs, Storage};
use kappa_log::{Log, LogError};

const ENOSPC: i32 = 28;

fn open_on(fs: Arc<dyn Storage>, dir: &Path, clock: &ManualClock) -> Log {
    Log::open(dir, options(fs, clock)).expect("open log").0
}

fn is_os_error(e: &LogError, code: i32) -> bool {
    matches!(e, LogError::Io { source, .. } if source.raw_os_error() == Some(code))
}

fn is_poisoned(e: &LogError) -> bool {
    matches!(e, LogError::Poisoned { .. })
}

/// Appends `n` acknowledged batches to partition 0 of `topic`, returning (base offset, bytes).
fn append_acked(log: &Log, topic: &str, tag: &str, n: usize) -> Vec<(i64, Vec<u8>)> {
    let p = log.partition(topic, 0).unwrap();
    (0..n)
        .map(|i| {
            let sent = batch(&format!("{tag}{i}"), 1 + i % 5, T0);
            (p.append(sent.clone()).expect("append before the fault").base_offset, sent)
        })
        .collect()
}

/// After a restart: acknowledged prefix (plus possibly `unacked`, whole), then appends
/// work and continue the offsets.
fn check_restarted(log: &Log, topic: &str, acked: &[(i64, Vec<u8>)], unacked: &[Vec<u8>]) -> usize {
    let p = log.partition(topic, 0).unwrap();
    let survived = assert_acked_prefix(&p, acked, unacked);
    let end = p.log_end_offset();
    let after = p.append(batch("after-restart", 2, T0)).expect("appends work after a restart");
    assert_eq!(after.base_offset, end, "offsets continue after the restart");
    survived
}

#[test]
fn fsync_eio_poisons_appends_until_restart() {
    let dir = Path::new("/data");
    let fs = SimFs::new();
    let clock = ManualClock::new(T0);
    let log = open_on(Arc::new(fs.clone()), dir, &clock);
    log.create_topic("t", 1, &overrides(&[("segment.bytes", "2048")])).unwrap();
    let acked = append_acked(&log, "t", "a", 12);
    let p = log.partition("t", 0).unwrap();
    let high_watermark = p.high_watermark();

    fs.fail_sync_data(Some(Trigger::Nth(1)));
    let unacked = batch("lost", 3, T0);
    let err = p.append(unacked.clone()).expect_err("the append whose fsync failed");
    // The failed fsync poisons the directory before the waiting append wakes up, so it
    // reports Poisoned carrying the EIO as its cause.
    assert!(is_poisoned(&err) && err.to_string().contains("os error 5"), "in-flight append: {err}");
    fs.fail_sync_data(None);
    for i in 0..3 {
        let err = p.append(batch(&format!("later{i}"), 1, T0)).expect_err("poisoned");
        assert!(is_poisoned(&err), "later appends fail as poisoned even with the fault gone: {err}");
    }
    assert!(log.health().is_poisoned());
    assert!(log.create_topic("u", 1, &overrides(&[])).is_err_and(|e| is_poisoned(&e)));

    // Reads keep working and never show the batch whose fsync failed.
    assert_eq!(p.high_watermark(), high_watermark);
    assert_acked_prefix(&p, &acked, &[]);
    assert!(log.close().is_err_and(|e| is_poisoned(&e)), "close reports the poisoning");
    drop((p, log));

    let log = open_on(Arc::new(fs.clone()), dir, &clock);
    check_restarted(&log, "t", &acked, &[unacked]);
}

#[test]
fn fsync_eio_then_power_loss_keeps_the_acknowledged_prefix() {
    let (mut kept, mut lost) = (0, 0);
    for seed in 0..100 {
        let dir = Path::new("/data");
        let fs = SimFs::new();
        let clock = ManualClock::new(T0);
        let log = open_on(Arc::new(fs.clone()), dir, &clock);
        log.create_topic("t", 1, &overrides(&[("segment.bytes", "2048")])).unwrap();
        let acked = append_acked(&log, "t", "a", 1 + seed as usize % 20);
        fs.fail_sync_data(Some(Trigger::Nth(1)));
        let unacked = batch("lost", 3, T0);
        assert!(log.partition("t", 0).unwrap().append(unacked.clone()).is_err());
        drop(log);
        fs.crash(seed);
        let log = open_on(Arc::new(fs.clone()), dir, &clock);
        match check_restarted(&log, "t", &acked, &[unacked]) {
            0 => lost += 1,
            _ => kept += 1,
        }
    }
    assert!(kept > 0 && lost > 0, "the seeds should both keep and lose the unacknowledged batch");
}

/// Group commit: several appenders share fsyncs and one fails. No append is acknowledged
/// without a successful fsync covering it, whatever the interleaving.
#[test]
fn fsync_eio_under_group_commit() {
    for seed in 0..20 {
        let dir = Path::new("/data");
        let fs = SimFs::new();
        let clock = ManualClock::new(T0);
        let log = open_on(Arc::new(fs.clone()), dir, &clock);
        log.create_topic("t", 1, &overrides(&[])).unwrap();
        let p = log.partition("t", 0).unwrap();
        fs.fail_sync_data(Some(Trigger::Nth(3 + seed % 5)));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let p = p.clone();
                std::thread::spawn(move || {
                    (0..10)
                        .map(|i| {
                            let sent = batch(&format!("{t}-{i}"), 2, T0);
                            (p.append(sent.clone()), sent)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let results: Vec<_> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
        let mut acked: Vec<(i64, Vec<u8>)> =
            results.iter().filter_map(|(r, sent)| Some((r.as_ref().ok()?.base_offset, sent.clone()))).collect();
        acked.sort_by_key(|(base, _)| *base);
        let unacked: Vec<Vec<u8>> = results.iter().filter(|(r, _)| r.is_err()).map(|(_, s)| s.clone()).collect();
        assert!(!unacked.is_empty(), "seed {seed}: the fault fired");
        drop((p, log));
        fs.crash(seed);
        let log = open_on(Arc::new(fs.clone()), dir, &clock);
        // Acknowledged batches form a prefix: nothing after a failed fsync is acknowledged.
        check_restarted(&log, "t", &acked, &unacked);
    }
}

/// Fills the disk with appends to "t" after writing a "filler" topic, then checks the
/// contract: ENOSPC on the append that does not fit, and on every one after it while the
/// disk stays full, without poisoning the directory (a write refused for lack of space
/// loses nothing the kernel had accepted); reads keep working; once space is freed appends
/// resume, continuing the offsets, with no restart; a restart then recovers exactly what
/// was acknowledged (the refused batches were cut off, none of them survives).
fn disk_full_scenario(fs: Arc<dyn Storage>, dir: &Path, filler_batches: usize, limit_space: impl FnOnce()) {
    let clock = ManualClock::new(T0);
    let log = open_on(fs.clone(), dir, &clock);
    // Segments larger than the disk: the scenario never rolls (a full disk while rolling a
    // segment still poisons the directory; see health.rs).
    log.create_topic("t", 1, &overrides(&[("segment.bytes", "8388608")])).unwrap();
    log.create_topic("filler", 1, &overrides(&[])).unwrap();
    append_acked(&log, "filler", "f", filler_batches);
    limit_space();

    let p = log.partition("t", 0).unwrap();
    let mut acked = Vec::new();
    let err = loop {
        assert!(acked.len() < 1_000_000, "the disk never filled up");
        let sent = batch(&format!("t{}", acked.len()), 20, T0);
        match p.append(sent.clone()) {
            Ok(outcome) => acked.push((outcome.base_offset, sent)),
            Err(e) => break e,
        }
    };
    assert!(acked.len() > 3, "some appends succeed before the disk is full");
    assert!(is_os_error(&err, ENOSPC), "the append that hit the full disk gets ENOSPC: {err}");
    for i in 0..3 {
        let e = p.append(batch(&format!("full{i}"), 20, T0)).expect_err("still full");
        assert!(is_os_error(&e, ENOSPC), "later appends on the full disk get ENOSPC, not Poisoned: {e}");
    }
    assert!(!log.health().is_poisoned(), "a full disk does not poison the directory");
    assert_acked_prefix(&p, &acked, &[]);

    // Freeing space is enough: appends resume without a restart and continue the offsets.
    log.delete_topic("filler").expect("deleting a topic frees space");
    let end = p.log_end_offset();
    assert_eq!(end, acked.last().map(|(base, sent)| base + batch_records(sent).len() as i64).unwrap());
    for i in 0..5 {
        let sent = batch(&format!("resumed{i}"), 20, T0);
        let outcome = p.append(sent.clone()).expect("appends resume once space is freed");
        acked.push((outcome.base_offset, sent));
    }
    assert_eq!(acked[acked.len() - 5].0, end, "offsets continue where the acknowledged records ended");
    assert_acked_prefix(&p, &acked, &[]);
    drop((p, log));

    let log = open_on(fs, dir, &clock);
    assert!(log.topic("filler").is_err());
    check_restarted(&log, "t", &acked, &[]);
    // There is room again: many more appends fit.
    let more = append_acked(&log, "t", "more", 20);
    assert_eq!(more.len(), 20);
}

#[test]
fn disk_full_on_simfs() {
    let fs = SimFs::new();
    let limit = fs.clone();
    disk_full_scenario(Arc::new(fs.clone()), Path::new("/data"), 50, move || {
        limit.set_capacity(Some(limit.used_bytes() + 40_000));
    });
}

#[test]
fn restart_on_a_still_full_disk_recovers_and_reports_enospc_again() {
    let fs = SimFs::new();
    let clock = ManualClock::new(T0);
    let dir = Path::new("/data");
    let log = open_on(Arc::new(fs.clone()), dir, &clock);
    log.create_topic("t", 1, &overrides(&[("segment.bytes", "4096")])).unwrap();
    let acked = append_acked(&log, "t", "a", 10);
    fs.set_capacity(Some(fs.used_bytes() + 100));
    let unacked = batch("big", 20, T0);
    let p = log.partition("t", 0).unwrap();
    assert!(p.append(unacked.clone()).is_err_and(|e| is_os_error(&e, ENOSPC)));
    drop((p, log));

    // Recovery needs no new space.
    let log = open_on(Arc::new(fs.clone()), dir, &clock);
    let p = log.partition("t", 0).unwrap();
    assert_acked_prefix(&p, &acked, std::slice::from_ref(&unacked));
    assert!(p.append(unacked.clone()).is_err_and(|e| is_os_error(&e, ENOSPC)));
    drop((p, log));

    fs.set_capacity(None);
    let log = open_on(Arc::new(fs.clone()), dir, &clock);
    check_restarted(&log, "t", &acked, &[unacked]);
}

/// A tmpfs mounted for the test, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` on a fresh directory, or says why it could not.
    fn mount(size: &str) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        match output.status.success() {
            true => Ok(Self { dir }),
            false => Err(String::from_utf8_lossy(&output.stderr).trim().to_owned()),
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

#[test]
fn disk_full_on_a_real_tmpfs() {
    let tmpfs = match Tmpfs::mount("2m") {
        Ok(tmpfs) => tmpfs,
        Err(reason) => {
            eprintln!("skipping disk_full_on_a_real_tmpfs: cannot mount a tmpfs ({reason})");
            return;
        }
    };
    // About 1 MiB of filler, so deleting it frees room for much more.
    disk_full_scenario(Arc::new(RealFs), &tmpfs.path(), 2_500, || {});
}

#[test]
fn a_failed_directory_fsync_while_deleting_old_segments_poisons_the_directory() {
    let dir = Path::new("/data");
    let fs = SimFs::new();
    let clock = ManualClock::new(T0);
    let log = open_on(Arc::new(fs.clone()), dir, &clock);
    log.create_topic("t", 1, &overrides(&[("segment.bytes", "1024"), ("retention.ms", "1000")])).unwrap();
    append_acked(&log, "t", "a", 20);
    let p = log.partition("t", 0).unwrap();
    assert!(p.segment_count() > 1);
    clock.advance(10_000);
    fs.fail_sync_dir(Some(Trigger::Nth(1)));
    assert!(log.enforce_retention().is_err(), "retention reports the failed fsync");
    fs.fail_sync_dir(None);
    let err = p.append(batch("later", 1, T0 + 10_000)).expect_err("an fsync failed: no append is acknowledged");
    assert!(is_poisoned(&err), "{err}");
}
