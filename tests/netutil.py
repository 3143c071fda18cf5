"""Real processes for network tests: start a console script, wait for it, stop it.

Generic on purpose (verifier, node and bootstrap tests share it): a child's stdout and
stderr go to files, never pipes (a chatty child cannot block on a full pipe), every
wait has a deadline, and `spawned` kills the child on teardown whatever happened.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

BIN = Path(sys.executable).parent
TESTS = Path(__file__).resolve().parent


def script(name: str) -> str:
    """Path of a console script installed next to this Python (e.g. specedge-verifier)."""
    path = BIN / name
    if not path.exists():
        raise FileNotFoundError(f"{path} not installed: run `pip install -e . --no-deps`")
    return str(path)


class Proc:
    """A child process with its output collected in files under `workdir`."""

    def __init__(self, args: Sequence[str], workdir: str | os.PathLike[str], name: str = "proc",
                 env: dict[str, str] | None = None) -> None:
        self.args = [str(a) for a in args]
        self.name = name
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.stdout_path = self.workdir / f"{name}.stdout"
        self.stderr_path = self.workdir / f"{name}.stderr"
        full_env = dict(os.environ)
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        full_env.update(env or {})
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.popen = subprocess.Popen(self.args, stdout=out, stderr=err, env=full_env,
                                          stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def describe(self, tail: int = 3000) -> str:
        """Exit status and output tails, for assertion messages."""
        return (f"{self.name} (pid {self.pid}, rc {self.popen.poll()}): {' '.join(self.args)}\n"
                f"--- stdout ---\n{self.stdout()[-tail:]}\n--- stderr ---\n{self.stderr()[-tail:]}")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_for(self, check: Callable[[], object], timeout: float, what: str) -> object:
        """Poll `check` until it returns something truthy; fail if the child dies first."""
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if not self.alive():
                value = check()  # it may have finished just now
                if value:
                    return value
                raise AssertionError(f"{what}: process exited\n{self.describe()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: timed out after {timeout:g} s\n{self.describe()}")
            time.sleep(0.05)

    def wait_for_file(self, path: str | os.PathLike[str], timeout: float = 60.0) -> list[str]:
        """Lines of a file the child writes atomically (e.g. --announce-file)."""
        p = Path(path)

        def read() -> list[str] | None:
            if p.exists():
                lines = [x for x in p.read_text().splitlines() if x.strip()]
                return lines or None
            return None

        return self.wait_for(read, timeout, f"waiting for {p}")  # type: ignore[return-value]

    def wait_for_output(self, text: str, timeout: float = 60.0) -> None:
        self.wait_for(lambda: text in self.stdout(), timeout, f"waiting for {text!r} on stdout")

    def send_signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        """Exit status; AssertionError if it does not exit within `timeout`."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"did not exit within {timeout:g} s\n{self.describe()}") from None

    def kill(self) -> None:
        """SIGKILL the child and anything it started in its session; reap it."""
        if self.alive():
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout`."""
        self.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None


@contextmanager
def spawned(args: Sequence[str], workdir: str | os.PathLike[str] | None = None,
            name: str = "proc", env: dict[str, str] | None = None) -> Iterator[Proc]:
    """A child process that is killed on leaving the block, whatever happened."""
    tmp = None
    if workdir is None:
        tmp = tempfile.mkdtemp(prefix=f"{name}-")
        workdir = tmp
    proc = Proc(args, workdir, name, env)
    try:
        yield proc
    finally:
        proc.kill()


def python_script(path: str | os.PathLike[str], *args: object) -> list[str]:
    """Argument list running a Python file with this interpreter."""
    return [sys.executable, str(path), *(str(a) for a in args)]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for servers that need a fixed port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (loopback)
        return resp.read().decode()


def wait_until(check: Callable[[], object], timeout: float, what: str,
               interval: float = 0.1) -> object:
    """Poll `check` until truthy; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what}: not true after {timeout:g} s (last value {last!r})")


def prometheus_values(text: str) -> dict[str, float]:
    """Sample name (with labels) -> value from Prometheus text exposition."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                continue
    return out
