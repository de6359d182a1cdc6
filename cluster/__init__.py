"""gradavg's Ray side: shard workers that return gradient sums with counts, and the driver's step.

Everything that crosses a process boundary here is plain numpy.

Ray reads its settings from the environment when it is imported: ``ray_settings()`` puts this
project's there, and every module that imports Ray calls it first (``cluster.driver``,
``jobs.local_cluster``, ``jobs.submit``, the benchmarks): a local cluster listens on 127.0.0.1
only, reports no usage statistics, and keeps token authentication on. Importing this package
changes nothing.

Workarounds of Ray 2.60's behaviour, to retest on an upgrade, are marked ``Ray 2.60 workaround``
where they are (``grep -rn "Ray 2.60 workaround"``): the driver's ``end_process``, the compiled
graph's teardown in a thread of its own, the spin-free wait before a compiled step's result, and the
traceback frames cleared before Ray shuts down (``RayBackend.close``).
"""

import os

# How a step's work and chunk sums travel between the driver and the workers (cluster.driver)
TRANSPORTS = ("auto", "compiled", "tasks")

# Arguments and results up to these sizes travel inside Ray's RPCs instead of through its object
# store: a tasks-transport step with a 186 KiB gradient each way costs about half as much. Ray
# reads them when a cluster starts (``ray.init`` of an embedded cluster, ``ray start --head``).
RAY_SYSTEM_CONFIG = {"max_direct_call_object_size": 4 << 20, "task_rpc_inlined_bytes_limit": 16 << 20}

LOCAL_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}



def ray_settings() -> None:
    """``LOCAL_RAY_ENV`` into this process's environment, before Ray is imported; values already there win."""
    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)
