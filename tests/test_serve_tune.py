"""Choosing llama.cpp's serve settings from held-out rounds and a measured cost curve
(`serve.tune`): the cost model, the p_min rule applied to recorded rounds, the choice, and the
draft's fixed cost recovered from a served run's totals."""

import math

import pytest
import torch

from draftsmith.decoding import RoundRecord
from draftsmith.eval.calibration import CalibrationSet
from draftsmith.serve.tune import CostModel, choose, expected, round_overhead, round_set

CURVE = {1: 1.0, 2: 1.5, 3: 2.0, 4: 2.2}


def rounds(logits, verified, accepted) -> CalibrationSet:
    return CalibrationSet(torch.tensor(logits, dtype=torch.float64), torch.tensor(verified),
                          torch.tensor(accepted))


def test_cost_model_interpolates_and_extrapolates():
    cost = CostModel(CURVE, overhead=0.25)
    assert cost.verify(2) == 1.5
    assert cost.verify(2.5) == pytest.approx(1.75)
    assert cost.verify(6) == pytest.approx(2.2 + 2 * 0.2)  # the last segment's slope
    assert cost.round_cost(0) == pytest.approx(1.25)  # a round that drafts nothing: a plain step + the draft
    assert cost.round_cost(2) == pytest.approx(1.25 + 1.0)
    with pytest.raises(ValueError, match="n = 1"):
        CostModel({2: 1.5, 3: 2.0})


def test_p_min_keeps_the_confident_rounds_and_the_choice_follows():
    # round A: confident and right (both slots accepted); round B: unsure and wrong
    data = rounds([[5.0, 5.0], [-5.0, -5.0]], [2, 2], [2, 0])
    cost = CostModel(CURVE, overhead=0.2)
    full = expected(data, 0.0, cost)
    # tokens 3 + 1, cost 2 rounds x (1.2 + verify(3) - verify(1)) = 4.4
    assert full["tau"] == 2.0 and full["speedup"] == pytest.approx(4 / 4.4)
    cut = expected(data, 0.5, cost)
    # A keeps both (cost 2.2), B drafts nothing (cost 1.2): same tokens, less cost
    assert cut["tau"] == 2.0 and cut["drafted_per_round"] == 1.0
    assert cut["speedup"] == pytest.approx(4 / 3.4)
    best = choose({2: data}, {"fp16": cost}, has_confidence=True)["best"]
    assert best["p_min"] == 0.05 and best["speedup"] == pytest.approx(4 / 3.4)  # ties: the smallest


def test_an_anti_calibrated_head_is_not_trusted():
    # negative control: the confident round is the wrong one, so truncating loses tokens
    data = rounds([[-5.0, -5.0], [5.0, 5.0]], [2, 2], [2, 0])
    cost = CostModel(CURVE, overhead=0.2)
    assert expected(data, 0.5, cost)["speedup"] < expected(data, 0.0, cost)["speedup"]
    assert choose({2: data}, {"fp16": cost}, has_confidence=True)["best"]["p_min"] == 0.0


def test_the_choice_weighs_dtype_n_max_and_drafts_without_confidence():
    long = rounds([[float("nan")] * 3] * 2, [3, 3], [1, 0])  # n_max 3: 1 + 2 tokens, costly
    short = rounds([[float("nan")]] * 2, [1, 1], [1, 0])  # n_max 1: the same tokens, cheaper
    costs = {"fp16": CostModel(CURVE, overhead=0.4), "q8_0": CostModel(CURVE, overhead=0.2)}
    out = choose({3: long, 1: short}, costs, has_confidence=False)
    assert {r["p_min"] for r in out["table"]} == {0.0}  # no head: llama.cpp refuses p_min
    assert len(out["table"]) == 4
    best = out["best"]
    assert (best["dtype"], best["n_max"]) == ("q8_0", 1)
    assert best["speedup"] == pytest.approx(3 / (2 * (1.2 + 0.5)))


def test_round_overhead_recovers_the_draft_cost_from_served_totals():
    cost = CostModel(CURVE)
    # 10 rounds drafting 2 tokens each, 25 tokens; a round really costs 1 + 0.3 + (2.0 - 1.0)
    per_round = 1.3 + 1.0
    served = {"rounds": 10, "drafted": 20, "tokens": 25, "plain_decode_tokens_per_s": 100.0,
              "decode_tokens_per_s": 2.5 * 100.0 / per_round}
    assert round_overhead(served, cost) == pytest.approx(0.3)
    assert round_overhead({**served, "rounds": 0}, cost) is None


def test_round_set_reads_engine_rounds_with_and_without_confidence():
    with_conf = RoundRecord(rows=[0, 1], drafted=[2, 2], proposed=[2, 2], accepted=[1, 2],
                            committed=[2, 3], cut=["", ""], draft_s=0.0, verify_s=0.0,
                            confidence=[[0.5, -1.0], [2.0, 3.0]])
    plain = RoundRecord(rows=[0], drafted=[3], proposed=[3], accepted=[0], committed=[1], cut=[""],
                        draft_s=0.0, verify_s=0.0)
    data = round_set([with_conf, plain])
    assert data.rounds == 3 and data.positions == 3
    assert data.verified.tolist() == [2, 2, 3] and data.accepted.tolist() == [1, 2, 0]
    assert data.logits[0, :2].tolist() == [0.5, -1.0] and math.isnan(data.logits[0, 2])
    assert torch.isnan(data.logits[2]).all()
    # p_min on raw sigmoid: row 0 keeps slot 1 only (σ(0.5) ≥ 0.5 > σ(-1)), row 1 both, row 2 none
    e = expected(data, 0.5, CostModel(CURVE))
    assert e["drafted_per_round"] == pytest.approx((1 + 2 + 0) / 3)
    assert e["tau"] == pytest.approx((2 + 3 + 1) / 3)


def test_bench_served_grid_expands_every_combination():
    import importlib.util
    from pathlib import Path

    from draftsmith.utils.io import InputError

    path = Path(__file__).resolve().parents[1] / "bench" / "served.py"
    spec = importlib.util.spec_from_file_location("bench_served", path)
    served = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(served)
    grid = served.parse_grid("dtype=fp16,q8_0; n_max=1,4; p_min=0,0.4")
    assert grid == {"dtype": ["fp16", "q8_0"], "n_max": [1, 4], "p_min": [0.0, 0.4]}
    rows = served.expand_grid([("d", "RUN", {"n_max": 2})], grid)
    assert len(rows) == 8 and len({name for name, _, _ in rows}) == 8
    assert ("d q8_0 n4 p0.4", "RUN", {"n_max": 4, "dtype": "q8_0", "p_min": 0.4}) in rows
    assert ("d fp16 n1 p0", "RUN", {"n_max": 1, "dtype": "fp16"}) in rows  # p_min 0: flag left off
    assert served.expand_grid([("d", "RUN", {})], {}) == [("d", "RUN", {})]
    for bad in ("temperature=1", "n_max", "n_max="):
        with pytest.raises(InputError, match="--grid"):
            served.parse_grid(bad)
    # with=PEER puts an n-gram peer ahead of the draft's spec type in one server
    assert served.parse_draft("h=RUN@with=ngram-simple,n_max=1") == ("h", "RUN", {"with": "ngram-simple", "n_max": 1})
    args = ["-md", "d.gguf", "--spec-type", "draft-dspark", "--spec-draft-n-max", "1"]
    assert served.behind_peer(args, "ngram-simple", "h") == [
        "-md", "d.gguf", "--spec-type", "ngram-simple,draft-dspark", "--spec-draft-n-max", "1"]
    assert args[3] == "draft-dspark"  # the caller's list is left alone
    with pytest.raises(InputError, match="with='ngram-big'"):
        served.behind_peer(args, "ngram-big", "h")


def test_the_draft_cost_splits_into_fixed_per_slot_and_drafting():
    from draftsmith.serve.tune import fit_overhead, idle_overhead

    assert fit_overhead({1: 0.5, 4: 1.1}) == pytest.approx((0.3, 0.2, 0.0))
    assert fit_overhead({4: 0.9}) == (0.9, 0.0, 0.0)  # one probe: all fixed
    assert fit_overhead({1: 0.6, 4: 0.5}) == pytest.approx((0.6, 0.0, 0.0))  # noise never makes a slot free
    # with a cut-everything probe: 0.75 at one slot when drafting, 0.3 when not
    assert fit_overhead({1: 0.75, 4: 0.99}, idle=0.3) == pytest.approx((0.22, 0.08, 0.45))
    assert fit_overhead({1: 0.5}, idle=0.9) == pytest.approx((0.5, 0.0, 0.0))  # idle above drafting: capped
    assert idle_overhead({"decode_tokens_per_s": 80.0, "plain_decode_tokens_per_s": 100.0}) == pytest.approx(0.25)
    assert idle_overhead({"decode_tokens_per_s": None, "plain_decode_tokens_per_s": 100.0}) is None
    cost = CostModel(CURVE, overhead=0.3, per_slot=0.2, drafting=0.1)
    assert cost.round_cost(0, 4) == pytest.approx(1 + 0.3 + 0.8)  # p_min cut everything: the draft still ran
    assert cost.round_cost(1, 4) == pytest.approx(1 + 0.3 + 0.8 + 0.1 + 0.5)
    # a longer block costs more even when both verify the same tokens, so the choice sees it
    data = rounds([[5.0, -5.0, -5.0, -5.0]], [4], [1])
    short = rounds([[5.0]], [1], [1])
    out = choose({4: data, 1: short}, {"q8_0": cost}, has_confidence=True)
    assert out["best"]["n_max"] == 1
    assert expected(data, 0.5, cost, 4)["round_cost"] - expected(short, 0.5, cost, 1)["round_cost"] == pytest.approx(0.6)


def test_a_cheap_cut_round_makes_p_min_pay():
    # half the rounds confident and right, half unsure and wrong
    data = rounds([[5.0]] * 2 + [[-5.0]] * 2, [1] * 4, [1, 1, 0, 0])
    dear = CostModel(CURVE, overhead=0.6)  # a cut round costs as much as a drafting one
    cheap = CostModel(CURVE, overhead=0.2, drafting=0.4)  # the same drafting cost, cheap cuts
    for cost in (dear, cheap):
        assert expected(data, 0.0, cost, 1)["round_cost"] == pytest.approx(1 + 0.6 + 0.5)
    gain = {name: expected(data, 0.5, c, 1)["speedup"] / expected(data, 0.0, c, 1)["speedup"]
            for name, c in (("dear", dear), ("cheap", cheap))}
    assert gain["cheap"] > gain["dear"] > 1


def test_serve_many_interleaves_prompts_across_servers(monkeypatch, tmp_path):
    """Every prompt reaches every server before the next prompt, the order rotating, so a slow
    stretch of the machine falls on all configurations; totals are per server and dataset."""
    from draftsmith.serve import check

    calls, started = [], []

    class FakeServer:
        def __init__(self, gguf, **kw):
            self.name = kw["extra_args"][0] if kw["extra_args"] else "plain"
            self.n = 0

        def __enter__(self):
            started.append(self.name)
            return self

        def __exit__(self, *exc):
            return False

        def get_text(self, path):
            return f"llamacpp:spec_decode_num_accepted_tokens_total {2 * self.n}\n" \
                   f"llamacpp:spec_decode_num_drafts_total {self.n}\n"

        def post_json(self, path, body, timeout):
            calls.append((self.name, body["prompt"][0]))
            self.n += 1
            return {"choices": [{"text": "x"}], "usage": {"completion_tokens": 4},
                    "timings": {"predicted_ms": 40.0, "prompt_n": len(body["prompt"])}}

    monkeypatch.setattr(check.llama_cpp, "LlamaServer", FakeServer)
    monkeypatch.setattr(check, "GAP_S", 0.0)
    configs = {"a": (tmp_path, []), "b": (tmp_path, ["b"]), "c": (tmp_path, ["c"])}
    out = check.serve_many(configs, {"d1": [[10], [11]], "d2": [[20]]}, 4, 512)
    assert started == ["plain", "b", "c"]  # every server up before the first request
    assert calls == [("plain", 10), ("b", 10), ("c", 10), ("b", 11), ("c", 11), ("plain", 11),
                     ("c", 20), ("plain", 20), ("b", 20)]
    assert set(out) == {"a", "b", "c"} and set(out["b"]) == {"d1", "d2"}
    m = out["b"]["d1"]
    assert m["tokens"] == 8 and m["rounds"] == 2 and m["served_tau"] == 3.0
    assert m["decode_tokens_per_s"] == 100.0 and len(m["requests"]) == 2
    assert check.serve_prompts(tmp_path, ["z"], {"d": [[5]]}, 4, 512)["d"]["tokens"] == 4
