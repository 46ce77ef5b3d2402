#!/usr/bin/env bash
# CI fuzzing (issue 8, F1), called by scripts/test-all: each target replays its committed
# corpus and is then fuzzed for 60 s (SOAK=1: 10^7 executions, or FUZZ_RUNS). Fails on any
# crash, panic, abort, per-input timeout (10 s) or RSS above 2 GiB, and prints where the
# input that did it was saved. New inputs go to a temp directory, never into the checkout.
#
# Built without a sanitizer (`--sanitizer none`): the ASan build of these targets takes
# ~27 min cold on 2 cores (fuzz/README.md), the plain one ~2.5 min. The targets assert
# "never panics or aborts" and kappa is safe Rust, so what ASan would add is checking the
# dependencies' unsafe code; run `cargo fuzz run <target>` (ASan) by hand for that.
set -euo pipefail
cd "$(dirname "$0")"

# cargo-fuzz passes nightly-only -Z flags; stable rustc accepts them with this.
export RUSTC_BOOTSTRAP=1
# A build directory of its own (different flags from the workspace build), reused across runs.
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-${CARGO_TARGET_DIR:-/var/tmp/kappa-target}-fuzz}"

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    cargo install --locked cargo-fuzz --version 0.13.2
fi

targets=(batch_decode recovery_scan request_decode subscription_parse)
cargo fuzz build --sanitizer none

if [ "${SOAK:-}" = 1 ]; then
    limit=("-runs=${FUZZ_RUNS:-10000000}")
else
    limit=("-max_total_time=${FUZZ_SECONDS:-60}")
fi

work="$(mktemp -d)"
status=0
for t in "${targets[@]}"; do
    mkdir -p "$work/$t/new" "$work/$t/artifacts"
    echo "fuzzing $t (${limit[*]})"
    if ! cargo fuzz run --sanitizer none "$t" "$work/$t/new" "corpus/$t" -- \
        "${limit[@]}" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="$work/$t/artifacts/" 2>"$work/$t/log"; then
        status=1
        tail -n 60 "$work/$t/log"
        echo "FUZZ FAILURE in $t: input(s) saved in $work/$t/artifacts/:" >&2
        ls -l "$work/$t/artifacts/" >&2 || true
        echo "replay: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none $t <artifact>;" \
            "copy it into fuzz/corpus/$t/ to keep it as a regression input" >&2
    else
        grep -E "^stat::number_of_executed_units|^Done" "$work/$t/log" || true
    fi
done
[ "$status" = 0 ] && rm -rf "$work"
exit "$status"
