"""Upper levels of the M-DCI hierarchy: routing nodes and their parents (bookkeeping only).

Every routing node is a cluster (a level-1 node) identified by its cluster id; a cluster of top
level L is present at levels 1..L. At its top level it hangs under its nearest node one level up
(or under the virtual root when it is at the highest level). :meth:`Routing.snapshot` flattens the
tree into arrays for :func:`kernels.mdci.route_clusters`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RoutingSnapshot:
    """Flat, top-level-first arrays of the routing tree (see ``route_clusters``)."""

    cluster: np.ndarray  # [R] int64 cluster id of each node
    block_start: np.ndarray  # [L + 1] int64
    child_start: np.ndarray  # [R] int64
    child_end: np.ndarray  # [R] int64

    @property
    def nbytes(self) -> int:
        return self.cluster.nbytes + self.block_start.nbytes + self.child_start.nbytes + self.child_end.nbytes


class Routing:
    """Levels >= 1 of the hierarchy. ``nodes[l-1]`` lists the clusters at level l,
    ``parents[l-1]`` their parent cluster at level l+1 (-1 = root)."""

    def __init__(self) -> None:
        self.nodes: list[list[int]] = []
        self.parents: list[list[int]] = []
        self._snapshot: RoutingSnapshot | None = None

    @property
    def n_levels(self) -> int:
        return len(self.nodes)

    def add(self, cluster: int, top_level: int, parent_at_top: int) -> None:
        """Add a cluster present at levels 1..top_level; ``parent_at_top`` is its parent one level
        above its top (-1 when it opens a new highest level or sits at the highest level)."""
        while self.n_levels < top_level:
            self._open_level(first=cluster)
        for level in range(1, top_level + 1):
            parent = cluster if level < top_level else parent_at_top
            self.nodes[level - 1].append(cluster)
            self.parents[level - 1].append(parent)
        self._snapshot = None

    def _open_level(self, first: int) -> None:
        """A new highest level whose first node is ``first``: the old top nodes hang under it."""
        if self.parents:
            self.parents[-1] = [first] * len(self.parents[-1])
        self.nodes.append([])
        self.parents.append([])

    def top_nodes(self, level: int) -> list[int]:
        """Clusters present at ``level`` (1-based)."""
        return self.nodes[level - 1] if 1 <= level <= self.n_levels else []

    def snapshot(self) -> RoutingSnapshot:
        """Flatten (cached until the next :meth:`add`)."""
        if self._snapshot is None:
            self._snapshot = self._flatten()
        return self._snapshot

    def _flatten(self) -> RoutingSnapshot:
        blocks: list[np.ndarray] = []
        child_start: list[np.ndarray] = []
        child_end: list[np.ndarray] = []
        above = np.asarray(self.nodes[-1], np.int64)
        blocks.append(above)
        offset = len(above)
        for level in range(self.n_levels - 1, 0, -1):
            nodes = np.asarray(self.nodes[level - 1], np.int64)
            parents = np.asarray(self.parents[level - 1], np.int64)
            position = {int(c): i for i, c in enumerate(above)}
            parent_pos = np.array([position[int(p)] for p in parents], np.int64)
            order = np.argsort(parent_pos, kind="stable")
            nodes, parent_pos = nodes[order], parent_pos[order]
            counts = np.bincount(parent_pos, minlength=len(above))
            ends = np.cumsum(counts)
            child_start.append(offset + ends - counts)
            child_end.append(offset + ends)
            blocks.append(nodes)
            offset += len(nodes)
            above = nodes
        child_start.append(np.zeros(len(above), np.int64))  # level-1 nodes have no routing children
        child_end.append(np.zeros(len(above), np.int64))
        sizes = [len(b) for b in blocks]
        return RoutingSnapshot(
            cluster=np.concatenate(blocks),
            block_start=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
            child_start=np.concatenate(child_start),
            child_end=np.concatenate(child_end),
        )

    @property
    def nbytes(self) -> int:
        """Approximate bytes of routing metadata (node + parent ids, 4 bytes each)."""
        return 8 * sum(len(n) for n in self.nodes)
