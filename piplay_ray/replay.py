"""Replay policy: bounded, group-atomic, version-aware storage of experiences (no Ray in here).

Staleness of a group consumed by the learner at policy version L (L steps done for that role) is
``L - v`` where ``v`` is the version of the policy that generated it. A group is accepted and kept only
while ``L - v <= max_staleness``; ``max_staleness = 0`` is strictly on-policy. Groups that fall out of the
bound while waiting are evicted and counted, never handed to the learner.
"""

from __future__ import annotations

from collections import Counter, deque
from pathlib import Path

from piplay_ray.records import Experience

Group = list[Experience]


class ReplayBuffer:
    def __init__(self, capacity_groups: int, max_staleness: int):
        self.capacity = capacity_groups
        self.max_staleness = max_staleness
        self.groups: dict[str, deque[Group]] = {}
        self.learner_version: Counter[str] = Counter()
        self.seen: set[str] = set()  # group ids ever accepted: a re-issued group is never stored twice
        self.counts: Counter[str] = Counter()

    def __len__(self) -> int:
        return sum(len(q) for q in self.groups.values())

    def full(self) -> bool:
        return len(self) >= self.capacity

    def size(self, role: str) -> int:
        return len(self.groups.get(role, ()))

    def staleness(self, group: Group) -> int:
        return self.learner_version[group[0].role] - min(e.version for e in group)

    def add(self, group: Group) -> str:
        """Store a whole group. Returns "ok", "stale", "duplicate" or "full" (caller retries later)."""
        if not group:
            raise ValueError("empty group")
        gid, role = group[0].group_id, group[0].role
        if any(e.group_id != gid or e.role != role for e in group):
            raise ValueError("a group must share one group_id and one role")
        if gid in self.seen:
            self.counts["duplicate"] += 1
            return "duplicate"
        if self.staleness(group) > self.max_staleness:
            self.counts[f"refused_stale/{role}"] += 1
            return "stale"
        if self.full():
            return "full"
        self.groups.setdefault(role, deque()).append(group)
        self.seen.add(gid)
        self.counts[f"added/{role}"] += 1
        return "ok"

    def set_version(self, role: str, version: int) -> int:
        """The learner reached `version`; evict groups now beyond the bound. Returns how many."""
        self.learner_version[role] = version
        queue = self.groups.get(role, deque())
        keep = deque(g for g in queue if self.staleness(g) <= self.max_staleness)
        evicted = len(queue) - len(keep)
        self.groups[role] = keep
        self.counts[f"evicted_stale/{role}"] += evicted
        return evicted

    def sample(self, role: str, n_groups: int) -> list[Group]:
        """Pop up to `n_groups` oldest groups of `role` (FIFO keeps staleness low)."""
        queue = self.groups.get(role, deque())
        out = [queue.popleft() for _ in range(min(n_groups, len(queue)))]
        self.counts[f"sampled/{role}"] += len(out)
        return out

    def stats(self) -> dict:
        return {"size": len(self), "capacity": self.capacity, "max_staleness": self.max_staleness,
                "per_role": {r: len(q) for r, q in self.groups.items()},
                "versions": dict(self.learner_version), **self.counts}

    # ------------------------------------------------------------------ spill: buffered groups survive a restart

    def spill(self, path: str | Path) -> int:
        """Write every buffered experience (and the accounting) to a Parquet file; returns the row count."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [e.__dict__ | {"info": _json(e.info)} for q in self.groups.values() for g in q for e in g]
        meta = {"seen": sorted(self.seen), "versions": dict(self.learner_version), "counts": dict(self.counts)}
        table = pa.Table.from_pylist(rows, schema=_schema()) if rows else _schema().empty_table()
        table = table.replace_schema_metadata({"piplay": _json(meta)})
        tmp = Path(str(path) + ".tmp")
        pq.write_table(table, tmp)
        tmp.replace(path)
        return len(rows)

    @classmethod
    def restore(cls, path: str | Path, capacity_groups: int, max_staleness: int) -> ReplayBuffer:
        import json

        import pyarrow.parquet as pq

        buf = cls(capacity_groups, max_staleness)
        table = pq.read_table(path)
        meta = json.loads(table.schema.metadata[b"piplay"])
        buf.learner_version.update(meta["versions"])
        buf.counts.update(meta["counts"])
        groups: dict[str, Group] = {}
        for row in table.to_pylist():
            row["info"] = json.loads(row["info"])
            exp = Experience(**row)
            groups.setdefault(exp.group_id, []).append(exp)
        for group in groups.values():
            buf.groups.setdefault(group[0].role, deque()).append(group)
        buf.seen = set(meta["seen"])
        return buf


def _json(obj) -> str:
    import json

    return json.dumps(obj)


def _schema():
    import pyarrow as pa

    ints, floats = pa.list_(pa.int64()), pa.list_(pa.float64())
    return pa.schema([
        ("group_id", pa.string()), ("role", pa.string()), ("prompt_ids", ints), ("response_ids", ints),
        ("mask", ints), ("logprobs", floats), ("reward", pa.float64()), ("advantage", pa.float64()),
        ("version", pa.int64()), ("teacher_ids", pa.list_(ints)), ("teacher_logprobs", pa.list_(floats)),
        ("teacher_tail", floats), ("info", pa.string()),
    ])
