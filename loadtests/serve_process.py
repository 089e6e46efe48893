"""The `kiln serve` processes the load tools measure: the command, starting one until it is ready,
stopping it (a graceful signal first, SIGKILL if it does not end)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterable

from loadtests.readiness import wait_ready

REPO_ROOT = Path(__file__).resolve().parents[1]


def serve_command(repo: Path, port: int, metrics_port: int = -1, *flags: str) -> list[str]:
    """`kiln serve` of this checkout on `repo` (metrics port -1: none), plus `flags`."""
    return [sys.executable, "-m", "server", "serve", "--model-repository", str(repo), "--grpc-port", str(port),
            "--metrics-port", str(metrics_port), *flags]


def start(command: list[str], log_path: Path, url: str, *, model: str | None = None, workers: int = 1,
          cwd: Path = REPO_ROOT, timeout: float = 120.0) -> subprocess.Popen:
    """Run `command` with its output in `log_path`; return once `url` is ready on every worker.
    A server that never gets ready is stopped, and the error shows the end of its log."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
    try:
        wait_ready(url, proc, model=model, workers=workers, timeout=timeout, log_path=log_path)
    except BaseException:
        stop(proc)
        raise
    return proc


def stop(proc: subprocess.Popen, timeout_s: float = 60.0, sig: int = signal.SIGTERM) -> int:
    """Send `sig` (a graceful stop), wait up to `timeout_s`, then SIGKILL: the exit code."""
    (code,) = stop_all([proc], timeout_s, sig)
    return code if code is not None else proc.returncode


def stop_all(procs: Iterable[subprocess.Popen], timeout_s: float = 60.0,
             sig: int = signal.SIGTERM) -> list[int | None]:
    """Signal every process still running at once (so they drain side by side), then wait for each:
    their exit codes, None for one that had already ended."""
    procs = list(procs)
    running = [proc for proc in procs if proc.poll() is None]
    for proc in running:
        proc.send_signal(sig)
    codes: list[int | None] = []
    for proc in procs:
        if proc not in running:
            codes.append(None)
            continue
        try:
            codes.append(proc.wait(timeout_s))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append(proc.wait())
    return codes
