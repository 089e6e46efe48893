"""Shared fixtures: a real kiln server on a free loopback port, and small ONNX models built on the fly."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from server import eventloop
from server.app import KilnServer, ServerSettings
from server.repository import ControlMode

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLED_REPO = REPO_ROOT / "model_repo"


def require_tool(name: str) -> str:
    """Path of a system tool; skip without it, or fail when KILN_REQUIRE_TOOLS is set (CI)."""
    path = shutil.which(name)
    if path is None:
        message = f"system tool '{name}' is not installed"
        if os.environ.get("KILN_REQUIRE_TOOLS"):
            pytest.fail(message + " (KILN_REQUIRE_TOOLS is set)")
        pytest.skip(message)
    return path


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM a server the test started, SIGKILL it if it is still there after 30 s."""
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class RunningServer:
    """KilnServer on its own event loop in a background thread: a real grpc.aio server on a real port."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.loop = eventloop.loop_factory(settings.event_loop)()  # uvloop, as `kiln serve` runs
        self.server = KilnServer(settings)
        self._thread = threading.Thread(target=self.loop.run_forever, name="kiln-test-server", daemon=True)
        self._thread.start()
        self.call(self.server.start())

    def call(self, coro, timeout: float = 60.0):
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def url(self) -> str:
        return f"{self.settings.host}:{self.server.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.settings.host}:{self.server.metrics_port}/metrics"

    @property
    def repository(self):
        return self.server.repository

    def stop(self) -> None:
        try:
            self.call(self.server.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


@pytest.fixture
def start_server():
    """Factory: start_server(repo_path, **ServerSettings fields) -> RunningServer, stopped at teardown."""
    servers: list[RunningServer] = []

    def start(model_repository: Path, **overrides) -> RunningServer:
        settings = ServerSettings(
            model_repository=Path(model_repository), grpc_port=0, metrics_port=0, grace_period_s=5.0, **overrides
        )
        if isinstance(settings.control_mode, str):
            settings.control_mode = ControlMode(settings.control_mode)
        running = RunningServer(settings)
        servers.append(running)
        return running

    yield start
    for running in servers:
        running.stop()


@pytest.fixture
def bundled_repo(tmp_path) -> Path:
    """A copy of the committed models of model_repo/ (mlp, digits), without generated ones."""
    target = tmp_path / "model_repo"
    target.mkdir()
    for name in ("mlp", "digits"):
        shutil.copytree(BUNDLED_REPO / name, target / name)
    return target


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("module")
