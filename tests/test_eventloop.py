"""The server's event loop: uvloop by default, asyncio's own on request, a clear error when uvloop is missing."""

import asyncio
import builtins

import pytest
import uvloop

from server import eventloop


async def _loop_type() -> type:
    return type(asyncio.get_running_loop())


@pytest.mark.parametrize("choice", ["auto", "uvloop"])
def test_auto_and_uvloop_run_on_uvloop(choice):
    assert eventloop.resolve(choice) == "uvloop"
    assert issubclass(eventloop.run(_loop_type(), choice), uvloop.Loop)


def test_asyncio_choice_runs_on_the_standard_loop():
    assert eventloop.resolve("asyncio") == "asyncio"
    loop_type = eventloop.run(_loop_type(), "asyncio")
    assert not issubclass(loop_type, uvloop.Loop)
    assert issubclass(loop_type, asyncio.BaseEventLoop)


def test_without_uvloop_auto_falls_back_and_uvloop_is_a_clear_error(monkeypatch):
    real_import = builtins.__import__

    def no_uvloop(name, *args, **kwargs):
        if name == "uvloop":
            raise ImportError("No module named 'uvloop'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_uvloop)
    assert eventloop.resolve("auto") == "asyncio"
    assert not issubclass(eventloop.run(_loop_type(), "auto"), uvloop.Loop)
    with pytest.raises(ValueError, match="uvloop is not installed"):
        eventloop.resolve("uvloop")


def test_unknown_choice_is_refused():
    with pytest.raises(ValueError, match="unknown event loop 'trio'"):
        eventloop.resolve("trio")


def test_the_test_servers_run_on_uvloop(start_server, bundled_repo):
    """Every in-process server of the suite runs on the loop `kiln serve` uses."""
    server = start_server(bundled_repo)
    assert isinstance(server.loop, uvloop.Loop)
