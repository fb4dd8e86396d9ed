"""bench/gpu_check.py at toy size on the CPU: every section reports, the lossless check passes
and catches a lossy engine, the timed step is the loop's step, and the time guard stops a section."""

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from draftsmith.decoding import engine as spec_engine
from draftsmith.train import loop
from draftsmith.drafters import build_objective
from draftsmith.train.parallel import DistInfo

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_thread")


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


gpu_check = load_script()


def test_cpu_run_reports_every_section(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--skip-tests", "--out", str(out)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    text = proc.stdout
    for row in ("| tests | skipped |", "| train dspark | ok |", "| train eagle3 | ok |", "| lossless | pass |"):
        assert row in text
    assert "result: ok" in text and "time guard: no section needed it" in text
    rep = json.loads(out.read_text())
    assert rep["device"] == "cpu" and rep["torch"] == torch.__version__
    assert rep["dtype"]["lossless"].startswith("fp32") and rep["dtype"]["train_target"] == "fp32"
    assert [r["drafter"] for r in rep["train"]] == ["dspark", "eagle3"]
    for r in rep["train"]:
        assert r["steps"] == 2 and r["warmup"] == 1
        assert r["blocks_per_s"] > 0 and r["tokens_per_s"] > 0 and r["peak_gib"] > 0
        assert set(r["phases_ms"]) == set(gpu_check.PHASES)
        assert sum(r["phases_ms"].values()) <= 1e3 * r["s_per_step"] * 1.01  # phases fit in the step
        assert f"| {r['drafter']} | {r['γ']} | 2 | 48 × 2 |" in text
    rows = {r["draft"]: r for r in rep["lossless"]}
    assert set(rows) == {"dspark", "eagle3", "oracle", "dspark, static KV + compile"}
    assert all(r["status"] == "pass" for r in rows.values())
    for name in ("dspark", "eagle3", "dspark, static KV + compile"):  # the accept and reject paths ran
        assert rows[name]["accepted"] > 0 and rows[name]["rejected"] > 0
        assert f"| {name} | 3 × 24 |" in text


def test_comparator_flags_planted_mismatches():
    want = [[1, 2, 3, 4], [5, 6, 7]]
    assert gpu_check.first_mismatch(want, [list(w) for w in want]) is None
    planted = [[1, 2, 3, 4], [5, 9, 7]]
    assert gpu_check.first_mismatch(want, planted) == {"prompt": 1, "index": 1, "want": 6, "got": 9}
    short = [[1, 2, 3, 4], [5, 6]]
    assert gpu_check.first_mismatch(want, short) == {"prompt": 1, "index": 2, "want": 7, "got": None}
    assert gpu_check.first_mismatch(want, short, complete=False) is None  # a run cut by the time guard
    assert gpu_check.first_mismatch(want, [[1, 2, 3, 4, 8], [5, 6, 7]])["index"] == 4
    assert gpu_check.first_mismatch(want, want[:1]) is not None


def test_lossless_section_catches_a_lossy_engine(monkeypatch):
    """Negative control: a verifier that accepts every draft token breaks losslessness, and the
    section reports the mismatch for the random drafts (the oracle's drafts are the reference)."""

    def accept_all(target_logits, draft_tokens, lengths):
        best = target_logits.argmax(-1)  # [B, K+1]
        return lengths, best.gather(1, lengths[:, None]).squeeze(1)

    monkeypatch.setattr(spec_engine, "verify_greedy", accept_all)
    plan = gpu_check.plan_for(CPU)
    rows = {r["draft"]: r for r in gpu_check.lossless_section(plan, CPU, time.perf_counter() + 600,
                                                              gpu_check.Clock(600))}
    assert rows["dspark"]["status"] == rows["eagle3"]["status"] == "MISMATCH"
    assert rows["dspark, static KV + compile"]["status"] == "MISMATCH"
    bad = rows["dspark"]["mismatch"]
    assert bad["want"] != bad["got"] and bad["target_top2_gap"] > 0
    assert rows["oracle"]["status"] == "pass"


@pytest.mark.parametrize("drafter", ["dspark", "eagle3"])
def test_timed_step_is_the_loops_step(drafter):
    """The phase-timed step gives the loop's loss and the same weights after the update."""
    plan = gpu_check.plan_for(CPU)
    trainers = []
    for _ in range(2):
        s, recipe = gpu_check.make_setup(drafter, plan, CPU)
        trainers.append(loop.build_trainer(recipe, s, DistInfo(device=CPU), build_objective, 4, prefetch=False))
    timed = gpu_check.timed_step(1, trainers[0], CPU)
    m = trainers[1].reduce(trainers[1].train_step(1))
    assert timed["loss"] == pytest.approx(m["loss"], rel=1e-5)
    assert timed["blocks"] == m["blocks"] and timed["slots"] == m["tokens"]
    for p, q in zip(trainers[0].params, trainers[1].params):
        torch.testing.assert_close(p, q)
    assert all(v >= 0 for v in timed["phases"].values()) and timed["wall"] > 0


def test_time_guard_stops_training_and_says_so():
    clock = gpu_check.Clock(600)
    row = gpu_check.train_section("dspark", gpu_check.plan_for(CPU), CPU, time.perf_counter(), clock)
    assert row["status"] == "stopped (time guard) after 0 of 3 steps" and row["steps"] == 0
    assert clock.notes == ["train dspark: stopped (time guard) after 0 of 3 steps"]
    assert clock.deadline(cap_s=150, reserve_s=700) <= time.perf_counter()  # nothing left to hand out
