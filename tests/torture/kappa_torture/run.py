"""One scenario run: seed, tier, work directory, the broker, statistics and the verdict."""
import faulthandler
import json
import os
import random
import shlex
import shutil
import sys
import tempfile
import threading
import time

from .checker import Anomalies
from .clients import client_logger
from .harness import Broker

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "torture.py")


class Run:
    def __init__(self, scenario, seed, soak, kappa, workdir=None, keep=False, scale=None):
        self.scenario = scenario
        self.seed = seed
        self.soak = soak
        self.kappa = os.path.abspath(kappa)
        self.scale = scale
        self.rng = random.Random(seed)
        self.keep = keep
        self.workdir = workdir or tempfile.mkdtemp(prefix=f"kappa-torture-{scenario}-")
        os.makedirs(self.workdir, exist_ok=True)
        self.anomalies = Anomalies()
        self.stats = {}
        self.notes = []
        self.brokers = []
        self.started = time.monotonic()
        self.logger = client_logger(os.path.join(self.workdir, "clients.log"))

    def start_watchdog(self, seconds):
        """If the run is still going after `seconds` (a hung client call, a broker that
        stopped answering), print every thread's stack and how to replay, then exit."""
        def fire():
            print(f"WATCHDOG: {self.scenario} still running after {seconds} s; thread stacks:", file=sys.stderr, flush=True)
            faulthandler.dump_traceback(all_threads=True)
            print(f"replay: {self.replay_command()}", file=sys.stderr)
            print(f"work directory kept: {self.workdir}", file=sys.stderr, flush=True)
            for b in self.brokers:
                try:
                    b.kill9()
                except Exception:
                    pass
            os._exit(3)
        t = threading.Timer(seconds, fire)
        t.daemon = True
        t.start()

    def tier(self, pr, soak):
        """The PR-tier or SOAK-tier figure, unless --scale overrides it."""
        if self.scale is not None:
            return type(pr)(self.scale)
        return soak if self.soak else pr

    def broker(self, data_dir=None, **kw):
        b = Broker(self.kappa, data_dir or os.path.join(self.workdir, "data"), self.workdir, **kw)
        self.brokers.append(b)
        return b

    def note(self, text):
        self.notes.append(text)
        self.say(text)

    def say(self, text):
        print(f"[{self.scenario} {time.monotonic() - self.started:7.1f}s] {text}", flush=True)

    def replay_command(self):
        parts = ["python3", SCRIPT, self.scenario, "--seed", str(self.seed), "--kappa", self.kappa]
        if self.soak:
            parts.append("--soak")
        if self.scale is not None:
            parts += ["--scale", str(self.scale)]
        return " ".join(shlex.quote(p) for p in parts)

    def finish(self, error=None):
        """Prints the summary; returns the process exit code."""
        for b in self.brokers:
            try:
                b.kill9()
            except Exception:
                pass
        self.stats["wall_s"] = round(time.monotonic() - self.started, 1)
        summary = {"scenario": self.scenario, "seed": self.seed, "tier": "soak" if self.soak else "pr",
                   **self.stats, "anomalies": self.anomalies.counts}
        print(self.anomalies.report())
        print("RESULT " + json.dumps(summary, sort_keys=False))
        failed = error is not None or self.anomalies.total() > 0
        if failed:
            if error is not None:
                print(f"FAILED: {error}", file=sys.stderr)
            else:
                print(f"FAILED: {self.anomalies.total()} anomalies", file=sys.stderr)
            print(f"replay: {self.replay_command()}", file=sys.stderr)
            print(f"work directory kept: {self.workdir} (kappa.log, clients.log, data/)", file=sys.stderr)
            for b in self.brokers:
                print(f"--- last lines of {b.log_path}:\n{b.log_tail(30)}", file=sys.stderr)
            return 1
        if not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return 0
