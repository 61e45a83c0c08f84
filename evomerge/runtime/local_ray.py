"""Connecting to Ray: join a cluster, or start a private one in this process that listens on 127.0.0.1 only.

A Ray started on a laptop or a shared box must not expose its GCS, raylet and worker ports to the
network. ``ray.init(_node_ip_address="127.0.0.1")`` alone does not achieve that (Ray swaps a loopback
node IP for the machine's routable address), so :func:`start_local_ray` flips one private Ray
constant while it starts Ray (:func:`_loopback_node_ip`) and warns if the result is not loopback
anyway (a Ray release that changed the constant). ``tests/test_runtime_local_ray.py`` checks every
listening socket of the Ray processes.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

__all__ = ["LOOPBACK", "connect_ray", "machine_cpus", "start_local_ray"]

LOOPBACK = "127.0.0.1"


def _is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return host == "localhost"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


@contextmanager
def _loopback_node_ip() -> Iterator[None]:
    """Make a Ray started in this block take 127.0.0.1 as its node IP, so that it binds loopback only.

    ``ray.init(_node_ip_address="127.0.0.1")`` alone does not do it: Ray replaces a loopback node IP by
    the machine's routable address (``services.resolve_ip_for_localhost``) unless
    ``ray_constants.ENABLE_RAY_CLUSTER`` is false (the ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` switch,
    read once at import). With a loopback node IP, GCS, raylet, object manager, core workers and the
    agents all bind 127.0.0.1. The switch is flipped only while this process starts its own Ray, so
    joining a real cluster later still reports a routable address.
    """
    from ray._private import ray_constants

    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):  # Ray changed; start_local_ray checks the result
        yield
        return
    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def machine_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, e.g. a container's or ``taskset``'s share),
    not the machine's total: a local Ray sized to more would oversubscribe them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def start_local_ray(
    num_cpus: int | None = None, *, num_gpus: int | None = None, runtime_env: dict | None = None, quiet: bool = True
) -> None:
    """Start a private Ray in this process, bound to loopback only, sized to the machine by default."""
    import ray

    # Ray turns token authentication on for a local cluster and warns about it on every start; the
    # embedded Ray listens on loopback only and keeps the token, so the notice is noise there.
    token_notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
    saved_level = token_notice.level
    if quiet:
        token_notice.setLevel(logging.ERROR)
    try:
        with _loopback_node_ip():
            ray.init(
                address="local",  # never pick up RAY_ADDRESS or a running cluster here
                num_cpus=num_cpus if num_cpus is not None else machine_cpus(),
                num_gpus=num_gpus,
                include_dashboard=False,
                log_to_driver=not quiet,
                logging_level=logging.WARNING if quiet else logging.INFO,
                runtime_env=runtime_env,
                _node_ip_address=LOOPBACK,
            )
    finally:
        token_notice.setLevel(saved_level)
    node_ip = ray.util.get_node_ip_address()
    if not _is_loopback(node_ip):
        log.warning(
            "the local Ray took node IP %s instead of %s: its ports are reachable from the network", node_ip, LOOPBACK
        )


def connect_ray(address: str | None = None, *, num_cpus: int | None = None, quiet: bool = True) -> bool:
    """Make sure this process is connected to Ray; True when it started the Ray (and must stop it).

    Already connected: reuse. ``address`` or ``RAY_ADDRESS``: join that cluster. Otherwise start a
    local, loopback-only Ray with ``num_cpus`` (default: this machine's CPUs).
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "local":
        host = address.split("://")[-1].rsplit(":", 1)[0]
        # a cluster on this machine's loopback (evomerge.runtime.loopback_cluster): join it as 127.0.0.1 too
        with _loopback_node_ip() if _is_loopback(host) else contextlib.nullcontext():
            ray.init(address=address, log_to_driver=not quiet, logging_level=logging.WARNING if quiet else logging.INFO)
        return False
    start_local_ray(num_cpus, quiet=quiet)
    return True
