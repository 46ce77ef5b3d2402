//! The `kappa` binary: `kappa serve` runs the log, the Kafka broker and the view engine in
//! one process. Applications with their own views build the same binary with
//! [`kappa::App`] (see `examples/channels.rs`).

/// Many small, short-lived allocations (records, view state): mimalloc beats glibc's malloc
/// by a wide margin here (BENCHMARKS.md, run 8).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    kappa::App::new().main()
}
