#!/usr/bin/env python3
"""kappa torture suite: crashes, faults and lost responses against the real `kappa serve`
binary with real clients (confluent-kafka / librdkafka), then an anomaly checker over
everything the clients were told and everything that can be read back.

    python3 tests/torture/torture.py SCENARIO [--seed N] [--soak] [--kappa PATH]

Scenarios: d1 d3 d4 d5 t1 t2 t3 t4 f2 (see tests/torture/README.md). Exit status 0 when the
run finished with zero anomalies; otherwise 1, with the anomaly report, the replay
command and the kept work directory (broker and client logs, data directory)."""
import argparse
import faulthandler
import signal
import importlib
import os
import random
import sys
import traceback

sys.dont_write_bytecode = True  # keep the source tree clean
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kappa_torture.harness import TortureError  # noqa: E402
from kappa_torture.run import Run  # noqa: E402

SCENARIOS = ["selftest", "d1", "d3", "d4", "d5", "t1", "t2", "t3", "t4", "f2"]


def default_kappa():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(root, "target"))
    return os.path.join(target, "debug", "kappa")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenario", choices=SCENARIOS)
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    ap.add_argument("--soak", action="store_true", default=os.environ.get("SOAK") == "1",
                    help="the long tier (default when SOAK=1)")
    ap.add_argument("--kappa", default=os.environ.get("KAPPA_BIN") or default_kappa(), help="the kappa binary")
    ap.add_argument("--scale", type=float, default=None, help="override the tier's main count (cycles, transactions, ...)")
    ap.add_argument("--workdir", default=None, help="where data and logs go (default: a new temp dir)")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds before the watchdog dumps stacks and fails the run (default 900, soak 14400)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory even when the run passes")
    args = ap.parse_args()
    if args.scale is not None and args.scale == int(args.scale):
        args.scale = int(args.scale)
    seed = args.seed if args.seed is not None else int(os.environ.get("TORTURE_SEED") or random.SystemRandom().randrange(1 << 31))
    if args.scenario != "selftest" and not os.path.exists(args.kappa):
        print(f"kappa binary not found at {args.kappa} (build it: cargo build -p kappa)", file=sys.stderr)
        return 2
    # `kill -USR1 <pid>` prints every thread's stack (for a run that seems stuck).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    r = Run(args.scenario, seed, args.soak, args.kappa, workdir=args.workdir, keep=args.keep, scale=args.scale)
    r.start_watchdog(args.timeout or (14400 if args.soak else 900))
    r.say(f"seed {seed}, tier {'soak' if args.soak else 'pr'}, work directory {r.workdir}")
    module = importlib.import_module(f"kappa_torture.{args.scenario}")
    error = None
    try:
        module.run(r)
    except (AssertionError, TortureError) as e:
        error = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    except Exception as e:
        error = f"unexpected {type(e).__name__}: {e}"
        traceback.print_exc()
    return r.finish(error)


if __name__ == "__main__":
    sys.exit(main())
