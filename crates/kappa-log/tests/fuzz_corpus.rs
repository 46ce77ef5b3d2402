//! Replays the fuzz corpora (`fuzz/corpus/<target>/`) through the functions the fuzz
//! targets call, so CI checks them on stable Rust without cargo-fuzz. Also replays a few
//! generated seeds: valid batches of every codec, truncated and bit-flipped copies.

use std::path::{Path, PathBuf};

use kappa_log::batch::Compression;
use kappa_log::records::{BatchBuilder, ControlType, NewRecord};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus").join(target)
}

/// The corpus files of `target`, sorted. A missing or empty corpus directory fails the test:
/// replaying nothing would pass without checking anything.
fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = corpus_dir(target);
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("fuzz corpus {}: {e}", dir.display()));
    let mut files: Vec<(PathBuf, Vec<u8>)> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "fuzz corpus {} holds no files: nothing to replay", dir.display());
    files
}

/// Valid batches of every codec, a transactional batch, a control marker, and damaged copies.
fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for codec in [Compression::None, Compression::Gzip, Compression::Snappy, Compression::Lz4, Compression::Zstd] {
        let mut builder = BatchBuilder::new().compression(codec).producer(7, 0, 0);
        for i in 0..5 {
            let record = NewRecord::new(Some(format!("k{i}").as_bytes()), Some(&[i as u8; 40]), 1_700_000_000_000 + i)
                .header("h", Some(b"x"));
            builder.push(record);
        }
        let batch = builder.build();
        let name = format!("{codec:?}").to_lowercase();
        let mut truncated = batch.clone();
        truncated.truncate(batch.len() * 2 / 3);
        let mut flipped = batch.clone();
        let at = batch.len() - 3;
        flipped[at] ^= 0x10;
        let mut two = batch.clone();
        let mut second = batch.clone();
        second[0..8].copy_from_slice(&5i64.to_be_bytes());
        two.extend_from_slice(&second);
        out.push((format!("valid-{name}"), batch));
        out.push((format!("truncated-{name}"), truncated));
        out.push((format!("bitflip-{name}"), flipped));
        out.push((format!("two-batches-{name}"), two));
    }
    let txn = BatchBuilder::new()
        .producer(9, 1, 0)
        .transactional(true)
        .record(NewRecord::new(Some(b"k"), Some(b"v"), 1_700_000_000_000))
        .build();
    let mut marker = BatchBuilder::control_marker(9, 1, ControlType::Commit, 0, 1_700_000_000_001);
    marker.base_offset = 1;
    let mut txn_log = txn.clone();
    txn_log.extend_from_slice(&marker.build());
    out.push(("transactional".into(), txn));
    out.push(("txn-then-commit-marker".into(), txn_log));
    out.push(("empty".into(), Vec::new()));
    out.push(("zeros-100".into(), vec![0; 100]));
    out
}

#[test]
fn batch_decode_corpus_never_panics() {
    let files = corpus("batch_decode");
    for (path, bytes) in &files {
        eprintln!("{}", path.display());
        kappa_log::fuzzing::batch_decode(bytes);
    }
    for (name, bytes) in seeds() {
        eprintln!("seed {name}");
        kappa_log::fuzzing::batch_decode(&bytes);
    }
}

#[test]
fn recovery_scan_corpus_never_panics() {
    let files = corpus("recovery_scan");
    for (path, bytes) in &files {
        eprintln!("{}", path.display());
        kappa_log::fuzzing::recovery_scan(bytes);
    }
    for (name, bytes) in seeds() {
        eprintln!("seed {name}");
        kappa_log::fuzzing::recovery_scan(&bytes);
    }
}

/// Writes the generated seeds into both corpus directories:
/// `cargo test -p kappa-log --test fuzz_corpus -- --ignored write_seed_corpus`.
#[test]
#[ignore = "writes files into fuzz/corpus: run by hand to regenerate the seeds"]
fn write_seed_corpus() {
    for target in ["batch_decode", "recovery_scan"] {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in seeds() {
            std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
        }
    }
}
