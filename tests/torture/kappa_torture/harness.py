"""Runs the real `kappa serve`: free ports, its own data directory, kill -9, clean stop,
restart, libfiu fault injection (fiu-run / fiu-ctrl) and a tmpfs data directory."""
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time

READY_TIMEOUT_S = 30


class TortureError(Exception):
    """The harness itself could not do what the scenario asked (not an anomaly)."""


def free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def have(command):
    return shutil.which(command) is not None


class Broker:
    """One `kappa serve` process on `data_dir`, restartable on the same ports.

    With `behind_proxy` the broker listens on 127.0.0.2:P but advertises 127.0.0.1, so
    every connection a client makes after bootstrap goes to 127.0.0.1:P, where a
    `proxy.Proxy` listens and forwards to the broker: no metadata rewriting needed.
    """

    def __init__(self, kappa, data_dir, workdir, behind_proxy=False, extra_args=()):
        self.kappa = kappa
        self.data_dir = data_dir
        self.workdir = workdir
        self.behind_proxy = behind_proxy
        self.listen_host = "127.0.0.2" if behind_proxy else "127.0.0.1"
        self.port = free_port(self.listen_host)
        if behind_proxy:
            # The proxy needs the same port free on 127.0.0.1.
            while not _port_free("127.0.0.1", self.port):
                self.port = free_port(self.listen_host)
        self.http_port = free_port()
        # TORTURE_KAPPA_ARGS adds flags to every start, e.g. "--sync interval:100" to check
        # that a scenario catches a broker acknowledging before fsync.
        self.extra_args = list(extra_args) + shlex.split(os.environ.get("TORTURE_KAPPA_ARGS", ""))
        self.log_path = os.path.join(workdir, "kappa.log")
        self.proc = None
        self.starts = 0
        self.fiu = False
        self.fiu_ctrl_base = os.path.join(workdir, "fiu-ctrl")

    # -- addresses -------------------------------------------------------------------
    def upstream(self):
        """Where the broker really listens."""
        return (self.listen_host, self.port)

    def bootstrap(self):
        """What clients are given: the broker itself, or the proxy in front of it."""
        return f"127.0.0.1:{self.port}"

    # -- lifecycle -------------------------------------------------------------------
    def start(self, fiu_commands=None, wait=True):
        """Starts kappa; with `fiu_commands` (a list, possibly empty) under `fiu-run -x`
        so failure points can be switched on at start or later with `fiu_ctrl`."""
        if self.proc is not None:
            raise TortureError("start: broker already running")
        argv = [
            self.kappa, "serve",
            "--data-dir", self.data_dir,
            "--kafka-listen", f"{self.listen_host}:{self.port}",
            "--http-listen", f"127.0.0.1:{self.http_port}",
        ]
        if self.behind_proxy:
            argv += ["--advertised-host", "127.0.0.1"]
        argv += self.extra_args
        self.fiu = fiu_commands is not None
        if self.fiu:
            if not have("fiu-run"):
                raise TortureError("fiu-run not found: install Debian's fiu-utils (scripts/test-all does)")
            pre = ["fiu-run", "-x", "-f", self.fiu_ctrl_base]
            for c in fiu_commands:
                pre += ["-c", c]
            argv = pre + argv
        self.starts += 1
        with open(self.log_path, "a") as log:
            log.write(f"\n===== start {self.starts}: {' '.join(argv)}\n")
            log.flush()
            env = dict(os.environ, RUST_LOG=os.environ.get("KAPPA_LOG", "info"))
            self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log, env=env, start_new_session=True)
        if wait:
            self.wait_ready()

    def wait_ready(self):
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                raise TortureError(f"kappa serve exited with {code} before listening; see {self.log_path}:\n{self.log_tail()}")
            try:
                with socket.create_connection(self.upstream(), timeout=1):
                    return
            except OSError:
                time.sleep(0.01)
        raise TortureError(f"kappa serve did not listen within {READY_TIMEOUT_S} s; see {self.log_path}")

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def pid(self):
        return self.proc.pid

    def kill9(self):
        """SIGKILL: a crash. Returns the exit status it had if it had already died."""
        if self.proc is None:
            return None
        already = self.proc.poll()
        if already is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None
        self._remove_fifos()
        return already

    def stop(self, timeout=30):
        """SIGTERM and wait: the clean shutdown path. Returns the exit code."""
        if self.proc is None:
            return None
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise TortureError(f"kappa did not stop within {timeout} s of SIGTERM; see {self.log_path}")
        self.proc = None
        self._remove_fifos()
        return code

    def restart(self, fiu_commands=None):
        self.kill9()
        self.start(fiu_commands=fiu_commands)

    def fiu_ctrl(self, *commands):
        """Enables or disables failure points in the running broker (needs start(fiu_commands=...))."""
        if not self.fiu:
            raise TortureError("fiu_ctrl on a broker not started under fiu-run")
        argv = ["fiu-ctrl", "-f", self.fiu_ctrl_base]
        for c in commands:
            argv += ["-c", c]
        argv.append(str(self.proc.pid))
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        if r.returncode != 0:
            raise TortureError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")

    def _remove_fifos(self):
        for suffix in ("in", "out"):
            for name in os.listdir(self.workdir):
                if name.startswith("fiu-ctrl-") and name.endswith("." + suffix):
                    try:
                        os.unlink(os.path.join(self.workdir, name))
                    except OSError:
                        pass

    # -- diagnostics -----------------------------------------------------------------
    def log_text(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def log_tail(self, lines=40):
        return "\n".join(self.log_text().splitlines()[-lines:])

    def log_count(self, needle):
        return self.log_text().count(needle)

    def recoveries(self):
        """(starts recovered after an unclean stop, of them with a truncated tail,
        total bytes truncated), from the broker's "recovered data directory" lines."""
        unclean = truncating = truncated = 0
        for m in re.finditer(r"recovered data directory .*?truncated_bytes=(\d+) clean=(\w+)", self.log_text()):
            if m.group(2) == "false":
                unclean += 1
            if int(m.group(1)) > 0:
                truncating += 1
                truncated += int(m.group(1))
        return unclean, truncating, truncated


def _port_free(host, port):
    with socket.socket() as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


class Tmpfs:
    """A tmpfs of `size` mounted on `path` (needs CAP_SYS_ADMIN). `mount()` says why not."""

    def __init__(self, path, size):
        self.path = path
        self.size = size
        self.mounted = False

    def mount(self):
        os.makedirs(self.path, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs", self.path],
                           capture_output=True, text=True)
        if r.returncode != 0:
            return (r.stderr or r.stdout).strip() or f"mount exited {r.returncode}"
        self.mounted = True
        return None

    def free_bytes(self):
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def umount(self):
        if self.mounted:
            subprocess.run(["umount", "-l", self.path], capture_output=True)
            self.mounted = False
