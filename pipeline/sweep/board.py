"""Where a sweep's trials say how far along they are: a Ray actor on the driver's node (it outlives
any worker node), read by the driver for its progress lines."""

from __future__ import annotations

import ray


@ray.remote(num_cpus=0)
class Board:
    def __init__(self):
        self.trials: dict[str, dict] = {}

    def start(self, name: str, node: str) -> None:
        """A trial's attempt starts on `node` (attempt 2 and up: a retry after the node of an
        earlier attempt was lost)."""
        attempt = self.trials.get(name, {}).get("attempt", 0) + 1
        self.trials[name] = {"attempt": attempt, "node": node, "doing": "cloning"}

    def doing(self, name: str, what: str) -> None:
        self.trials[name]["doing"] = what

    def snapshot(self) -> dict[str, dict]:
        return self.trials
