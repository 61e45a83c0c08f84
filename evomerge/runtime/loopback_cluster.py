"""``python -m evomerge.runtime.loopback_cluster start ...``: Ray's own ``ray`` command, for a cluster of
several nodes on one machine that listens on 127.0.0.1 only (tests; trying the cluster path locally).

``ray start --node-ip-address 127.0.0.1`` alone does not keep a node on loopback: Ray replaces a
loopback address by the machine's routable one (``services.resolve_ip_for_localhost``), and then
binds its servers to every interface. The switch ``evomerge.runtime.local_ray`` uses for a single
local Ray (``ENABLE_RAY_CLUSTER`` off) cannot serve here, because it also forbids joining a second
node. This entry point keeps loopback addresses as given and otherwise is exactly ``ray``: every
argument goes to Ray's CLI (``start --head``, ``start --address``, ``stop``, ...). A search joins
such a cluster with ``--ray-address 127.0.0.1:PORT`` (``connect_ray`` keeps the driver on loopback too).
"""

from __future__ import annotations

import sys


def main() -> None:
    import ray._private.services as services
    from ray.scripts.scripts import main as ray_main

    services.resolve_ip_for_localhost = lambda host: host  # keep 127.0.0.1 as 127.0.0.1
    sys.argv[0] = "ray"
    sys.exit(ray_main())


if __name__ == "__main__":
    main()
