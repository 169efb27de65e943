"""Which sockets this process's descendants (a Ray cluster it started) listen on."""

from __future__ import annotations

LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def listening_sockets() -> list[tuple[str, int, str]]:
    """(address, port, command line) of every listening socket of this process's descendants."""
    import psutil

    cmd = {}
    for p in psutil.Process().children(recursive=True):
        try:
            cmd[p.pid] = " ".join(p.cmdline())
        except psutil.Error:
            pass
    return [(c.laddr.ip, c.laddr.port, cmd[c.pid]) for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.pid in cmd]
