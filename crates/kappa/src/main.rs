//! The `kappa` binary: `kappa serve` runs the log, the Kafka broker and the view engine in
//! one process. Applications with their own views build the same binary with
//! [`kappa::App`] (see `examples/channels.rs`).

/// mimalloc, configured by `App::main` (`kappa::allocator`).
#[global_allocator]
static ALLOCATOR: kappa::allocator::MiMalloc = kappa::allocator::MiMalloc;

fn main() -> anyhow::Result<()> {
    kappa::App::new().main()
}
