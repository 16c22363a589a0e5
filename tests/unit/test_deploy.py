"""Deployment artefacts: cluster configs, their resource layout, the KubeRay manifests and the submit wrapper's
pure parts. No cluster needed; tests/integration/test_deploy_submit.py submits to a real local Ray head."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from helpers.runs import ROOT

from piplay_ray.cli import main as cli_main
from piplay_ray.cluster import layout as L
from piplay_ray.commands import submit as S
from piplay_ray.config import ConfigError, load_config

KUBERAY = ROOT / "deploy" / "kuberay"
CLUSTER_CONFIGS = sorted((ROOT / "configs" / "cluster").glob("qwen3-*.yaml"))
IMAGE_ROOT = "/app/"  # where deploy/Dockerfile puts the project


def manifests() -> dict[str, list[dict]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in sorted(KUBERAY.glob("*.yaml"))}


def ray_clusters() -> list[tuple[str, dict, dict]]:
    """(file, object, RayCluster spec) for every RayCluster and RayJob."""
    out = []
    for name, docs in manifests().items():
        for d in docs:
            if d["kind"] == "RayCluster":
                out.append((name, d, d["spec"]))
            elif d["kind"] == "RayJob":
                out.append((name, d, d["spec"]["rayClusterSpec"]))
    return out


def local_path(path: str) -> Path:
    assert path.startswith(IMAGE_ROOT), f"{path}: manifests name project files by their image path {IMAGE_ROOT}"
    return ROOT / path[len(IMAGE_ROOT):]


def config_args(argv: list[str]) -> tuple[Path, list[str]]:
    """The --config file and the dotted overrides of a `piplay ...` command line."""
    i = argv.index("--config")
    return local_path(argv[i + 1]), [a for a in argv[i + 2:] if "=" in a and not a.startswith("-")]


def gpus(container: dict) -> float:
    return float(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


# ------------------------------------------------------------------------------------------ layout (pure)


def test_layout_counts_match_hand_computed_values():
    cfg = load_config(None, [
        "learner.world_size=3", "learner.num_gpus_per_rank=2", "learner.num_cpus_per_rank=4",
        "rollout.workers_per_role=2", "rollout.num_gpus_per_worker=0.5", "rollout.tensor_parallel_size=4",
        "rollout.num_cpus_per_worker=3", "teacher.num_gpus=1", "teacher.num_cpus=2",
        "search.replicas=5", "search.num_cpus_per_replica=0.5",
    ])
    lay = L.layout(cfg)
    assert lay.learner_gpus == 6  # 3 ranks x 2
    assert lay.rollout_gpus == {"examiner": 4.0, "student": 4.0}  # 2 engines x TP 4 x 0.5
    assert lay.teacher_gpus == 1
    assert lay.total_gpus == 6 + 8 + 1
    assert lay.total_cpus == 12 + 2 * 6 + 2 + 2.5
    assert lay.placements == (2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 1.0)  # 3 ranks, 4 engines, teacher
    assert L.layout(cfg, roles=("student",)).total_gpus == 6 + 4 + 1


def test_fits_keeps_each_engine_on_one_node():
    cfg = load_config(None, ["learner.world_size=2", "learner.num_gpus_per_rank=1", "rollout.num_gpus_per_worker=1",
                             "rollout.tensor_parallel_size=4", "teacher.num_gpus=1"])
    lay = L.layout(cfg)  # placements 4, 4, 1, 1, 1 = 11 GPUs
    assert L.fits(lay, [8, 3])
    assert not L.fits(lay, [4, 3, 2, 2])  # 11 GPUs in all, but a TP-4 engine has nowhere to go
    assert not L.fits(lay, [8])


def test_cpu_configs_need_no_gpus():
    for name in ("local.yaml", "tiny.yaml"):
        assert L.layout(load_config(ROOT / "configs" / name)).total_gpus == 0


def test_layout_command_prints_json(capsys):
    assert L.main([str(CLUSTER_CONFIGS[0])]) == 0
    assert '"total_gpus": 7.0' in capsys.readouterr().out
    assert L.main([str(CLUSTER_CONFIGS[0]), "learner.world_size=0"]) == 2


# -------------------------------------------------------------------------------------------- cluster configs


@pytest.mark.parametrize("path", CLUSTER_CONFIGS + [ROOT / "configs/cluster/retriever-e5.yaml"], ids=lambda p: p.name)
def test_cluster_configs_validate_with_piplay_config_show(path, capsys):
    assert cli_main(["config", "show", "--config", str(path)]) == 0
    assert "mode: cluster" in capsys.readouterr().out


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=lambda p: p.name)
def test_cluster_config_layout(path):
    cfg = load_config(path)
    lay = L.layout(cfg)
    assert cfg.learner.zero_stage == 3 and cfg.weight_sync.transport == "collective"
    assert cfg.rollout.engine == "vllm" and cfg.teacher.backend == "vllm" and cfg.teacher.num_gpus >= 1
    assert cfg.search.retriever == "http" and cfg.run.root.startswith("/shared/")
    assert cfg.schedule.distill_lambda == [0.03, 0.003, 0.002] and cfg.teacher.ema_tau == 0.05
    assert cfg.examiner.hop_weights == [4, 3, 2, 1]
    # the GPU count documented in the config's header is the one the layout computes
    assert f"= {lay.total_gpus:g}." in path.read_text().split("extends:")[0]
    # Ray GPUs + the retriever's GPU fill whole 8-GPU nodes
    assert (lay.total_gpus + 1) % 8 == 0


def test_qwen3_8b_uses_tensor_parallel_engines():
    lay = L.layout(load_config(ROOT / "configs/cluster/qwen3-8b.yaml"))
    assert lay.rollout_gpus == {"examiner": 4.0, "student": 4.0} and 2.0 in lay.placements
    assert lay.total_gpus == 15


def test_qwen3_8b_lora_fits_one_node_with_the_schedule_of_qwen3_8b():
    """The LoRA config changes the layout and turns LoRA on; every other setting is qwen3-8b.yaml's."""
    lora = load_config(ROOT / "configs/cluster/qwen3-8b-lora.yaml")
    full = load_config(ROOT / "configs/cluster/qwen3-8b.yaml")
    lay = L.layout(lora)
    assert lora.learner.lora.rank > 0 and full.learner.lora.rank == 0
    assert (lay.learner_gpus, lay.rollout_gpus, lay.teacher_gpus) == (2, {"examiner": 2.0, "student": 2.0}, 1)
    assert lay.total_gpus == 7 and L.fits(lay, [7]) and not L.fits(lay, [6])
    changed = {"run": {"name"}, "rollout": {"workers_per_role", "tensor_parallel_size"},
               "learner": {"world_size", "lora"},
               "teacher": {"gpu_memory_utilization"}}  # an adapter EMA leaves vLLM a larger share
    a, b = lora.model_dump(), full.model_dump()
    for section in a:
        skip = changed.get(section, set())
        assert {k: v for k, v in a[section].items() if k not in skip} == \
            {k: v for k, v in b[section].items() if k not in skip}, section


# ------------------------------------------------------------------------------------------------- manifests


def test_manifests_parse_and_are_complete():
    docs = manifests()
    kinds = {d["kind"] for ds in docs.values() for d in ds}
    assert {"RayCluster", "RayJob", "Deployment", "Service", "Job", "PersistentVolumeClaim"} <= kinds
    configs = {d["metadata"]["annotations"]["piplay-ray/config"] for _, d, _ in ray_clusters()}
    assert configs == {p.relative_to(ROOT).as_posix() for p in CLUSTER_CONFIGS}


@pytest.mark.parametrize("name,obj", [(n, o) for n, o, _ in ray_clusters()], ids=lambda x: x if isinstance(x, str) else "")
def test_ray_manifest_requests_the_gpus_its_config_uses(name, obj):
    spec = obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]
    cfg_path = ROOT / obj["metadata"]["annotations"]["piplay-ray/config"]
    overrides: list[str] = []
    if obj["kind"] == "RayJob":
        argv = shlex.split(obj["spec"]["entrypoint"])
        assert argv[:2] == ["piplay", "train"]
        entry_cfg, overrides = config_args(argv)
        assert entry_cfg == cfg_path
    cfg = load_config(cfg_path, overrides)
    lay = L.layout(cfg)

    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert all(gpus(c) == 0 for c in head["template"]["spec"]["containers"])
    pods, cpus = [], float(head["rayStartParams"]["num-cpus"])
    for group in spec["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        per_pod = gpus(container)
        assert group["rayStartParams"]["num-gpus"] == f"{per_pod:g}", f"{name}: Ray must see the pod's GPUs"
        assert container["resources"]["requests"]["nvidia.com/gpu"] == container["resources"]["limits"]["nvidia.com/gpu"]
        assert group["minReplicas"] == group["replicas"] == group["maxReplicas"]
        pods += [per_pod] * group["replicas"]
        cpus += float(group["rayStartParams"]["num-cpus"]) * group["replicas"]
        assert per_pod <= 8
    assert sum(pods) == lay.total_gpus, f"{name}: pods request {sum(pods)} GPUs, {cfg_path.name} uses {lay.total_gpus}"
    assert L.fits(lay, pods), f"{name}: some tensor-parallel engine fits on no worker pod"
    assert cpus >= lay.total_cpus

    # every Ray pod mounts the shared volume where the config writes runs and checkpoints
    volumes = {v["name"]: v for v in head["template"]["spec"]["volumes"]}
    assert volumes["shared"]["persistentVolumeClaim"]["claimName"] == "piplay-shared"
    for pod in [head, *spec["workerGroupSpecs"]]:
        (container,) = pod["template"]["spec"]["containers"]
        assert {"name": "shared", "mountPath": "/shared"} in container["volumeMounts"]


def test_rayjob_and_raycluster_agree():
    by_config: dict[str, list[dict]] = {}
    for _, obj, spec in ray_clusters():
        by_config.setdefault(obj["metadata"]["annotations"]["piplay-ray/config"], []).append(spec)
    for specs in by_config.values():
        assert len(specs) == 2 and specs[0] == specs[1]


def test_retriever_service_matches_cluster_configs():
    docs = {d["kind"]: d for d in manifests()["retriever.yaml"]}
    svc, dep, job = docs["Service"], docs["Deployment"], docs["Job"]
    port = svc["spec"]["ports"][0]["port"]
    url = f"http://{svc['metadata']['name']}:{port}"
    for path in CLUSTER_CONFIGS:
        assert load_config(path).search.url == url
    assert svc["spec"]["selector"] == dep["spec"]["template"]["metadata"]["labels"]

    (server,) = dep["spec"]["template"]["spec"]["containers"]
    argv = server["command"]
    assert argv[:3] == ["piplay", "retriever", "serve"] and argv[argv.index("--port") + 1] == str(port)
    cfg_path, overrides = config_args(argv)
    search = load_config(cfg_path, overrides).search
    assert search.retriever == "dense" and search.encoder == "intfloat/e5-base-v2"
    assert search.query_prefix == "query: " and search.passage_prefix == "passage: "
    assert search.corpus.endswith("wiki-18.jsonl") and search.corpus.startswith("/shared/")
    assert search.index_dir in dep["spec"]["template"]["spec"]["initContainers"][0]["command"][-1]

    (indexer,) = job["spec"]["template"]["spec"]["containers"]
    assert indexer["command"][:3] == ["piplay", "retriever", "index"]
    assert config_args(indexer["command"]) == (cfg_path, overrides)
    assert search.corpus in job["spec"]["template"]["spec"]["initContainers"][0]["args"][0]
    claims = {d["metadata"]["name"] for d in manifests()["storage.yaml"]}
    for pod in (dep, job):
        vols = pod["spec"]["template"]["spec"]["volumes"]
        assert {"name": "shared", "persistentVolumeClaim": {"claimName": "piplay-shared"}} in vols
        assert "piplay-shared" in claims


def test_slurm_script_is_valid_bash_and_names_real_files():
    script = ROOT / "deploy/slurm/piplay.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "configs/cluster/retriever-e5.yaml" in text and (ROOT / "configs/cluster/retriever-e5.yaml").is_file()
    assert "deploy/submit.sh" in text and "piplay_ray.cluster.layout" in text


def _sbatch(tmp_path: Path, python: str, env: dict) -> subprocess.CompletedProcess:
    """Run piplay.sbatch for qwen3-8b on a pretend two-node allocation: srun, scontrol and sleep are stubs."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    stubs = {"scontrol": "printf 'n1\\nn2\\n'", "sleep": "exit 0",
             "srun": 'case "$*" in *hostname*) echo 10.0.0.1;; esac'}
    for name, body in stubs.items():
        (bin_ / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_ / name).chmod(0o755)
    env = {"PATH": f"{bin_}:/usr/bin:/bin", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_GPUS_ON_NODE": "8",
           "SLURM_JOB_ID": "1", "SLURM_SUBMIT_DIR": str(ROOT), "PYTHON": python, **env}
    return subprocess.run(["bash", str(ROOT / "deploy/slurm/piplay.sbatch"), "configs/cluster/qwen3-8b.yaml"],
                          env=env, capture_output=True, text=True, timeout=120)


def test_slurm_refuses_a_python_without_cuda_torch(tmp_path):
    out = _sbatch(tmp_path, sys.executable, {})  # the CPU build the tests run on
    assert out.returncode == 2 and "no CUDA build of torch" in out.stderr and "make setup-gpu" in out.stderr


def test_slurm_fails_when_nodes_do_not_join_in_time(tmp_path):
    """A Ray cluster that only ever shows one node's GPUs: the script stops with a reason, never submits."""
    fake = tmp_path / "python"
    fake.write_text(f"""#!/bin/bash
case "$*" in
  *"import sys, torch"*) exit 0;;
  *ray.init*) echo 7;;
  *) exec {sys.executable} "$@";;
esac
""")
    fake.chmod(0o755)
    out = _sbatch(tmp_path, str(fake), {"JOIN_TIMEOUT_S": "0"})
    assert out.returncode == 3, out.stderr
    assert "Ray sees 7 of the 15 GPUs on nodes n1 n2" in out.stderr and "submit" not in out.stdout


# ------------------------------------------------------------------------------------- submit wrapper (pure)


def test_train_entrypoint_runs_the_uploaded_package_in_cluster_mode():
    cmd = S.train_entrypoint("configs/tiny.yaml", ["run.name=a b", "student.group_size=4"])
    assert shlex.split(cmd) == ["python", "-m", "piplay_ray", "train", "--config", "configs/tiny.yaml",
                                "run.mode=cluster", "run.name=a b", "student.group_size=4"]


def test_runtime_env_excludes_venv_and_runs_and_forwards_env(monkeypatch, tmp_path):
    for key in S.FORWARDED_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PIPLAY_HOME", "/data/piplay")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    env = S.runtime_env(tmp_path, {"X": "1"}, ["vllm>=0.10"], ["big/"])
    assert env["working_dir"] == str(tmp_path)
    assert {".venv/", ".git/", "runs/", "big/"} <= set(env["excludes"])
    assert env["env_vars"] == {"PIPLAY_HOME": "/data/piplay", "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1",
                               "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1", "X": "1"}
    assert env["pip"] == ["vllm>=0.10"]
    assert "pip" not in S.runtime_env(tmp_path)


def test_config_must_be_inside_the_uploaded_folder(tmp_path):
    assert S.config_in_project(ROOT / "configs/tiny.yaml", ROOT) == "configs/tiny.yaml"
    assert S.config_in_project("configs/cluster/qwen3-4b.yaml", ROOT) == "configs/cluster/qwen3-4b.yaml"
    outside = tmp_path / "mine.yaml"
    outside.write_text("run: {name: x}\n")
    with pytest.raises(S.SubmitError, match="outside the uploaded working directory"):
        S.config_in_project(outside, ROOT)
    with pytest.raises(S.SubmitError, match="not found"):
        S.config_in_project(ROOT / "configs/nope.yaml", ROOT)


def test_parse_env_and_pip(monkeypatch, tmp_path):
    monkeypatch.setenv("FOO", "bar")
    assert S.parse_env(["A=1=2", "FOO"]) == {"A": "1=2", "FOO": "bar"}
    for bad in (["=1"], ["NOT_SET_ANYWHERE_42"], ["a-b=1"]):
        monkeypatch.delenv("NOT_SET_ANYWHERE_42", raising=False)
        with pytest.raises(S.SubmitError):
            S.parse_env(bad)
    req = tmp_path / "req.txt"
    req.write_text("# comment\nvllm>=0.10  # engine\n\nfaiss-cpu\n")
    assert S.parse_pip([str(req), "numpy"]) == ["vllm>=0.10", "faiss-cpu", "numpy"]


def test_submit_rejects_a_bad_config_before_contacting_any_cluster():
    """An unknown key fails locally with the config error (exit 2), even with no Ray head at the address."""
    proc = subprocess.run(
        [str(ROOT / "deploy/submit.sh"), "--address", "http://127.0.0.1:9", "--config", "configs/tiny.yaml",
         "student.group_sise=3"],
        capture_output=True, text=True, timeout=60, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2, proc.stderr
    assert "student.group_sise" in proc.stderr and "unknown key" in proc.stderr
    with pytest.raises(ConfigError):
        S.submit(ROOT / "configs/tiny.yaml", ["learner.zero_stage=7"], address="http://127.0.0.1:9")


# ------------------------------------------------------------------------------------ teacher, shared memory


def test_teacher_parallelism_beyond_its_gpus_is_refused_naming_both_keys():
    from piplay_ray.config import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/cluster/qwen3-8b.yaml", ["teacher.tensor_parallel_size=2"])
    assert "teacher.tensor_parallel_size" in str(e.value) and "teacher.num_gpus" in str(e.value)
    ok = load_config(ROOT / "configs/cluster/qwen3-8b.yaml", ["teacher.tensor_parallel_size=2", "teacher.num_gpus=2"])
    # a one-GPU engine may take a fraction of a shared GPU (make gpu-check), a tensor-parallel one may not
    assert load_config(ROOT / "configs/tiny.yaml", ["teacher.num_gpus=0.2"]).teacher.num_gpus == 0.2
    with pytest.raises(ConfigError):
        load_config(ROOT / "configs/tiny.yaml", ["teacher.num_gpus=1.5", "teacher.tensor_parallel_size=2"])
    assert L.layout(ok).teacher_gpus == 2 and 2.0 in L.layout(ok).placements


def test_shared_memory_estimate_matches_hand_computed_values():
    from piplay_ray.cluster import host_memory as H

    cfg = load_config(ROOT / "configs/tiny.yaml", ["rollout.workers_per_role=2"])  # CPU learner: fp32 weights
    parts = H.shared_memory(cfg, 1e9)
    assert parts["weight_bundles"] == 2 * 4e9 and parts["vllm_reload_files"] == 2 * 4e9
    assert parts["total"] == 16e9 + H.HEADROOM  # the teacher's EMA snapshot is a file, not in /dev/shm
    coll = H.shared_memory(load_config(ROOT / "configs/tiny.yaml", ["weight_sync.transport=collective"]), 1e9)
    assert "weight_bundles" not in coll and coll["total"] == H.HEADROOM


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=lambda p: p.name)
def test_manifests_give_the_shared_memory_their_config_needs(path, capsys):
    from piplay_ray.cluster import host_memory as H

    cfg = load_config(path)
    need = H.shared_memory(cfg, H.param_count(cfg))["total"]
    given = H.manifest_memory(path)
    gpu = {k: v for k, v in given.items() if not k.endswith(":head")}
    assert gpu and all(v["object_store"] >= need and v["dev_shm"] >= v["object_store"] for v in gpu.values())
    assert all(v["object_store"] is not None for v in given.values())  # the head's is set too
    assert L.main([str(path)]) == 0
    out = json.loads(capsys.readouterr().out)["shared_memory"]
    assert out["need_gib_per_node"]["total"] == round(need / H.GiB, 2) and out["manifests_gib"]


# ------------------------------------------------------------------------------------------ schedule table


def test_the_schedule_table_in_the_docs_is_what_the_cluster_configs_say():
    """docs/cluster.md compares the paper, Dr. Zero and the configs; its config columns must be the truth."""
    text = (ROOT / "docs" / "cluster.md").read_text()
    section = text.split("## Schedules:", 1)[1].split("\n## ", 1)[0]
    table = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()
             if line.startswith("| ")]
    names, rows = table[0][4:], [r for r in table[1:] if "`" in r[3]]  # header: setting, paper, Dr. Zero, key
    configs = {p.stem: load_config(p) for p in CLUSTER_CONFIGS}
    assert len(rows) >= 15 and sorted(names) == sorted(configs)  # a column per shipped cluster config
    for setting, _paper, _drzero, key, *values in rows:
        for name, shown in zip(names, values, strict=True):
            value = configs[name]
            for part in key.strip("`").split("."):
                value = getattr(value, part)
            assert str(value) == shown, f"{setting}: {name} has {key}={value}, the table says {shown}"


def test_the_shared_volume_holds_a_run_of_each_cluster_config():
    """storage.py by hand for Qwen3-8B in bf16: per checkpoint 2 roles x (2 + 2 + 12) + 4 bytes per parameter,
    keep + 1 = 4 of them at the peak (the newest is written before the oldest goes); beside them the teacher's
    float32 snapshot."""
    from piplay_ray.cluster import storage

    cfg = load_config(ROOT / "configs/cluster/qwen3-8b.yaml")
    assert storage.checkpoint_bytes(cfg, 1e9) == 36e9 and cfg.checkpoint.keep == 3
    assert storage.need(cfg, 1e9)["checkpoints"] == 4 * 36e9
    assert storage.need(cfg, 1e9)["teacher_snapshot"] == 4e9
    wiki18 = 21_015_324
    assert storage.corpus_bytes("/absent/wiki-18.jsonl") == (wiki18 * 700, wiki18 * 768 * 4)
    volume = storage.claimed()
    for path in CLUSTER_CONFIGS:
        cfg = load_config(path)
        need = storage.need(cfg, storage.param_count(cfg))
        assert need["total"] <= volume, f"{path.name} needs {need['total'] / 2**30:.0f} GiB of {volume / 2**30:.0f}"


# ------------------------------------------------------------------ CUDA of the image, FusedAdam, gpu-check

DOCKERFILE = ROOT / "deploy" / "Dockerfile"
# CUDA of the torch wheel PyPI serves for a torch line (what `make setup-gpu` installs): the image must run the same.
# torch 2.11-2.13 publish CUDA 13.0 to PyPI (12.6 and 13.2 from PyTorch's own index); 2.14 moves to 13.2.
PYPI_TORCH_CUDA = {"2.13": "13.0"}

NVCC_13_0 = """nvcc: NVIDIA (R) Cuda compiler driver
Copyright (c) 2005-2025 NVIDIA Corporation
Built on Wed_Aug_20_01:58:59_PM_PDT_2025
Cuda compilation tools, release 13.0, V13.0.88
Build cuda_13.0.r13.0/compiler.36424714_0
"""
NVCC_12_1 = """nvcc: NVIDIA (R) Cuda compiler driver
Copyright (c) 2005-2023 NVIDIA Corporation
Built on Tue_Feb__7_19:32:13_PST_2023
Cuda compilation tools, release 12.1, V12.1.66
Build cuda_12.1.r12.1/compiler.32415258_0
"""
NVCC_11_8 = """nvcc: NVIDIA (R) Cuda compiler driver
Copyright (c) 2005-2022 NVIDIA Corporation
Built on Wed_Sep_21_10:33:58_PDT_2022
Cuda compilation tools, release 11.8, V11.8.89
Build cuda_11.8.r11.8/compiler.31833905_0
"""


def gpu_check():
    spec = importlib.util.spec_from_file_location("bench_gpu_check", ROOT / "bench" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def dockerfile() -> tuple[dict[str, str], str, list[tuple[str, str]]]:
    """(ARG defaults, the resolved FROM image, the instructions after FROM with ${ARG}s resolved)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = [tuple((line.split(None, 1) + [""])[:2]) for line in text.splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]
    args: dict[str, str] = {}

    def resolve(s: str) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], s)

    image, after = None, []
    for op, rest in instructions:
        if op == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args[name] = resolve(value.strip('"'))
        elif op == "FROM":
            image = resolve(rest)
        elif image is not None:
            after.append((op, resolve(rest)))
    return args, image, after


def cuda_of_tag(tag: str) -> str:
    """"13.0" from a Ray / PyTorch-index CUDA tag "cu130" (cu + major + one-digit minor)."""
    m = re.fullmatch(r"cu(\d+)(\d)", tag)
    assert m, f"{tag!r} is not a cuXYZ CUDA tag"
    return f"{int(m[1])}.{m[2]}"


def test_nvcc_release_parses_real_nvcc_output():
    g = gpu_check()
    assert g.nvcc_release(NVCC_13_0) == "13.0"
    assert g.nvcc_release(NVCC_12_1) == "12.1"
    assert g.nvcc_release(NVCC_11_8) == "11.8"
    assert g.nvcc_release("") is None
    assert g.nvcc_release("sh: 1: nvcc: not found") is None
    assert g.major_minor("12.8.1") == (12, 8) and g.major_minor("V13.0.88") == (13, 0)
    assert g.major_minor(None) is None and g.major_minor("unknown") is None


def test_cuda_mismatch_names_both_versions():
    g = gpu_check()
    assert g.cuda_mismatch("13.0", g.nvcc_release(NVCC_13_0)) is None
    warning = g.cuda_mismatch("13.0", g.nvcc_release(NVCC_12_1))
    assert warning and warning.startswith("WARNING") and "12.1" in warning and "13.0" in warning
    assert "FusedAdam" in warning
    assert g.cuda_mismatch("13.0", "13.2")  # the minor counts: DeepSpeed accepts no other CUDA 13 minor
    assert g.cuda_mismatch("12.8", "11.8")
    # nothing to compare: a CPU build of torch, or no nvcc
    assert g.cuda_mismatch(None, "13.0") is None and g.cuda_mismatch("13.0", None) is None


def test_find_nvcc_looks_where_torch_does(tmp_path):
    g = gpu_check()
    which = {"nvcc": "/opt/bin/nvcc"}.get
    assert g.find_nvcc({"CUDA_HOME": "/usr/local/cuda-12.1"}, which) == "/usr/local/cuda-12.1/bin/nvcc"
    assert g.find_nvcc({"CUDA_PATH": "/cuda"}, which) == "/cuda/bin/nvcc"
    assert g.find_nvcc({}, which) == "/opt/bin/nvcc"
    assert g.find_nvcc({}, lambda _: None, default=str(tmp_path / "nvcc")) is None
    (tmp_path / "nvcc").write_text("")
    assert g.find_nvcc({}, lambda _: None, default=str(tmp_path / "nvcc")) == str(tmp_path / "nvcc")


def test_driver_version_and_fused_adam_prebuilt_parse():
    g = gpu_check()
    assert g.driver_version("580.95.05\n") == "580.95.05"
    assert g.driver_version("580.95.05\n580.95.05\n") == "580.95.05"  # one line per GPU
    assert g.driver_version("") is None
    assert g.driver_version("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.") is None
    built = ("version='0.19.8'\ninstalled_ops={'cpu_adam': False, 'fused_adam': 1, 'pin_memory': False}\n"
             "accelerator_name='cuda'\ntorch_info={'version': '2.13', 'cuda_version': '13.0'}\n")
    assert g.fused_adam_prebuilt(built) is True
    assert g.fused_adam_prebuilt(built.replace("'cuda'", "'cpu'")) is False  # built while DeepSpeed saw no GPU
    assert g.fused_adam_prebuilt(built.replace("'fused_adam': 1", "'fused_adam': False")) is False
    assert g.fused_adam_prebuilt("installed_ops={broken\n") is False


def test_version_report_lines():
    g = gpu_check()
    lines = g.version_report({"torch_cuda": "13.0", "nvcc": "12.1", "driver": "580.95.05",
                              "fused_adam_prebuilt": False})
    assert lines[:3] == ["torch CUDA: 13.0", "nvcc: release 12.1", "driver: 580.95.05"]
    assert lines[-1].startswith("WARNING: nvcc is CUDA 12.1 but torch is built for CUDA 13.0")
    bare = g.version_report({"torch_cuda": None, "nvcc": None, "driver": None, "fused_adam_prebuilt": None})
    assert bare == ["torch CUDA: none (a CPU build of torch, or no torch)", "nvcc: not found", "driver: no driver"]


def test_gpu_check_prints_versions_and_warns_without_a_gpu(tmp_path, monkeypatch, capsys):
    """No GPU here: gpu-check still reports the CUDA stack (fake nvcc 12.1 and nvidia-smi on PATH, torch said to
    be CUDA 13.0) with the mismatch warning, then stops with exit 2 and its JSON line."""
    import torch

    for name, out in {"nvcc": NVCC_12_1, "nvidia-smi": "580.95.05\n"}.items():
        (tmp_path / name).write_text(f"#!/bin/sh\ncat <<'X'\n{out}X\n")
        (tmp_path / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check().main([]) == 2
    out = capsys.readouterr()
    assert f"gpu-check: nvcc: release 12.1 ({tmp_path}/nvcc)" in out.err and "gpu-check: driver: 580.95.05" in out.err
    assert "WARNING: nvcc is CUDA 12.1 but torch is built for CUDA 13.0" in out.err
    row = json.loads(out.out)
    assert row["ok"] is False and row["versions"]["nvcc"] == "12.1" and row["versions"]["torch_cuda"] == "13.0"

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no nvidia-smi, and no nvcc where torch would look
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "no-cuda"))
    assert gpu_check().main([]) == 2
    err = capsys.readouterr().err
    assert "gpu-check: nvcc: not found" in err and "gpu-check: driver: no driver" in err and "WARNING" not in err


def test_dockerfile_builds_fused_adam_with_the_cuda_of_torch():
    """One CUDA (ARG CUDA) picks the devel base; it is the CUDA of the `gpu` extra's torch from the default
    index, and DeepSpeed is installed with FusedAdam built for it, checked after the last install."""
    args, image, steps = dockerfile()
    cuda = cuda_of_tag(args["CUDA"])
    # the base: Ray's image of that CUDA (Ray builds -cuXYZ images on nvidia/cuda:X.Y.Z-...devel, so nvcc is there)
    m = re.fullmatch(r"rayproject/ray:[\w.]+-py\d+-(cu\d+)", image)
    assert m, f"the base {image} is not a Ray CUDA image (Ray's -gpu alias is CUDA 12.1)"
    assert cuda_of_tag(m[1]) == cuda
    runs = [rest for op, rest in steps if op == "RUN"]
    (torch_run,) = [r for r in runs if '"torch==' in r]
    assert "--index-url" not in torch_run  # the default index's torch: its CUDA is PYPI_TORCH_CUDA's (below)
    # torch is the `gpu` extra's pin, and the image's CUDA is that torch's CUDA on PyPI
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (gpu_torch,) = [r for r in project["optional-dependencies"]["gpu"] if r.startswith("torch")]
    assert f'"torch=={args["TORCH"]}"' in torch_run and gpu_torch == f"torch=={args['TORCH']}"
    line = ".".join(args["TORCH"].split(".")[:2])
    assert line in PYPI_TORCH_CUDA, f"torch {line}: add the CUDA of its PyPI wheel to PYPI_TORCH_CUDA"
    assert cuda == PYPI_TORCH_CUDA[line], f"the image is CUDA {cuda}, torch {line} on PyPI CUDA {PYPI_TORCH_CUDA[line]}"
    # FusedAdam built at install, for CUDA (no GPU at build), against the torch above, for A100 and H100/H200
    (ds_run,) = [r for r in runs if "DS_BUILD_FUSED_ADAM" in r]
    assert "DS_BUILD_FUSED_ADAM=1" in ds_run and "DS_ACCELERATOR=cuda" in ds_run
    assert "--no-build-isolation" in ds_run and "--no-binary deepspeed" in ds_run
    (ds_req,) = [r for r in project["dependencies"] if r.startswith("deepspeed")]
    assert f'"{ds_req}"' in ds_run
    assert runs.index(torch_run) < runs.index(ds_run)
    archs = args["TORCH_CUDA_ARCH_LIST"].split(";")
    assert {"8.0", "9.0"} <= set(archs)
    assert all(re.fullmatch(r"\d+\.\d+(\+PTX)?", a) for a in archs), "DeepSpeed's builder cannot parse 9.0a"
    # the nvcc of the base is torch's CUDA, checked before compiling
    (nvcc_run,) = [r for r in runs if "nvcc --version" in r]
    assert "torch.version.cuda" in nvcc_run and runs.index(nvcc_run) < runs.index(ds_run)
    # the prebuilt op is loaded at build, after the last pip install (which could replace DeepSpeed)
    last_pip = max(i for i, r in enumerate(runs) if "pip install" in r)
    assert "FusedAdamBuilder().load()" in runs[-1] and "installed_ops" in runs[-1] and last_pip < len(runs) - 1
