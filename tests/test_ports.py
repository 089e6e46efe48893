"""loadtests/ports.py: ports for the servers tests and load tools start."""

from __future__ import annotations

import socket

from loadtests import ports
from loadtests.ports import _ephemeral_start, free_port


def test_ports_are_distinct_bindable_and_below_the_ephemeral_range():
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50  # two calls in a row never share a port
    assert all(1024 < port < _ephemeral_start() for port in ports)  # no outgoing connection takes these
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))


def test_a_port_something_listens_on_is_skipped(monkeypatch):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        taken = listener.getsockname()[1]
        listener.listen()
        real = ports._choose
        picks = iter([taken])
        # the first pick is the port in use: free_port must try again rather than hand it out
        monkeypatch.setattr(ports, "_choose", type("Chooser", (), {
            "randrange": staticmethod(lambda low, high: next(picks, None) or real.randrange(low, high))})())
        port = ports.free_port()
        assert port != taken
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
