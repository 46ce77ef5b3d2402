//! The `kappa` binary: `kappa serve` runs the log, the Kafka broker and the view engine in
//! one process. Applications with their own views build the same binary with
//! [`kappa::App`] (see `examples/channels.rs`).

/// Many small, short-lived allocations (records, view state): glibc's malloc and free were
/// ~17 % of a view rebuild's profile (BENCHMARKS.md, run 10).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    kappa::App::new().main()
}
