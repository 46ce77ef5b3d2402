//! The allocator of kappa's binaries (`kappa`, the examples): mimalloc, configured once at
//! start-up by [`configure`].
//!
//! Why mimalloc: view state is many small, short-lived allocations; glibc's malloc and free
//! were ~17 % of a view rebuild's profile (BENCHMARKS.md, run 10). Why configured: mimalloc
//! returns freed memory to the OS 1 s after it was freed, and a view step frees its changes
//! every few seconds only to allocate as many again at the next step, so each step paid a
//! page fault (and the kernel zeroing a page) per page of its changes: ~70 000 faults and
//! 6–12 % of a 10 M-event rebuild's CPU time (BENCHMARKS.md, run 15). The environment
//! variable `MIMALLOC_PURGE_DELAY`, when set, still wins.

pub use mimalloc::MiMalloc;

/// How long freed memory stays mapped before it is returned to the OS: jemalloc's default
/// decay time, longer than the gap between two view steps.
pub const FREED_MEMORY_RETURN_DELAY_MS: i64 = 10_000;

/// mimalloc's `mi_option_purge_delay`: its position in `mi_option_e` (mimalloc.h, v3),
/// which `libmimalloc-sys` does not name. A test checks it holds the documented default.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Sets kappa's allocator options, unless `MIMALLOC_PURGE_DELAY` sets it (mimalloc reads
/// its environment when the process loads, so setting a default afterwards would do
/// nothing). Harmless when the global allocator is another one.
pub fn configure() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: setting an option is a plain store in mimalloc's option table; any thread,
    // any time (the option is read when freed memory is considered for purging).
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, FREED_MEMORY_RETURN_DELAY_MS as _) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_purge_delay_option_is_the_one_configure_sets() {
        // SAFETY: reads mimalloc's option table.
        let get = || unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        let before = get();
        configure();
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            assert_eq!(get(), before, "the environment's setting wins");
            return;
        }
        // mimalloc v3's default purge delay (options.c): the index names that option.
        assert_eq!(before, 1000, "option {MI_OPTION_PURGE_DELAY} is not mimalloc's purge_delay");
        assert_eq!(get(), FREED_MEMORY_RETURN_DELAY_MS as std::ffi::c_long);
    }
}
