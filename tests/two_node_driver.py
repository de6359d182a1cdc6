"""A driver that ``test_ray_two_nodes`` runs inside the head node's namespace: it trains digits on
one Ray worker per node and saves the final weights; given the second node's namespace, it kills
every process there (the node lost outright) during the fourth step."""

from __future__ import annotations

import json
import sys

import numpy as np

from bench.two_nodes import kill_everything_in
from cluster.connect import end_process
from cluster.driver import RayBackend
from jobs.config import load_config
from jobs.data import load_dataset
from jobs.train import train

OVERRIDES = ["data=digits", "sizes=[64,30,10]", "batch_size=100", "chunk_size=30", "epochs=2"]


class Backend(RayBackend):
    steps = 0
    lose_node: str | None = None  # a namespace

    def start(self, network, x, labels):
        import ray

        super().start(network, x, labels)
        ids = ray.get([actor.node_id.remote() for actor in self.actors])
        addresses = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
        self.worker_addresses = [addresses[i] for i in ids]

    def chunk_sums(self, network, batch):
        self.steps += 1
        if self.steps == 4 and self.lose_node:
            kill_everything_in(self.lose_node)
        return super().chunk_sums(network, batch)


def main() -> None:
    out, transport = sys.argv[1], sys.argv[2]
    heard: list[str] = []
    backend = Backend(2, 30, on_failure=heard.append, replace_timeout=5, transport=transport)
    backend.lose_node = sys.argv[3] if len(sys.argv) > 3 else None
    state = train(load_config(None, OVERRIDES), load_dataset("digits"), backend)
    np.save(out, state.network.params)
    print(json.dumps({"transport": backend.transport, "addresses": backend.worker_addresses,
                      "failures": backend.failures, "heard": heard}))


if __name__ == "__main__":
    main()
    end_process(0)
