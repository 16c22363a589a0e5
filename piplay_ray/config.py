"""Validated configuration: pydantic models loaded from YAML with OmegaConf.

A config file may name a base with ``extends: other.yaml`` (relative to itself); the child is merged over
the base, then dotted command-line overrides are merged over both, then ``${...}`` interpolations are
resolved, then the result is validated. Unknown keys are errors, and every error names the full dotted
key, the bad value and what is allowed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from piplay_ray.registry import ARMS, ENGINES, RETRIEVERS, REWARDS, TRANSPORTS, Registry

PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
Prob = Annotated[float, Field(ge=0.0, le=1.0)]


def plugin(registry: Registry, *extra: str):
    """A string naming an entry of `registry` (or one of `extra`): the allowed values are the registry's."""

    def check(value: str) -> str:
        if value in extra:
            return value
        if value in registry.names() or ":" in value:
            return registry.check(value)
        raise ValueError(f"got {value!r}; allowed values: {', '.join((*registry.names(), *extra))} (or a plug-in "
                         "as module:attribute)")

    return Annotated[str, AfterValidator(check)]


class ConfigError(ValueError):
    """A config that cannot be loaded or validated; the message lists every problem."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(Section):
    name: str = "piplay"
    root: str = "runs"  # run directories are created under this folder
    dir: str | None = None  # an explicit run directory (resume by pointing here); default root/name-timestamp
    seed: int = 0
    mode: Literal["local", "cluster"] = "local"
    resume: bool = True  # continue from the newest complete checkpoint in `dir` when there is one
    accept_changed_config: bool = False  # resume even if what is trained differs from the run's config.yaml


class ModelConfig(Section):
    """Model paths: a local directory, a hub id, or `builtin:smollm2` / `builtin:tiny` (built by `piplay assets`)."""

    base: str = "builtin:smollm2"
    examiner: str | None = None  # default: base
    student: str | None = None  # default: base
    teacher: str | None = None  # default: the student's initial weights
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    def path_for(self, role: Literal["examiner", "student", "teacher"]) -> str:
        if role == "teacher":
            return self.teacher or self.student or self.base
        return getattr(self, role) or self.base


class RolloutConfig(Section):
    engine: plugin(ENGINES) = "vllm"
    workers_per_role: PosInt = 1
    num_cpus_per_worker: Annotated[float, Field(gt=0)] = 1.0
    num_gpus_per_worker: Annotated[float, Field(ge=0)] = 0.0
    tensor_parallel_size: PosInt = 1
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = 0.85
    kv_cache_gib: PosInt = 1  # vLLM CPU KV-cache size (VLLM_CPU_KVCACHE_SPACE takes whole GiB)
    max_model_len: PosInt = 4096
    max_num_seqs: PosInt = 64
    temperature: Annotated[float, Field(ge=0)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    # one model turn's tokens; None: only max_response_tokens bounds a turn (Dr. Zero: a thinking model's turn
    # that hits a per-turn cap has no closed action, and its trajectory ends with reward 0)
    max_tokens_per_turn: PosInt | None = 256
    max_response_tokens: PosInt = 1024  # all turns together, generated and inserted
    max_info_tokens: PosInt | None = None  # one search's <information> text, cut to this many tokens
    enforce_eager: bool = True
    # a weight sync reaches running requests: the engine pauses between tokens, loads, and continues them, so
    # the learner never waits for the slowest trajectory; every token records the version that produced it.
    # inflight_kv: what continues: "recompute" (the requests' KV recomputed under the new weights) or "keep"
    # (the KV cache the old weights computed, and the prefix cache, kept: faster, not exact)
    inflight_updates: bool = False
    inflight_kv: Literal["recompute", "keep"] = "recompute"
    # an engine (rollout pool or teacher) a phase does not use sleeps through it: vLLM's sleep mode on a GPU
    # (weights to host memory, KV cache dropped), freeing its memory for the learner; no effect elsewhere
    sleep_when_idle: bool = False
    # run.mode=local, vLLM CPU: cores a role's engine binds its threads to (default 1; engines spread)
    local_engine_cores: dict[Literal["examiner", "student"], PosInt] = Field(default_factory=dict)

    @property
    def turn_tokens(self) -> int:
        """The most tokens one model turn may generate."""
        return self.max_tokens_per_turn or self.max_response_tokens


class SearchConfig(Section):
    retriever: plugin(RETRIEVERS) = "bm25"
    corpus: str = "builtin:wiki-vital"  # JSONL {"id", "contents", "title"?}, or builtin:wiki-vital
    index_dir: str | None = None  # default: beside the corpus
    encoder: str = "builtin:minilm"  # dense: local path, hub id or builtin:minilm
    query_prefix: str = ""  # e5: "query: "
    passage_prefix: str = ""  # e5: "passage: "
    faiss_index: Literal["flat", "hnsw", "ivf"] = "flat"
    index_shard_docs: PosInt = 100_000  # flat dense build: passages encoded and saved per resumable shard
    url: str = "http://127.0.0.1:8000"  # http retriever
    topk: PosInt = 3
    max_topk: PosInt = 50
    max_query_chars: PosInt = 512
    doc_token_budget: PosInt = 128  # per retrieved document, in words, when formatted for the agent
    replicas: PosInt = 1
    num_cpus_per_replica: Annotated[float, Field(ge=0)] = 0.5
    batch_window_ms: Annotated[float, Field(ge=0)] = 5.0
    cache_size: NonNegInt = 10000
    timeout_s: Annotated[float, Field(gt=0)] = 10.0
    retries: NonNegInt = 3
    backoff_s: Annotated[float, Field(ge=0)] = 0.5


class ExaminerConfig(Section):
    hop_weights: list[Annotated[float, Field(ge=0)]] = Field(default_factory=lambda: [4.0, 3.0, 2.0, 1.0])
    max_turns: PosInt = 6
    answer_max_words: PosInt = 5  # Dr. Zero: full answer credit up to 5 words, half up to 10; the gate: 5
    format_weight: Annotated[float, Field(ge=0)] = 0.5  # w_f in r_d = 1(0<k<n)(n-k)/(n-1) + w_f r_f
    # r_f: Dr. Zero's partial credit (mean of well-formed turns, tool use, answer) behind the integrity gate,
    # or `search`: the search score only, behind every gate flag (rewards.format_reward)
    format_reward: Literal["partial", "search"] = "partial"
    # the student's task set comes from the final examiner; `true` also takes valid tasks the examiner wrote
    # during its training steps (oldest first) before the rule-built top-up
    task_set_fallback: bool = False
    attempts: Annotated[int, Field(ge=2)] = 5  # n student attempts per examiner task
    tasks_per_step: PosInt = 8
    # tasks the examiner writes for the student phase; default (and the only value allowed) is what the phase
    # trains: schedule.student_steps x student.tasks_per_step / student.task_uses (rounded up)
    task_set_size: PosInt | None = None
    task_set_rounds: PosInt = 3  # rounds of task_set_size examiner attempts, until the set is full
    # a run directory whose task sets (tasks/iter-N.jsonl) this run trains on instead of writing its own:
    # arms of an experiment (`piplay experiment`) share one examiner's task sets
    task_sets_from: str | None = None

    @model_validator(mode="after")
    def _hops(self) -> ExaminerConfig:
        if not self.hop_weights or sum(self.hop_weights) <= 0:
            raise ValueError("hop_weights: needs at least one positive weight (index i = i+1 hops)")
        return self


class StudentConfig(Section):
    group_size: Annotated[int, Field(ge=2)] = 5  # G samples per question
    max_turns: PosInt = 4
    tasks_per_step: PosInt = 8
    task_uses: PosInt = 1  # how often a student phase trains each task (Dr. Zero: once, on fresh tasks)
    reward: plugin(REWARDS) = "exact_match"  # the outcome reward r(answer, golden answer); registry.REWARDS


class TeacherConfig(Section):
    # what serves the teacher: its own transformers model or vLLM engine (a separate actor, teacher.num_gpus),
    # or `shared`: the student's rollout engines with the teacher's EMA adapter as a second adapter (needs
    # learner.lora; no teacher actor, model or GPU; teacher/shared.py)
    backend: plugin(ENGINES, "shared") = "transformers"
    top_k: PosInt = 20
    tail_bucket: bool = True
    # the privileged information (paper ablations): the whole QCP, a seeded half of it, the answer only, or no
    # teacher at all (no scoring, λ ignored); registry.ARMS, piplay_ray/method/privileged.py
    privileged: plugin(ARMS) = "qcp"
    # words per QCP document in the teacher's context, the unit of search.doc_token_budget; None: what the
    # examiner saw (the source at protocol.SOURCE_DOC_WORDS, search documents as the search env cut them)
    doc_token_budget: PosInt | None = None
    init: Literal["once", "iteration"] = "once"
    ema_tau: Prob = 0.05
    num_cpus: Annotated[float, Field(gt=0)] = 1.0
    num_gpus: Annotated[float, Field(ge=0)] = 0.0
    # the teacher's own vLLM engine (backend vllm): its parallelism and GPU memory share, not the rollout's
    tensor_parallel_size: PosInt = 1
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = 0.85
    # the float32 EMA masters (4 B per parameter; the adapter's under learner.lora) live on the teacher's GPU,
    # outside vLLM's share, where the update runs; true: in host memory, for a card too small for both
    # (configs/gpu1.yaml), at the cost of a host-side blend and a host-to-device stream per student step
    ema_on_host: bool = False

    @model_validator(mode="after")
    def _fits_its_gpus(self) -> TeacherConfig:
        # one engine may take a fraction of a GPU (the GPUs shared, as gpu-check does); tensor parallelism may not
        if self.num_gpus > 0 and self.tensor_parallel_size > max(1.0, self.num_gpus):
            raise ValueError(f"teacher.tensor_parallel_size={self.tensor_parallel_size} needs that many GPUs but "
                             f"teacher.num_gpus={self.num_gpus:g}; raise teacher.num_gpus or lower the parallelism")
        return self


class LossConfig(Section):
    clip_eps: Annotated[float, Field(gt=0, lt=1)] = 0.2
    aggregation: Literal["token_mean", "seq_mean"] = "token_mean"
    std_normalize: bool = True
    kl_beta: Annotated[float, Field(ge=0)] = 0.0  # > 0 loads a frozen reference (the role's initial weights)
    chunk_tokens: NonNegInt = 1024  # tokens whose [tokens x vocab] logits exist at once in the loss; 0 = all
    distill_norm: Literal["sequence", "aggregation"] = "sequence"  # paper: 1/|y| per sequence, mean over them
    is_correction: Literal["truncated", "none"] = "truncated"  # engine/learner mismatch: truncated IS weight
    is_cap: Annotated[float, Field(gt=0)] = 2.0  # w = min(pi_learner / pi_engine, is_cap)


class LoraConfig(Section):
    """PEFT LoRA adapters on each trained role: only they train, so optimizer state is megabytes."""

    rank: NonNegInt = 0  # r; 0 = off (full fine-tuning)
    alpha: Annotated[float, Field(gt=0)] = 16.0  # the update is (alpha / rank) * B @ A
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    # module names (suffixes) to adapt; ["all-linear"]: every linear layer but the output head (PEFT's shorthand)
    target_modules: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)] = Field(
        default_factory=lambda: ["all-linear"])


class LearnerConfig(Section):
    world_size: PosInt = 1
    num_cpus_per_rank: Annotated[float, Field(gt=0)] = 1.0
    # CPU cores every rank's threads are pinned to (one machine: keeps the learner off the engines' cores, as
    # separate GPUs would on a cluster; bench/pipeline.py); None: wherever the OS puts them
    cpu_cores: list[NonNegInt] | None = None
    num_gpus_per_rank: Annotated[float, Field(ge=0)] = 0.0
    zero_stage: Literal[0, 1, 2, 3] = 2
    bf16: Literal["auto", True, False] = "auto"  # auto: on where the hardware supports it
    gradient_checkpointing: bool = False
    lr: Annotated[float, Field(gt=0)] = 1e-6
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    grad_clip: Annotated[float, Field(gt=0)] = 0.1  # Dr. Zero's
    lr_warmup_steps: NonNegInt = 0  # linear warm-up: optimizer step s (1-based) uses lr * min(1, s / n)
    micro_batch_tokens: PosInt = 4096
    # each micro-batch as one row of its sequences end to end (no padding; attention kept within each sequence
    # by restarting position_ids), instead of the shared-prefix forward. Off by default: with sdpa or eager the
    # block-diagonal mask is dense over the whole row (on CPU, 1.5x slower); flash or flex attention skip it
    pack_sequences: bool = False
    # iteration: each phase of an iteration starts with a fresh optimizer and warm-up, as Dr. Zero's separate
    # training run per iteration does; never: one optimizer per role for the whole run
    optimizer_restart: Literal["never", "iteration"] = "never"
    offload_inactive: bool = True
    loss: LossConfig = Field(default_factory=LossConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)


class WeightSyncConfig(Section):
    # object_store: one node (shared memory); collective: a broadcast per role (NCCL on GPUs, gloo on CPU)
    transport: plugin(TRANSPORTS) = "object_store"
    bucket_mb: PosInt = 256
    timeout_s: PosInt = 600  # a collective sync (or a rendezvous) that waits longer fails and is retried
    # collective backend: auto = NCCL for GPU tensors, gloo on CPU; gloo also moves GPU tensors (via host
    # memory), for members that share one GPU (NCCL refuses two ranks on one device)
    backend: Literal["auto", "nccl", "gloo"] = "auto"


class ReplayConfig(Section):
    capacity_groups: PosInt = 256
    max_staleness: NonNegInt = 1
    spill: bool = True


class ScheduleConfig(Section):
    iterations: PosInt = 3  # M
    examiner_steps: NonNegInt = 50  # W per iteration
    student_steps: NonNegInt = 50
    distill_lambda: list[Annotated[float, Field(ge=0)]] = Field(default_factory=lambda: [0.03, 0.003, 0.002])

    def lam(self, iteration: int) -> float:
        """λ for a 0-based iteration; the last value holds for iterations past the list."""
        if not self.distill_lambda:
            return 0.0
        return self.distill_lambda[min(iteration, len(self.distill_lambda) - 1)]


class CheckpointConfig(Section):
    every: NonNegInt = 10  # learner steps; 0 = only at the end
    keep: PosInt = 2


class EvalConfig(Section):
    every: NonNegInt = 0  # iterations; 0 = never
    every_student_steps: NonNegInt = 0  # also every k student steps (and before training); 0 = never
    before_training: bool = True  # evaluate the starting checkpoint when either schedule above is on
    data: list[str] = Field(default_factory=list)  # QA files; empty = the built-in sets (natural, rule-built)
    natural_size: NonNegInt | None = None  # questions of the natural set (the headline); None = all, 0 = none
    rule_size: PosInt = 100  # questions of the rule-built set (the protocol check)
    max_examples: NonNegInt = 0  # 0 = all


class LoggingConfig(Section):
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "piplay-ray"
    wandb_mode: Literal["online", "offline", "disabled"] = "offline"
    sample_trajectories: NonNegInt = 8  # per step, written with teacher top-K for the dashboard
    verbose: bool = False  # actor output (vLLM, Ray, DeepSpeed) on the terminal instead of run_dir/logs/


class DashboardConfig(Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8390


class FaultConfig(Section):
    max_actor_restarts: NonNegInt = 3
    max_task_retries: NonNegInt = 3
    learner_restarts: NonNegInt = 1


class RayConfig(Section):
    address: str | None = None  # cluster mode: default $RAY_ADDRESS
    num_cpus: PosInt | None = None  # local mode: default all cores
    namespace: str = "piplay"


class Config(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    examiner: ExaminerConfig = Field(default_factory=ExaminerConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    weight_sync: WeightSyncConfig = Field(default_factory=WeightSyncConfig)
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    dashboard: DashboardConfig = Field(default_factory=DashboardConfig)
    fault: FaultConfig = Field(default_factory=FaultConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        """Values that are each valid but cannot work together (a run would stall or fail later)."""
        problems = []
        need = max(self.student.tasks_per_step, 1)  # an examiner step is one hop-grouped group
        if self.replay.capacity_groups < need:
            problems.append(f"replay.capacity_groups={self.replay.capacity_groups} is smaller than the "
                            f"{need} groups one student step needs (student.tasks_per_step={need}); "
                            f"raise replay.capacity_groups to at least {need}")
        problems += self._task_set_size()
        r = self.rollout
        if r.max_tokens_per_turn is not None and r.max_tokens_per_turn > r.max_response_tokens:
            problems.append(f"rollout.max_tokens_per_turn={r.max_tokens_per_turn} exceeds "
                            f"rollout.max_response_tokens={r.max_response_tokens} (all turns together)")
        if r.max_response_tokens >= r.max_model_len:
            problems.append(f"rollout.max_response_tokens={r.max_response_tokens} leaves no room for the prompt "
                            f"in rollout.max_model_len={r.max_model_len}")
        if self.teacher.backend == "shared" and not self.learner.lora.rank:
            problems.append("teacher.backend=shared serves the teacher as a second LoRA adapter on the student's "
                            "engines and needs learner.lora.rank > 0 (got 0); turn learner.lora on, or set "
                            "teacher.backend to one of transformers, vllm")
        if self.teacher.backend == "shared" and self.model.path_for("teacher") != self.model.path_for("student"):
            problems.append(f"teacher.backend=shared scores on the student's engines, so the teacher's base is the "
                            f"student's; model.teacher={self.model.teacher!r} differs: unset it, or set "
                            "teacher.backend to one of transformers, vllm")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def task_set_size(self) -> int:
        """Tasks the examiner writes for a student phase: examiner.task_set_size, by default what the phase trains."""
        return self.examiner.task_set_size or self._phase_tasks()

    def _phase_tasks(self) -> int:
        """Distinct tasks a student phase trains: schedule.student_steps x student.tasks_per_step, each task
        student.task_uses times (rounded up); one step's worth when the run trains no student."""
        s = self.student
        return -(-self.schedule.student_steps * s.tasks_per_step // s.task_uses) or s.tasks_per_step

    def _task_set_size(self) -> list[str]:
        """A given examiner.task_set_size must be what the student phase trains (else tasks repeat or go unused)."""
        given, s = self.examiner.task_set_size, self.student
        if given is None or not self.schedule.student_steps or given == self._phase_tasks():
            return []
        return [f"examiner.task_set_size={given} but a student phase trains schedule.student_steps="
                f"{self.schedule.student_steps} x student.tasks_per_step={s.tasks_per_step} tasks, each "
                f"student.task_uses={s.task_uses} time(s): {self._phase_tasks()} distinct tasks; drop "
                "examiner.task_set_size (it follows the phase) or change student.task_uses"]


# --------------------------------------------------------------------------------------------- loading


def _load_tree(path: Path, seen: tuple[Path, ...] = ()) -> Any:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: `extends` cycle through {' -> '.join(str(p) for p in seen)}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        top = yaml.safe_load(path.read_text(encoding="utf-8"))
        node = OmegaConf.create(top or {}) if isinstance(top, dict) or top is None else None
    except Exception as e:  # YAML syntax errors, unreadable files, keys OmegaConf refuses
        raise ConfigError(f"{path}: cannot parse YAML: {e}") from None
    if node is None:
        kind = "a list" if isinstance(top, list) else f"a single {type(top).__name__} value ({top!r:.60})"
        raise ConfigError(f"{path}: a config file must be a mapping of sections (e.g. `run:`, `model:`), "
                          f"but it holds {kind}")
    base = node.pop("extends", None) if OmegaConf.is_dict(node) else None
    if base is None:
        return node
    if not isinstance(base, str):
        raise ConfigError(f"{path}: `extends` must be a file path, got {base!r}")
    return _merge(_load_tree(path.parent / base, (*seen, path)), node, f"{path}: over its base {base}")


def _clash(a: Any, b: Any, head: str = "") -> str | None:
    """The first dotted key where `b` puts a list in place of a mapping or the reverse (what OmegaConf cannot
    merge), with what each holds."""
    if OmegaConf.is_dict(a) and OmegaConf.is_dict(b):
        for k in b:
            if k in a and (found := _clash(a[k], b[k], f"{head}{k}.")):
                return found
        return None
    kinds = [("a list" if OmegaConf.is_list(x) else "a mapping" if OmegaConf.is_dict(x) else None) for x in (a, b)]
    if None in kinds or kinds[0] == kinds[1]:
        return None
    return f"`{head.rstrip('.')}` must be {kinds[0]}, got {kinds[1]}"


def _merge(base: Any, top: Any, where: str) -> Any:
    try:
        return OmegaConf.merge(base, top)
    except (TypeError, ValueError) as e:  # OmegaConf: "Cannot merge incompatible container types"
        raise ConfigError(f"{where}: {_clash(base, top) or e}") from None


def _describe(err: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "<root>"
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "extra_forbidden":
        return f"`{key}`: unknown key (value {err['input']!r}); check the spelling against `piplay config show`"
    if kind == "literal_error":
        return f"`{key}`: got {err['input']!r}; allowed values: {ctx.get('expected')}"
    if kind == "value_error":  # a cross-field check: its message names the keys, the input is a whole section
        msg = str(ctx.get("error") or err["msg"])
        return msg if key == "<root>" else f"`{key}`: {msg}"
    return f"`{key}`: got {err['input']!r}; {err['msg'].lower()}"


def validate(data: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        lines = [_describe(err) for err in e.errors(include_url=False)]
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load `path` (or the defaults), merge its bases and dotted `key=value` overrides, and validate."""
    tree = _load_tree(Path(path)) if path else OmegaConf.create({})
    bad = [o for o in overrides if "=" not in o or not o.split("=", 1)[0].strip()]
    if bad:
        raise ConfigError(f"overrides must look like `section.key=value`, got: {', '.join(bad)}")
    dots = []
    for o in overrides:  # one at a time, so an unparsable value is named
        try:
            dots.append(OmegaConf.from_dotlist([o]))
        except Exception as e:  # YAML errors in the value (`x=[1,2`), OmegaConf key errors
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"override `{o}`: cannot parse the value ({first}); quote it, or write a "
                              f"complete YAML value such as [1, 2] or {{a: 1}}") from None
    merged = tree
    for o, dot in zip(overrides, dots, strict=True):
        merged = _merge(merged, dot, f"override `{o}`")
    try:
        data = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(f"`{key}`: {e.msg if hasattr(e, 'msg') else e}" if key else str(e)) from None
    return validate(data or {})


def dump_config(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(cfg.model_dump(mode="json")))
