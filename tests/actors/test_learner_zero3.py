"""ZeRO-3 with the idle role offloaded, on two CPU ranks (gloo): real Ray actors, real DeepSpeed, the tiny model.

The examiner and the student alternate, so every step first reloads its role and offloads the other
(`LearnerWorker.activate`); publishing, exporting, saving and loading an idle role bring it back for the call.
On CPU DeepSpeed's offload and reload bookkeeping runs but no bytes cross a bus (see `learner/offload.py`);
pinned host buffers and the transfers themselves run only on a GPU. The reference is the same steps under
ZeRO-2 with nothing offloaded, on two ranks too.
"""

from __future__ import annotations

import pytest
import ray
import torch
from helpers.learner import W_ATOL, experience_batch, learner_config, load_model
from transformers import AutoModelForCausalLM

from piplay_ray.learner.learner import LearnerGroup

# Adam moves each weight by about lr a step; ZeRO-3 and ZeRO-2 sum gradients in different orders, so weights agree to 1% of lr and losses and gradient norms to 1e-4 relative.
SCHEDULE = [("examiner", 31), ("student", 32), ("examiner", 33), ("student", 34)]  # every step switches role


def _group(tiny_model, stage: int, offload: bool) -> LearnerGroup:
    cfg = learner_config(tiny_model, **{"learner.world_size": 2, "learner.zero_stage": stage,
                              "learner.offload_inactive": offload})
    return LearnerGroup(cfg, roles=("examiner", "student"))


RAY_CPUS = 4


@pytest.fixture(scope="module")
def runs(ray_local, tiny_model):
    """Both groups run the same alternating schedule; the metrics of every step are kept."""
    z3 = _group(tiny_model, 3, offload=True)
    z2 = _group(tiny_model, 2, offload=False)
    steps = {"z3": [], "z2": []}
    offloaded = []  # after each ZeRO-3 step: (idle role's states, active role's states) on every rank
    for role, seed in SCHEDULE:
        exps = experience_batch(role, seed=seed, n=6)
        steps["z3"].append(z3.train_step(role, exps))
        steps["z2"].append(z2.train_step(role, exps))
        idle = "student" if role == "examiner" else "examiner"
        offloaded.append([ray.get([w.offloaded_states.remote(idle), w.offloaded_states.remote(role)])
                          for w in z3.workers])
    yield {"z3": z3, "z2": z2, "steps": steps, "offloaded": offloaded}
    z3.shutdown()
    z2.shutdown()


def test_alternating_zero3_offload_steps_match_zero2(runs, tiny_model):
    z3, z2 = runs["z3"], runs["z2"]
    for m3, m2 in zip(runs["steps"]["z3"], runs["steps"]["z2"], strict=True):
        assert m3["micro_batches"] >= 2 and m3["tokens"] == m2["tokens"]
        assert m3["loss"] == pytest.approx(m2["loss"], rel=1e-4, abs=1e-6)
        assert m3["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-4) and m3["grad_norm"] > 0
        assert m3["version"] == m2["version"]
    assert z3.version("examiner") == z3.version("student") == 2
    base = dict(load_model(tiny_model).named_parameters())
    for role in ("examiner", "student"):
        w3, w2 = z3.state_dict(role), z2.state_dict(role)
        assert set(w3) == set(w2) == set(base)
        for name, t in w3.items():
            assert t.shape == base[name].shape, name  # gathered, not a rank's partition
            assert (w2[name] - base[name]).abs().max() > 0, name  # the comparison is not trivially equal
            torch.testing.assert_close(t, w2[name], atol=W_ATOL, rtol=0)


def test_idle_role_is_offloaded_and_the_active_one_resident(runs):
    # ZeRO-3 with torch's AdamW: the fp32 master weights and Adam moments stay (DeepSpeed moves them only
    # for its FusedAdam), and so do the weights' partitions (a publish gathers them); the gradient
    # partitions and gradient buckets go
    moved = {"lp_grads", "contiguous_grad_buffer"}
    for per_rank in runs["offloaded"]:
        assert len(per_rank) == 2
        for idle, active in per_rank:
            assert set(idle) == moved and active == []
    for w in runs["z2"].workers:  # offload_inactive=false offloads nothing
        assert ray.get(w.offloaded_states.remote("examiner")) == ray.get(w.offloaded_states.remote("student")) == []


def test_zero3_publish_and_export_gather_full_parameters(runs, tiny_model, tmp_path):
    z3, z2 = runs["z3"], runs["z2"]
    hf = dict(load_model(tiny_model).named_parameters())
    for role in ("student", "examiner"):  # the active role, then the offloaded one
        b3, b2 = z3.weights(role), z2.weights(role)
        got, want = dict(b3.named_tensors()), dict(b2.named_tensors())
        assert b3.version == b2.version == 2 and b3.meta["role"] == role
        assert set(got) == set(want) == set(hf) and b3.nbytes == b2.nbytes
        for name, t in got.items():
            assert t.shape == hf[name].shape, name
            torch.testing.assert_close(t, want[name], atol=W_ATOL, rtol=0)
        z3.export_hf(role, tmp_path / role)
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / role, dtype=torch.float32)
        sd3 = z3.state_dict(role)
        for name, p in exported.named_parameters():
            assert torch.equal(p.detach(), sd3[name]), name
            assert torch.equal(got[name], sd3[name]), name
    # training after publishing the idle role (a gather while it was offloaded) still matches ZeRO-2
    exps = experience_batch("student", seed=35, n=6)
    m3, m2 = z3.train_step("student", exps), z2.train_step("student", exps)
    assert m3["loss"] == pytest.approx(m2["loss"], rel=1e-4, abs=1e-6)
    w3, w2 = z3.state_dict("student"), z2.state_dict("student")
    for name, t in w3.items():
        torch.testing.assert_close(t, w2[name], atol=W_ATOL, rtol=0)


def test_zero3_checkpoint_with_an_offloaded_role_resumes_exactly(runs, tmp_path):
    z3 = runs["z3"]
    z3.activate("student")  # the examiner is offloaded while both are saved and loaded
    path = z3.save(tmp_path / "ck", driver_state={"note": "z3"})
    versions = {r: z3.version(r) for r in ("examiner", "student")}
    opts = [ray.get(w.optimizer_state.remote("student")) for w in z3.workers]
    exps = {r: experience_batch(r, seed=40 + i, n=6) for i, r in enumerate(("student", "examiner"))}
    z3.train_step("student", exps["student"])
    z3.train_step("examiner", exps["examiner"])
    after = {r: z3.state_dict(r) for r in ("examiner", "student")}
    assert z3.load(path) == {"note": "z3"}
    assert {r: z3.version(r) for r in versions} == versions
    for w, saved in zip(z3.workers, opts, strict=True):  # each rank restores its own optimizer partition
        now = ray.get(w.optimizer_state.remote("student"))
        assert now.keys() == saved.keys() and now
        assert all(torch.equal(torch.as_tensor(now[k]), torch.as_tensor(saved[k])) for k in saved)
    z3.train_step("student", exps["student"])
    z3.train_step("examiner", exps["examiner"])
    for r in ("examiner", "student"):
        for name, t in z3.state_dict(r).items():
            assert torch.equal(t, after[r][name]), (r, name)


def test_publishing_the_idle_role_brings_none_of_its_states_back(runs):
    z3, (active, _) = runs["z3"], SCHEDULE[-1]
    idle = "student" if active == "examiner" else "examiner"
    z3.activate(idle)
    z3.activate(active)  # the idle role goes to host memory (whatever the tests before did)
    before = ray.get([w.reloads.remote(idle) for w in z3.workers])
    states = ray.get([w.offloaded_states.remote(idle) for w in z3.workers])
    assert all(states)  # it is offloaded
    assert z3.weights(idle).version == z3.version(idle)  # gathered and published
    assert z3.state_dict(idle)  # and gathered again for an export
    assert ray.get([w.reloads.remote(idle) for w in z3.workers]) == before  # without a reload
    assert ray.get([w.offloaded_states.remote(idle) for w in z3.workers]) == states
