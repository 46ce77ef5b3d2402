//! The `kappa` binary: `kappa serve` runs the log, the Kafka broker and the view engine in
//! one process. Applications with their own views build the same binary with
//! [`kappa::App`] (see `examples/channels.rs`).

fn main() -> anyhow::Result<()> {
    kappa::App::new().main()
}
