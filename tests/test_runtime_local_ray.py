"""evomerge.runtime.local_ray: the Ray this process starts listens on 127.0.0.1 only.

Uses the session's local Ray and pool (``conftest.py``), so the pool's actors are checked too.
"""

from __future__ import annotations

import ipaddress


def _is_loopback(host: str) -> bool:
    ip = ipaddress.ip_address(host.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def test_local_ray_listens_on_loopback_only(local_ray, pool):
    import psutil

    assert local_ray.util.get_node_ip_address() == "127.0.0.1"
    me = psutil.Process()
    listening, exposed = [], []
    for proc in [me, *me.children(recursive=True)]:  # GCS, raylet, agents, the pool's actors, the driver
        try:
            name, conns = proc.name(), proc.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        for conn in conns:
            bound = conn.status == psutil.CONN_LISTEN or (conn.status == psutil.CONN_NONE and not conn.raddr)
            if not bound:
                continue
            listening.append((name, conn.laddr.ip, conn.laddr.port))
            if not _is_loopback(conn.laddr.ip):
                exposed.append((name, proc.pid, conn.laddr.ip, conn.laddr.port))
    names = {n for n, _, _ in listening}
    assert {"gcs_server", "raylet"} <= names, listening
    assert any(n.startswith("ray::_Worker") for n in names), listening  # the pool's actors were checked too
    assert not exposed, f"listening on a non-loopback address: {exposed}"
