"""``python -m evomerge.runtime.loopback_cluster start ...``: Ray's own ``ray`` command, for a cluster of
several nodes on one machine that listens on 127.0.0.1 only (tests; trying the cluster path locally).

``ray start --node-ip-address 127.0.0.1`` alone does not keep a node on loopback: Ray replaces a
loopback address by the machine's routable one (``services.resolve_ip_for_localhost``) and then binds
its servers to every interface; its other processes (dashboard agents, job drivers) resolve
``127.0.0.1:PORT`` the same way and then cannot reach a loopback GCS. The switch
``evomerge.runtime.local_ray`` uses for a single local Ray (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``)
fixes the resolution but also makes ``ray start --address`` refuse to join. So this entry point sets
the switch in the environment every Ray process it starts inherits, turns it back on in its own
process (so that it may join a node to another), and keeps the loopback node address it is given.
Otherwise it is exactly ``ray``: every argument goes to Ray's CLI (``start --head``, ``start
--address``, ``job submit``, ``stop``, ...). A search joins such a cluster with ``--ray-address
127.0.0.1:PORT`` (``connect_ray`` keeps the driver on loopback too). Two nodes on one machine need a
``--temp-dir`` and a ``--dashboard-agent-listen-port`` each.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    # Every Ray process this command starts (GCS, raylet, the dashboard and its agents, workers, job
    # drivers) inherits this and so resolves "localhost" to 127.0.0.1, as a single local Ray does ...
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray._private.services as services
    from ray._private import ray_constants
    from ray.scripts.scripts import main as ray_main

    # ... while this process itself may still start a node that joins another one (the flag forbids
    # that in the CLI), and keeps the loopback node address it is given
    ray_constants.ENABLE_RAY_CLUSTER = True
    services.resolve_ip_for_localhost = lambda host: host
    sys.argv[0] = "ray"
    sys.exit(ray_main())


if __name__ == "__main__":
    main()
