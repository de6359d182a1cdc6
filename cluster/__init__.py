"""gradavg's Ray side: shard workers that return gradient sums with counts, and the driver's step.

Everything that crosses a process boundary here is plain numpy.

Ray reads these settings when it is imported, so they are set here, before any module of
this package imports Ray: a local cluster listens on 127.0.0.1 only, reports no usage
statistics, and keeps token authentication on (``ray.init`` writes ``~/.ray/auth_token``
when there is none). Values already in the environment win.
"""

import os

# How a step's work and chunk sums travel between the driver and the workers (cluster.driver)
TRANSPORTS = ("auto", "compiled", "tasks")

# Arguments and results up to these sizes travel inside Ray's RPCs instead of through its object
# store: a tasks-transport step with a 186 KiB gradient each way costs about half as much. Ray
# reads them when a cluster starts (``ray.init`` of an embedded cluster, ``ray start --head``).
RAY_SYSTEM_CONFIG = {"max_direct_call_object_size": 4 << 20, "task_rpc_inlined_bytes_limit": 16 << 20}

LOCAL_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}

for _key, _value in LOCAL_RAY_ENV.items():
    os.environ.setdefault(_key, _value)
