//! kappa patch: a budget for the memory a decode may build, per thread.
//!
//! One byte on the wire can become ~50-100 bytes in memory (an array element, an unknown
//! tagged field), so a 100 MiB frame of 2-byte elements decodes into gigabytes, and an
//! allocation failure aborts the process. Inside [`with_decode_budget`], every array and
//! tagged-field map is charged its announced size before it is built, and a decode that
//! would exceed the budget fails instead. Outside it, decoding is unbounded as upstream.

use std::cell::Cell;

use anyhow::{bail, Result};

/// What one unknown tagged field costs in memory: a `(i32, Bytes)` B-tree entry.
const TAGGED_FIELD_BYTES: usize = 64;
/// What a tagged-field map's first entry costs: a whole B-tree leaf node (408 bytes measured
/// for `BTreeMap<i32, Bytes>`, rounded up).
const TAGGED_FIELD_MAP_NODE_BYTES: usize = 448;

thread_local! {
    static BYTES_LEFT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Runs `decode` allowing arrays and tagged fields of at most `bytes_max` bytes in memory,
/// all together.
pub fn with_decode_budget<R>(bytes_max: usize, decode: impl FnOnce() -> R) -> R {
    struct Restore(Option<usize>);
    impl Drop for Restore {
        fn drop(&mut self) {
            BYTES_LEFT.with(|left| left.set(self.0));
        }
    }
    let _restore = Restore(BYTES_LEFT.with(|left| left.replace(Some(bytes_max))));
    decode()
}

/// Charges `count` elements of `element_bytes` each, before they are decoded (also for
/// hand-written decoders running inside [`with_decode_budget`]).
pub fn charge(count: usize, element_bytes: usize) -> Result<()> {
    BYTES_LEFT.with(|left| {
        let Some(bytes_left) = left.get() else { return Ok(()) };
        let cost = count.saturating_mul(element_bytes.max(1));
        if cost > bytes_left {
            bail!("{count} elements need {cost} bytes in memory, more than the {bytes_left} bytes the decode budget has left");
        }
        left.set(Some(bytes_left - cost));
        Ok(())
    })
}

/// Charges `count` unknown tagged fields, before they are decoded: the map's first B-tree
/// node (allocated whole for the first entry) and each entry.
pub(crate) fn charge_tagged_fields(count: u32) -> Result<()> {
    if count == 0 {
        return Ok(());
    }
    charge(1, TAGGED_FIELD_MAP_NODE_BYTES)?;
    charge(count as usize, TAGGED_FIELD_BYTES)
}
