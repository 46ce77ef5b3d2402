//! A simulated file system with fault injection and power-loss semantics (see the trait's
//! durability contract in the parent module).
