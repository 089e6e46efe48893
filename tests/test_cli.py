"""The real `kiln` command in a subprocess: help texts, serve, infer, models, and signal handling."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tritonclient.grpc as triton

from conftest import REPO_ROOT
from loadtests.ports import free_port

READY_TIMEOUT_S = 30
EXIT_TIMEOUT_S = 15


def kiln_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def kiln(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "server", *args], cwd=cwd, env=kiln_env(),
        capture_output=True, text=True, timeout=timeout,
    )


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Serve:
    """`kiln serve ...` as a child process, its output in a file (a pipe could fill up and block it)."""

    def __init__(self, args: list[str], cwd: Path, grpc_port: int) -> None:
        self.url = f"127.0.0.1:{grpc_port}"
        self.log_path = cwd / f"serve-{grpc_port}.log"
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server", "serve", *args], cwd=cwd, env=kiln_env(),
            stdout=self._log, stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def wait_ready(self) -> None:
        client = triton.InferenceServerClient(self.url)
        deadline = time.monotonic() + READY_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    pytest.fail(f"kiln serve exited with {self.process.returncode}:\n{self.output()}")
                try:
                    if client.is_server_ready(client_timeout=1):
                        return
                except Exception:  # not listening yet
                    pass
                time.sleep(0.1)
        finally:
            client.close()
        pytest.fail(f"kiln serve not ready within {READY_TIMEOUT_S} s:\n{self.output()}")

    def stop(self, signum: int) -> int:
        self.process.send_signal(signum)
        try:
            return self.process.wait(EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"kiln serve did not exit within {EXIT_TIMEOUT_S} s of {signal.Signals(signum).name}:\n"
                        f"{self.output()}")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._log.close()


@pytest.fixture
def workdir(bundled_repo) -> Path:
    """A temporary directory holding model_repo/ (a copy of the bundled one)."""
    return bundled_repo.parent


@pytest.fixture
def serve_factory():
    running: list[Serve] = []

    def start(args: list[str], cwd: Path, grpc_port: int) -> Serve:
        serve = Serve(args, cwd, grpc_port)
        running.append(serve)
        return serve

    yield start
    for serve in running:
        serve.close()


def run_concurrently(commands: dict[str, list[str]], cwd: Path, timeout: float = 60) -> dict[str, tuple[int, str, str]]:
    """Several short `kiln` commands at once (each pays the interpreter's start-up): name -> (rc, out, err)."""
    processes = {
        name: subprocess.Popen([sys.executable, "-m", "server", *args], cwd=cwd, env=kiln_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, args in commands.items()
    }
    results = {}
    for name, process in processes.items():
        out, err = process.communicate(timeout=timeout)
        results[name] = (process.returncode, out, err)
    return results


@pytest.fixture(scope="module")
def help_texts(tmp_path_factory):
    commands = {name: [name, "--help"] for name in ("serve", "infer", "models")}
    commands[""] = ["--help"]
    return run_concurrently(commands, tmp_path_factory.mktemp("help"))


@pytest.mark.parametrize(
    "command, words",
    [
        ("serve", ["--model-repository", "--grpc-port", "--metrics-port", "--model-control-mode", "--strict-readiness"]),
        ("infer", ["--url", "--input", "model"]),
        ("models", ["--url"]),
    ],
)
def test_help(help_texts, command, words):
    returncode, out, err = help_texts[command]
    assert returncode == 0, err
    assert out.startswith("usage: kiln " + command)
    description = out.split("\n\n")[1]
    assert len(description.split()) >= 5, f"'{command} --help' should say what it does:\n{out}"
    for word in words:
        assert word in out


def test_top_level_help_lists_the_commands(help_texts):
    returncode, out, err = help_texts[""]
    assert returncode == 0, err
    for command in ("serve", "infer", "models"):
        assert command in out


def test_serve_infer_models_and_sigterm(workdir, serve_factory):
    grpc_port, metrics_port = free_port(), free_port()
    serve = serve_factory(
        ["--model-repository", "model_repo", "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port)],
        workdir, grpc_port,
    )
    serve.wait_ready()
    url = serve.url

    result = kiln("infer", "mlp", "--url", url, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "model mlp version 1" in result.stdout
    assert "y float32 [1, 10]" in result.stdout, result.stdout

    result = kiln("models", "--url", url, cwd=workdir)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:] if line.strip()}
    assert rows["mlp"][1:3] == ["1", "READY"], result.stdout
    assert rows["digits"][1:3] == ["1", "READY"], result.stdout

    # a reader that goes away (`kiln infer mlp | head -1`) ends it quietly, without a traceback
    piped = subprocess.Popen(
        [sys.executable, "-m", "server", "infer", "mlp", "--url", url], cwd=workdir, env=kiln_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    piped.stdout.close()  # before the child can have printed: it is still importing
    err = piped.stderr.read().decode()
    assert piped.wait(timeout=60) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err, err

    result = kiln("infer", "nosuch", "--url", url, cwd=workdir)
    assert result.returncode != 0
    assert "NOT_FOUND" in result.stderr
    assert "nosuch" in result.stderr

    # metrics are served on the port asked for
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        assert b"kiln_" in response.read()

    started = time.monotonic()
    assert serve.stop(signal.SIGTERM) == 0, serve.output()
    assert time.monotonic() - started < EXIT_TIMEOUT_S
    assert port_is_free(grpc_port)


@pytest.mark.parametrize("flag, name", [([], "uvloop"), (["--event-loop", "asyncio"], "asyncio")])
def test_serve_says_which_event_loop_it_runs(workdir, serve_factory, flag, name):
    grpc_port = free_port()
    serve = serve_factory(["--grpc-port", str(grpc_port), "--metrics-port", "-1", *flag], workdir, grpc_port)
    serve.wait_ready()
    client = triton.InferenceServerClient(serve.url)
    try:
        assert client.is_model_ready("mlp")
    finally:
        client.close()
    assert serve.stop(signal.SIGTERM) == 0, serve.output()
    assert f"event loop: {name}" in serve.output()


def test_client_commands_against_no_server(tmp_path):
    url = f"127.0.0.1:{free_port()}"
    results = run_concurrently(
        {"infer": ["infer", "mlp", "--timeout", "5", "--url", url], "models": ["models", "--url", url]}, tmp_path
    )
    for name, (returncode, _, err) in results.items():
        assert returncode != 0, name
        assert "UNAVAILABLE" in err, err


def test_serve_default_repository_and_sigint(workdir, serve_factory):
    """`kiln serve` run where model_repo/ is serves it; SIGINT (Ctrl-C) drains and exits 0 like SIGTERM."""
    if port_is_free(8001) and port_is_free(8002):
        args, grpc_port = [], 8001  # the true no-argument form, on the default ports
    else:
        grpc_port = free_port()
        args = ["--grpc-port", str(grpc_port), "--metrics-port", str(free_port())]
    serve = serve_factory(args, workdir, grpc_port)
    serve.wait_ready()
    client = triton.InferenceServerClient(serve.url)
    try:
        assert client.is_model_ready("mlp")
        assert client.is_model_ready("digits")
    finally:
        client.close()
    started = time.monotonic()
    assert serve.stop(signal.SIGINT) == 0, serve.output()
    assert time.monotonic() - started < EXIT_TIMEOUT_S
    assert "Traceback" not in serve.output()


def test_serve_missing_repository_fails_clearly(tmp_path):
    result = kiln("serve", "--model-repository", "nowhere", "--grpc-port", str(free_port()),
                  "--metrics-port", "-1", cwd=tmp_path)
    assert result.returncode != 0
    assert "nowhere" in result.stderr
