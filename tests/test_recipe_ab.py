"""bench/recipe_ab.py: variants of one recipe trained for the same steps, tabulated against the first."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from train_fixtures import make_data, make_recipe, make_target_dir

pytestmark = pytest.mark.usefixtures("one_thread")

BENCH = Path(__file__).resolve().parents[1] / "bench" / "recipe_ab.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("recipe_ab", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(bench, monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["recipe_ab.py", *argv])
    bench.main()


def test_variants_train_and_tabulate_against_the_baseline(tmp_path, monkeypatch, capsys):
    bench = load_bench()
    target = make_target_dir(tmp_path, "qwen3")
    recipe = make_recipe(tmp_path / "r.yaml", target, "dspark")
    data = make_data(tmp_path / "d.jsonl")
    out = tmp_path / "ab"
    argv = ["--recipe", str(recipe), "--data", str(data), "--steps", "4", "--eval-every", "2", "--out", str(out),
            "--variant", "base=", "--variant", "layers=init.layers=target;init.final_norm=target"]
    run(bench, monkeypatch, *argv)
    rows = json.loads((out / "recipe_ab.json").read_text())
    assert [r["variant"] for r in rows] == ["base", "layers"]
    assert rows[1]["sets"] == ["init.layers=target", "init.final_norm=target"]
    assert [s for s, _ in rows[0]["curve"]] == [2, 4]
    assert rows[0]["tau_sim"] != rows[1]["tau_sim"]  # the override changed the run
    printed = capsys.readouterr().out
    assert "| layers | `init.layers=target`; `init.final_norm=target` |" in printed
    assert f"{rows[1]['tau_sim'] - rows[0]['tau_sim']:+.3f}" in printed
    assert (out / "recipe_ab.png").stat().st_size > 0
    logged = (out / "layers" / "metrics.jsonl").stat().st_mtime_ns
    run(bench, monkeypatch, *argv, "--reuse")  # read back, not retrained
    assert (out / "layers" / "metrics.jsonl").stat().st_mtime_ns == logged
    again = json.loads((out / "recipe_ab.json").read_text())
    assert [r["tau_sim"] for r in again] == [r["tau_sim"] for r in rows]
    assert again[0]["seconds"] is None


def test_bad_variants_are_refused():
    bench = load_bench()
    assert bench.parse_variant("lr=optim.lr=1e-3;optim.betas=[0.9,0.999]") == (
        "lr", ["optim.lr=1e-3", "optim.betas=[0.9,0.999]"])
    assert bench.parse_variant("base=") == ("base", [])
    with pytest.raises(SystemExit, match="NAME=KEY=VALUE"):
        bench.parse_variant("no-equals-sign")
