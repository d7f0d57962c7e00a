"""Where a sweep's tasks say how far along they are, and which trials have landed: a Ray actor on
the driver's node (it outlives any worker node), read by the driver for its progress lines and for
the trials a lost or cancelled group had landed before it ended."""

from __future__ import annotations

import ray


@ray.remote(num_cpus=0)
class Board:
    def __init__(self):
        self.tasks: dict[str, dict] = {}  # by label: a trial's name, or a group's
        self.landed: dict[str, object] = {}  # trial name -> its TrialResult, once pushed

    def start(self, label: str, node: str) -> None:
        """A task's attempt starts on `node` (attempt 2 and up: a retry after the node of an
        earlier attempt was lost)."""
        attempt = self.tasks.get(label, {}).get("attempt", 0) + 1
        self.tasks[label] = {"attempt": attempt, "node": node, "doing": "cloning"}

    def doing(self, label: str, what: str) -> None:
        self.tasks[label]["doing"] = what

    def land(self, result) -> None:
        self.landed[result.name] = result

    def snapshot(self) -> tuple[dict[str, dict], dict[str, object]]:
        return self.tasks, self.landed
