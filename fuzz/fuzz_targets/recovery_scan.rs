#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kappa_log::fuzzing::recovery_scan(data);
});
