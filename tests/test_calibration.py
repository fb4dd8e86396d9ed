"""Confidence calibration (DESIGN §3.5): metric math on hand-made data, Sequential Temperature
Scaling recovering known temperatures, offline threshold sweeps, and the calibration file."""

import math

import pytest
import torch

from draftsmith.eval.calibration import (
    CalibrationSet, auroc, brier, ece, fit_sts, plot_reliability, plot_sweep, position_metrics,
    threshold_sweep,
)
from draftsmith.models.calibration import Calibration, load_calibration, save_calibration
from draftsmith.decoding import RoundRecord
from draftsmith.utils.io import InputError


def test_metric_math_by_hand():
    p = torch.tensor([0.2, 0.2, 0.8, 0.8], dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 1], dtype=torch.float64)
    assert ece(p, y) == pytest.approx((2 * 0.3 + 2 * 0.2) / 4)
    assert brier(p, y) == pytest.approx((0.04 + 0.64 + 0.04 + 0.04) / 4)
    assert auroc(p, y) == pytest.approx(2.5 / 3)  # one tie counts 1/2
    assert math.isnan(auroc(p, torch.ones(4, dtype=torch.float64)))  # one class only
    # a perfect ranking and a perfectly calibrated predictor
    assert auroc(torch.tensor([0.1, 0.9]), torch.tensor([0.0, 1.0])) == 1.0
    gen = torch.Generator().manual_seed(0)
    q = torch.rand(200_000, generator=gen, dtype=torch.float64)
    outcome = (torch.rand(200_000, generator=gen, dtype=torch.float64) < q).double()
    assert ece(q, outcome) < 0.01


def test_calibration_set_from_rounds():
    rounds = [RoundRecord([0, 1], [3, 2], [3, 1], [2, 1], [3, 2], ["", ""], 0.1, 0.2,
                          [[0.0, 1.0, 2.0], [3.0, -1.0]]),
              RoundRecord([0], [3], [3], [0], [1], [""], 0.1, 0.2, None)]  # no confidence: skipped
    data = CalibrationSet.from_rounds(rounds)
    assert data.rounds == 2 and data.positions == 3
    assert data.verified.tolist() == [3, 1] and data.accepted.tolist() == [2, 1]
    assert math.isnan(data.logits[1, 2])
    p, y = data.position(2)  # only the row that verified 2 slots counts
    assert p.tolist() == pytest.approx([0.5 * torch.sigmoid(torch.tensor(1.0)).item()])
    assert y.tolist() == [1.0]
    p3, y3 = data.position(3)
    assert y3.tolist() == [0.0]


def synthetic(true_temps, n=20_000, seed=0):
    """Rounds whose slot k is accepted (given the earlier ones) with probability σ(c_k / T_k)."""
    gen = torch.Generator().manual_seed(seed)
    K = len(true_temps)
    logits = torch.randn(n, K, generator=gen, dtype=torch.float64) * 2 + 0.5
    step = torch.sigmoid(logits / torch.tensor(true_temps, dtype=torch.float64))
    ok = torch.rand(n, K, generator=gen, dtype=torch.float64) < step
    accepted = ok.to(torch.int64).cumprod(dim=1).sum(dim=1)
    return CalibrationSet(logits, torch.full((n,), K), accepted)


def test_sts_recovers_known_temperatures():
    data = synthetic([2.0, 0.5, 1.0])
    temps = fit_sts(data)
    assert temps[0] == pytest.approx(2.0, rel=0.15)
    assert temps[1] == pytest.approx(0.5, rel=0.15)
    assert temps[2] == pytest.approx(1.0, rel=0.15)
    before, after = position_metrics(data), position_metrics(data, temps)
    for b, a in zip(before[:2], after[:2]):
        assert a["ece"] < b["ece"] / 3
    assert after[0]["observed"] == before[0]["observed"]  # outcomes do not depend on T
    # temperature scaling is monotone: the ranking (AUROC) of position 1 is unchanged
    assert after[0]["auroc"] == pytest.approx(before[0]["auroc"])


def test_threshold_sweep_by_hand():
    logits = torch.tensor([[2.0, 2.0, -2.0], [-2.0, 2.0, 2.0]], dtype=torch.float64)
    data = CalibrationSet(logits, torch.tensor([3, 3]), torch.tensor([2, 0]))
    sweep = threshold_sweep(data, None, thresholds=[0.0, 0.5, 0.8])
    s = {r["threshold"]: r for r in sweep["survival"]}
    p = {r["threshold"]: r for r in sweep["p_min"]}
    assert s[0.0]["tau"] == pytest.approx(1 + (2 + 0) / 2)  # nothing cut
    # σ(2) = 0.881, σ(2)^2 = 0.776: survival >= 0.5 keeps 2 slots of row 0, none of row 1
    assert s[0.5]["draft_tokens_per_round"] == pytest.approx(1.0)
    assert s[0.5]["tau"] == pytest.approx(1 + (2 + 0) / 2) and s[0.5]["empty_rounds"] == 1
    assert s[0.8]["draft_tokens_per_round"] == pytest.approx(0.5)  # only slot 1 of row 0
    assert s[0.8]["tau"] == pytest.approx(1 + (1 + 0) / 2)
    # raw per-step rule: row 0 keeps slots with σ >= 0.8 -> 2; row 1 stops at its first slot
    assert p[0.8]["draft_tokens_per_round"] == pytest.approx(1.0)


def test_plots_are_written(tmp_path):
    data = synthetic([2.0, 0.5], n=2000)
    temps = fit_sts(data)
    plot_reliability(data, temps, tmp_path / "rel.png")
    plot_sweep(threshold_sweep(data, temps), tmp_path / "sweep.png")
    assert (tmp_path / "rel.png").stat().st_size > 1000 and (tmp_path / "sweep.png").stat().st_size > 1000


def test_calibration_file_round_trip_and_errors(tmp_path):
    assert load_calibration(tmp_path) is None
    save_calibration(tmp_path, Calibration(0.0, [1.5, 0.7], rounds=12))
    cal = load_calibration(tmp_path)
    assert cal.sts_temperatures == [1.5, 0.7] and cal.rounds == 12
    assert cal.temperatures_for(0.0) == [1.5, 0.7]
    with pytest.raises(InputError, match="fitted at decoding temperature 0"):
        cal.temperatures_for(1.0)
    (tmp_path / "calibration.json").write_text('{"format": "draftsmith-calibration", "version": 9}')
    with pytest.raises(InputError, match="version"):
        load_calibration(tmp_path)
    (tmp_path / "calibration.json").write_text('{"format": "draftsmith-calibration", "version": 1, '
                                               '"decoding_temperature": 0, "sts_temperatures": [0]}')
    with pytest.raises(InputError, match="sts_temperatures"):
        load_calibration(tmp_path)


def test_calibrate_checks_its_arguments_before_loading_the_target(tmp_path, monkeypatch, capsys):
    from draftsmith.cli import main
    from draftsmith.eval import calibrate
    from draftsmith.models.dflash import DFlashConfig
    from draftsmith.models.io import build_draft, save_draft
    from tiny_targets import tiny_target

    def no_load(*a, **k):
        raise AssertionError("the target was loaded before the arguments were checked")

    monkeypatch.setattr(calibrate, "load_target_model", no_load)
    hf = tiny_target("llama", seed=0, vocab_size=64)
    cfg = DFlashConfig.from_target(hf.config, num_hidden_layers=1, block_size=3, mask_token_id=5,
                                   target_layer_ids=[0, 2], num_anchors=4)
    draft = save_draft(build_draft(cfg).init_from_target(hf, None), tmp_path / "dflash")
    (tmp_path / "file").write_text("x")
    for out, needle in ((tmp_path / "file", "--out"), (tmp_path / "o", "needs a DSpark draft with a confidence")):
        rc = main(["calibrate", "--draft", str(draft), "--target", "unused", "--datasets", "x.jsonl",
                   "--out", str(out)])
        assert rc == 2 and needle in capsys.readouterr().err
