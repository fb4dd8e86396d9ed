"""The train loop end to end on tiny random targets: families, resume after kill -9, torchrun
parity, fp32 cache == online, checkpoints loadable without the trainer, clear errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from draftsmith.train.metrics import read_metrics
from draftsmith.utils.io import InputError
from train_fixtures import VOCAB, make_data, make_recipe, make_target_dir


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return {"root": root, "data": make_data(root / "data.jsonl"),
            "llama": make_target_dir(root, "llama"), "qwen3": make_target_dir(root, "qwen3"),
            "gemma": make_target_dir(root, "gemma")}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "draftsmith.cli", *args]


def train_cmd(recipe: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return cli("train", "--recipe", str(recipe), "--data", str(data), "--out", str(out), "--no-progress", *extra)


def losses(run: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["train/loss"]) for m in read_metrics(run) if "train/loss" in m]


@pytest.mark.parametrize("family,drafter", [("llama", "dspark"), ("qwen3", "dflash"), ("gemma", "dspark"),
                                            ("qwen3", "eagle3"), ("llama", "eagle3")])
def test_tiny_targets_train_and_checkpoint_loads(world, tmp_path, family, drafter):
    from draftsmith.models.io import load_draft
    from draftsmith.drafters import train
    from draftsmith.train.recipe import load_recipe

    recipe = load_recipe(str(make_recipe(tmp_path / "r.yaml", world[family], drafter)), ["train.max_steps=8"])
    final = train(recipe, str(world["data"]), tmp_path / "run", progress=False)
    assert final.name == "step_8" and (tmp_path / "run" / "step_latest").resolve() == final
    curve = losses(tmp_path / "run")
    assert len(curve) == 8 and curve[-1][1] < curve[0][1]
    metrics = read_metrics(tmp_path / "run")
    assert any("eval/tau_sim" in m for m in metrics)
    draft = load_draft(final)
    assert draft.config.drafter == drafter


def test_kill9_resume_reproduces_the_loss_curve(world, tmp_path):
    recipe = make_recipe(tmp_path / "r.yaml", world["llama"], "dspark",
                         train={"epochs": 40, "checkpoint_every": 3, "eval_every": 5, "max_steps": 90})
    ref = tmp_path / "ref"
    subprocess.run(train_cmd(recipe, world["data"], ref), check=True, timeout=600)
    run = tmp_path / "run"
    # the killed and resumed run stream their samples from disk (data.stream) and make their
    # batches on the prefetch thread (off by default on a CPU): the same batches in the same
    # order, so the same curve as the in-memory reference
    both = ("--set", "train.prefetch=true", "--set", "data.stream=true")
    proc = subprocess.Popen(train_cmd(recipe, world["data"], run, *both))
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "step_9").exists():
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "step_90").exists(), "the kill should land mid-run"
    subprocess.run(train_cmd(recipe, world["data"], run, *both), check=True, timeout=600)
    # bitwise: a resume replays the same computation (same machine, train.threads = 1 in every process)
    assert losses(run) == losses(ref)
    assert len(losses(ref)) == 90
    ev = lambda r: [(m["step"], m["eval/tau_sim"]) for m in read_metrics(r) if "eval/tau_sim" in m]  # noqa: E731
    assert ev(run) == ev(ref)
    assert (run / "samples" / "manifest.json").is_file() and not (ref / "samples").exists()
    state = torch.load(run / "step_latest" / "training_state.pt", weights_only=True)
    n = json.loads((run / "data.json").read_text())["train_records"]
    assert state["data_position"] == {"samples_seen": 90 * 4, "samples": n, "epoch": 90 * 4 // n, "seed": 0}


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_torchrun_two_processes_match_one(world, tmp_path, parallel):
    recipe = make_recipe(tmp_path / "r.yaml", world["qwen3"], "dspark",
                         train={"max_steps": 10, "eval_every": 100, "checkpoint_every": 5, "parallel": parallel})
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(train_cmd(recipe, world["data"], one), check=True, timeout=600)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "draftsmith.cli", "train", "--recipe", str(recipe), "--data", str(world["data"]),
                "--out", str(two), "--no-progress"]
    subprocess.run(torchrun, check=True, timeout=600, env=env)
    a, b = losses(one), losses(two)
    # resume the 2-process run from its step-5 checkpoint: the same curve again
    import shutil

    shutil.rmtree(two / "step_10")
    (two / "step_latest").unlink()
    (two / "step_latest").symlink_to("step_5")
    subprocess.run(torchrun, check=True, timeout=600, env=env)
    assert losses(two) == b
    assert len(a) == len(b) == 10
    for (sa, la), (sb, lb) in zip(a, b):
        assert sa == sb and abs(la - lb) <= 1e-5 * abs(la), (sa, la, lb)
    # one checkpoint file set for the whole run (not one per rank), loadable without the trainer
    from draftsmith.models.io import load_draft

    d1, d2 = load_draft(one / "step_10"), load_draft(two / "step_10")
    for (k, v1), (_, v2) in zip(sorted(d1.state_dict().items()), sorted(d2.state_dict().items())):
        assert torch.allclose(v1, v2, rtol=1e-4, atol=1e-6), k
    assert sorted(p.name for p in (two / "step_10").iterdir()) == ["config.json", "model.safetensors",
                                                                  "training.json", "training_state.pt"]


def test_fp32_cache_gives_the_online_loss(world, tmp_path):
    from draftsmith.drafters import train
    from draftsmith.train.recipe import load_recipe

    r = make_recipe(tmp_path / "r.yaml", world["llama"], "dspark",
                    features={"batching": "unpadded"}, train={"max_steps": 4})
    online = load_recipe(str(r))
    cached = load_recipe(str(r), ["features.mode=cache", f"features.cache_dir={tmp_path / 'cache'}"])
    train(online, str(world["data"]), tmp_path / "online", progress=False)
    train(cached, str(world["data"]), tmp_path / "cached", progress=False)
    assert (tmp_path / "cache" / "manifest.json").is_file()
    # bitwise: one process, the same threads, and an fp32 cache holds the online features bit for bit
    assert losses(tmp_path / "online") == losses(tmp_path / "cached")


def test_top_k_cache_trains_and_evaluates_on_the_exact_p_t(world, tmp_path):
    """features.top_k: training reads p_t from the cache's top k (k = V gives the exact run's
    losses and held-out τ_sim; k = 4 other losses); held-out eval reads the exact p_t whatever k
    (test_objectives); a recipe asking for top-k refuses a cache without it and online features."""
    from draftsmith.drafters import train
    from draftsmith.train.recipe import load_recipe

    r = make_recipe(tmp_path / "r.yaml", world["llama"], "dspark", train={"max_steps": 4, "eval_every": 2})
    cache = lambda name, *more: ["features.mode=cache", f"features.cache_dir={tmp_path / name}", *more]  # noqa: E731
    runs = {"exact": cache("c0"), "kV": cache("cV", f"features.top_k={VOCAB}"), "k4": cache("c4", "features.top_k=4")}
    for name, sets in runs.items():
        train(load_recipe(str(r), sets), str(world["data"]), tmp_path / name, progress=False)
    exact, kV, k4 = (read_metrics(tmp_path / n) for n in runs)
    train_l1 = lambda ms: [m["train/l1"] for m in ms if "train/l1" in m]  # noqa: E731
    assert train_l1(kV) == pytest.approx(train_l1(exact), rel=1e-5)
    assert train_l1(k4) != pytest.approx(train_l1(exact), rel=1e-3)  # k = 4: a different p_t
    evals = lambda ms: [m["eval/tau_sim"] for m in ms if "eval/tau_sim" in m]  # noqa: E731
    assert len(evals(kV)) == 2 and evals(kV) == pytest.approx(evals(exact), rel=1e-5)
    with pytest.raises(InputError, match="holds no top-k p_t; features.top_k is 4"):
        train(load_recipe(str(r), cache("c0", "features.top_k=4")), str(world["data"]), tmp_path / "x", progress=False)
    with pytest.raises(InputError, match="features.top_k stores p_t in a feature cache"):
        train(load_recipe(str(r), ["features.top_k=4"]), str(world["data"]), tmp_path / "y", progress=False)
    with pytest.raises(InputError, match=f"features.top_k {VOCAB + 1}: must lie in 1..{VOCAB}"):
        train(load_recipe(str(r), cache("cX", f"features.top_k={VOCAB + 1}")), str(world["data"]), tmp_path / "z",
              progress=False)


def test_bad_inputs_fail_clearly(world, tmp_path):
    from draftsmith.drafters import train
    from draftsmith.train.recipe import load_recipe

    r = make_recipe(tmp_path / "r.yaml", world["llama"], "dspark")
    with pytest.raises(InputError, match="unknown key 'train.max_stepz'"):
        load_recipe(str(r), ["train.max_stepz=3"])
    with pytest.raises(InputError, match="model.block_sise"):
        load_recipe(str(r), ["model.block_sise=3"])
    with pytest.raises(InputError, match="draft_vocab_size 100000 exceeds"):
        train(load_recipe(str(r), ["model.draft_vocab_size=100000"]), str(world["data"]), tmp_path / "a", progress=False)
    with pytest.raises(InputError, match="mask_token_id 5000 is outside the embedding"):
        train(load_recipe(str(r), ["model.mask_token_id=5000"]), str(world["data"]), tmp_path / "b", progress=False)
    with pytest.raises(InputError, match="final layer"):
        train(load_recipe(str(r), ["model.target_layer_ids=[0,3]"]), str(world["data"]), tmp_path / "c", progress=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"id": "x", "conversations": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(InputError, match="no trainable tokens"):
        train(load_recipe(str(r)), str(empty), tmp_path / "d", progress=False)
    # a cache built for other layers is refused
    cache = tmp_path / "cache"
    train(load_recipe(str(r), ["features.mode=cache", f"features.cache_dir={cache}", "train.max_steps=1"]),
          str(world["data"]), tmp_path / "e", progress=False)
    with pytest.raises(InputError, match="layers"):
        train(load_recipe(str(r), ["features.mode=cache", f"features.cache_dir={cache}", "train.max_steps=1",
                                   "model.target_layer_ids=[0,1]"]), str(world["data"]), tmp_path / "f", progress=False)
    with pytest.raises(InputError, match="unknown recipe"):
        load_recipe("smollm2-135m/medusa")


def test_metrics_are_reduced_on_log_steps_only(world, tmp_path, monkeypatch):
    from draftsmith.drafters import train
    from draftsmith.train import loop
    from draftsmith.train.recipe import load_recipe

    reduced = []
    real = loop.Trainer.reduce
    monkeypatch.setattr(loop.Trainer, "reduce", lambda self, acc: (reduced.append(self.step), real(self, acc))[1])
    recipe = load_recipe(str(make_recipe(tmp_path / "r.yaml", world["llama"], "dspark")),
                         ["train.max_steps=7", "train.log_every=3"])
    train(recipe, str(world["data"]), tmp_path / "run", progress=False)
    assert reduced == [3, 6, 7]  # log steps and the last one: no collective or host sync on the others
    assert [s for s, _ in losses(tmp_path / "run")] == [3, 6, 7]


def test_recipe_loss_weights_reach_the_objective_and_the_checkpoint(world, tmp_path):
    """loss.weights replaces the drafter's default (terms not named are 0): a DFlash draft
    distilled from p_t (kl + ce_argmax) instead of its CE on the text."""
    from draftsmith.drafters import train
    from draftsmith.train.recipe import load_recipe

    path = make_recipe(tmp_path / "r.yaml", world["qwen3"], "dflash", loss={"weights": {"kl": 1.0, "ce_argmax": 0.5}})
    train(load_recipe(str(path), ["train.max_steps=3"]), str(world["data"]), tmp_path / "run", progress=False)
    logged = [m for m in read_metrics(tmp_path / "run") if "train/loss" in m]
    assert logged and all("train/kl" in m and "train/ce_argmax" in m for m in logged)
    for m in logged:  # the loss is exactly the weighted terms (ce is reported, weight 0)
        assert m["train/loss"] == pytest.approx(m["train/kl"] + 0.5 * m["train/ce_argmax"], rel=1e-5)
        assert m["train/loss"] != pytest.approx(m["train/ce"], rel=1e-3)
    info = json.loads((tmp_path / "run" / "step_latest" / "training.json").read_text())
    assert info["drafter"] == "dflash" and info["loss_weights"] == {
        "ce": 0.0, "l1": 0.0, "bce": 0.0, "soft_ce": 0.0, "kl": 1.0, "ce_argmax": 0.5}

    # no loss section: the drafter's default, recorded the same way
    train(load_recipe(str(make_recipe(tmp_path / "d.yaml", world["qwen3"], "dflash")), ["train.max_steps=1"]),
          str(world["data"]), tmp_path / "default", progress=False)
    info = json.loads((tmp_path / "default" / "step_latest" / "training.json").read_text())
    assert info["loss_weights"]["ce"] == 1.0 and info["loss_weights"]["kl"] == 0.0


@pytest.mark.parametrize("weights,message", [({"kl": 0.0}, "every loss weight is 0"),
                                             ({"klx": 1.0}, "klx")])
def test_bad_loss_weights_fail_at_load(world, tmp_path, weights, message):
    from draftsmith.train.recipe import load_recipe

    path = make_recipe(tmp_path / "r.yaml", world["qwen3"], "dspark", loss={"weights": weights})
    with pytest.raises(InputError, match=message):
        load_recipe(str(path))


def test_optim_freeze_keeps_matching_parameters_and_trains_the_rest(world, tmp_path):
    """optim.freeze: the matched tensors leave training bit-identical while the others move (the
    negative control: the same tensors without the option move too); a pattern that matches
    nothing is refused by name."""
    from draftsmith.train import loop
    from draftsmith.drafters import objective_for
    from draftsmith.train.parallel import init_distributed
    from draftsmith.train.recipe import load_recipe
    from draftsmith.train.setup import build_setup

    def trained(freeze):
        recipe = load_recipe(str(make_recipe(tmp_path / "r.yaml", world["llama"], "dspark",
                                             optim={"lr": 3e-3, "warmup_ratio": 0.1, "freeze": freeze})))
        s = build_setup(recipe, str(world["data"]), init_distributed(), progress=False)
        before = {k: v.clone() for k, v in s.model.state_dict().items()}
        trainer = loop.build_trainer(recipe, s, init_distributed(), objective_for("dspark"), 3, prefetch=False)
        for step in range(3):
            trainer.train_step(step)
        return before, s.model.state_dict()

    before, after = trained(["layers.*.mlp.*"])
    mlp = [k for k in after if ".mlp." in k]
    assert len(mlp) == 3 and all(torch.equal(before[k], after[k]) for k in mlp)
    assert not torch.equal(before["fc.weight"], after["fc.weight"])  # the rest still trains
    assert not torch.equal(before["layers.0.self_attn.q_proj.weight"], after["layers.0.self_attn.q_proj.weight"])
    before, after = trained([])  # negative control
    assert not any(torch.equal(before[k], after[k]) for k in mlp)
    with pytest.raises(InputError, match=r"optim.freeze: 'layer.\*.mlp' matches no parameter"):
        trained(["layer.*.mlp"])


def test_optim_lr_scale_puts_matching_parameters_in_their_own_group(world, tmp_path):
    """optim.lr_scale: matched parameters get base lr × scale, the rest the base lr; one step at a
    tiny scale moves them far less than the negative control without it, the rest alike; a
    pattern matching nothing, two patterns matching one parameter, a scale <= 0 are refused."""
    from draftsmith.train import loop
    from draftsmith.drafters import objective_for
    from draftsmith.train.parallel import init_distributed
    from draftsmith.train.recipe import load_recipe
    from draftsmith.train.setup import build_setup

    def trainer(scale):
        recipe = load_recipe(str(make_recipe(tmp_path / "r.yaml", world["llama"], "dspark",
                                             optim={"lr": 1e-3, "warmup_ratio": 0.0, "lr_scale": scale})))
        s = build_setup(recipe, str(world["data"]), init_distributed(), progress=False)
        return s.model, loop.build_trainer(recipe, s, init_distributed(), objective_for("dspark"), 4, prefetch=False)

    def first_step_moves(scale):
        model, tr = trainer(scale)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        tr.train_step(0)
        after = model.state_dict()
        return {k: float((after[k] - before[k]).abs().max()) for k in ("layers.0.mlp.up_proj.weight", "fc.weight")}

    model, tr = trainer({"layers.*.mlp.*": 0.25, "layers.*.self_attn.*": 0.5})
    lrs = {id(p): g["lr"] for g in tr.opt.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert lrs[id(names["layers.0.mlp.up_proj.weight"])] == pytest.approx(2.5e-4)
    assert lrs[id(names["layers.0.self_attn.q_proj.weight"])] == pytest.approx(5e-4)
    assert lrs[id(names["fc.weight"])] == pytest.approx(1e-3)
    scaled, control = first_step_moves({"layers.*.mlp.*": 1e-3}), first_step_moves({})
    # Adam's first step moves every weight by ~lr: the scaled MLP ~1000x less, fc alike in both
    assert scaled["layers.0.mlp.up_proj.weight"] < 0.01 * control["layers.0.mlp.up_proj.weight"]
    assert scaled["fc.weight"] == pytest.approx(control["fc.weight"], rel=0.05)
    with pytest.raises(InputError, match=r"optim.lr_scale: 'layer.\*' matches no trained parameter"):
        trainer({"layer.*": 0.5})
    with pytest.raises(InputError, match=r"lr_scale: layers.0.mlp.gate_proj.weight matches '.*' and '.*'; make"):
        trainer({"layers.*": 0.5, "layers.*.mlp.*": 0.1})
    with pytest.raises(InputError, match="multipliers must be > 0"):
        trainer({"layers.*": 0.0})
