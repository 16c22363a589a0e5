"""The records that flow between actors: documents, search hops, trajectories, tasks and experiences.

Plain dataclasses, JSON-serialisable with :func:`to_json` / ``from_json`` so task sets, trajectories and
replay spills can be written to the run directory and read back.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["examiner", "student"]


# the data sources of the built-in held-out sets: method/qa.py names its questions so, the run summary reads them
NATURAL_SOURCE, RULE_SOURCE = "natural", "rule"

@dataclass
class Doc:
    id: str
    title: str
    contents: str
    score: float = 0.0

    @classmethod
    def from_dict(cls, d: dict) -> Doc:
        return cls(**{k: d[k] for k in ("id", "title", "contents") if k in d}, score=float(d.get("score", 0.0)))


@dataclass
class Hop:
    """One search call as the agent saw it: the query, the documents returned, and whether the tool worked."""

    query: str
    docs: list[Doc] = field(default_factory=list)
    ok: bool = True
    error: str | None = None

    @classmethod
    def from_dict(cls, d: dict) -> Hop:
        return cls(query=d["query"], docs=[Doc.from_dict(x) for x in d.get("docs", [])],
                   ok=d.get("ok", True), error=d.get("error"))


FinishReason = Literal["answer", "eos", "length", "max_turns", "invalid", "question"]


@dataclass
class Trajectory:
    """A multi-turn agent rollout, token-in/token-out.

    `response_ids` holds every token after the prompt: model tokens exactly as sampled and environment
    tokens (the `<information>` blocks) as inserted. `mask[i]` is 1 for model tokens, 0 for inserted ones;
    `logprobs[i]` is the sampling logprob of a model token (0.0 where mask is 0).
    """

    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    hops: list[Hop] = field(default_factory=list)
    answer: str | None = None
    finish_reason: FinishReason = "length"
    turns: int = 0
    version: int = 0  # the oldest version any of its generated tokens came from (its staleness)
    versions: list[int] = field(default_factory=list)  # per response token: the version that generated it
    role: Role = "student"
    text: str = ""  # decoded response, for logs and the dashboard only (never re-tokenised)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the examiner's question

    @property
    def num_searches(self) -> int:
        return len(self.hops)

    @classmethod
    def from_dict(cls, d: dict) -> Trajectory:
        d = dict(d)
        d["hops"] = [Hop.from_dict(h) for h in d.get("hops", [])]
        return cls(**d)


@dataclass
class Task:
    """An examiner-written question with its question construction path (QCP) and validity flags."""

    id: str
    question: str
    answer: str
    hops: int  # the hop target h
    source: Doc
    qcp: list[Hop] = field(default_factory=list)
    trajectory: Trajectory | None = None
    flags: dict[str, bool] = field(default_factory=dict)
    format_reward: float = 0.0
    iteration: int = 0
    version: int = -1  # the examiner policy version that wrote it; -1 when no examiner did (rule-built)

    @property
    def valid(self) -> bool:
        return bool(self.flags) and all(self.flags.values())

    @classmethod
    def from_dict(cls, d: dict) -> Task:
        d = dict(d)
        d["source"] = Doc.from_dict(d["source"])
        d["qcp"] = [Hop.from_dict(h) for h in d.get("qcp", [])]
        if d.get("trajectory") is not None:
            d["trajectory"] = Trajectory.from_dict(d["trajectory"])
        return cls(**d)


@dataclass
class Experience:
    """One trajectory ready for the learner. Samples of one question share `group_id` and travel together."""

    group_id: str
    role: Role
    prompt_ids: list[int]
    response_ids: list[int]
    mask: list[int]
    logprobs: list[float]
    reward: float
    advantage: float
    version: int  # its oldest generated token's policy version: what the replay bound and staleness read
    # teacher top-K over response positions (student experiences only): per position, K ids and logprobs;
    # positions with mask 0 hold empty lists. `teacher_tail` is log(1 - sum p_topk) per position, if used.
    teacher_ids: list[list[int]] | None = None
    teacher_logprobs: list[list[float]] | None = None
    teacher_tail: list[float] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    versions: list[int] | None = None  # per response token, the policy version that generated it

    def token_staleness(self, learner_version: int) -> list[int]:
        """How many versions behind `learner_version` each trained (mask 1) token is."""
        vs = self.versions or [self.version] * len(self.mask)
        return [learner_version - v for v, m in zip(vs, self.mask, strict=True) if m]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)

    @classmethod
    def from_dict(cls, d: dict) -> Experience:
        return cls(**d)


def group_id(role: str, step: int, *parts: Any) -> str:
    """`role-step[-parts]`: a group's id names the learner step it was made for (the replay store asks it)."""
    return "-".join([role, str(step), *map(str, parts)])


def group_step(gid: str) -> tuple[str, int] | None:
    """(role, step) of a `group_id`, None for an id of another shape."""
    role, _, rest = gid.partition("-")
    step = rest.partition("-")[0]
    return (role, int(step)) if step.isdigit() else None


def to_dict(record: Any) -> dict:
    return dataclasses.asdict(record)


def to_json(record: Any) -> str:
    return json.dumps(dataclasses.asdict(record), ensure_ascii=False)
