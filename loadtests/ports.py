"""A free loopback port for the servers the load tools and tests start.

A port the kernel hands out for bind(0) lies in its ephemeral range, where every outgoing
connection also takes its local port: in the second between choosing a port and the server
binding it, a client elsewhere could take it, and two calls in a row may even get the same
just-closed port back (CI saw "Address already in use" from a metrics port). So the port is
chosen below the ephemeral range, checked free by binding it, and never handed out twice by
one process.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

__all__ = ["free_port"]

_LOWEST = 10000
_handed_out: set[int] = set()  # ports this process was given: each is meant for one server
_choose = random.SystemRandom()  # not the global generator, which a test may have seeded


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    high = _ephemeral_start()
    for _ in range(200 if high > _LOWEST else 0):
        port = _choose.randrange(_LOWEST, high)
        if port not in _handed_out and _bindable(port):
            _handed_out.add(port)
            return port
    with socket.socket() as s:  # no room below the ephemeral range: let the kernel choose
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _handed_out.add(port)
    return port
