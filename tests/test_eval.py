"""`draftsmith eval`: metrics math on hand-made rounds, dataset resolution, multi-turn prompts,
and the command end to end on a tiny random target (metrics.json shape, report + plots, every
draft's greedy answers equal plain decoding's in float64)."""

import argparse
import copy
import json
import math

import pytest
import torch
from train_fixtures import make_target_dir

from draftsmith.eval import commands
from draftsmith.eval.datasets import (
    load_dataset, render_prompt, resolve_dataset, split_list, stop_token_ids,
)
from draftsmith.eval.metrics import Tally, bootstrap_ratio, build_metrics, by_record, json_safe, keep_rows
from draftsmith.eval.report import write_report
from draftsmith.eval.runner import Settings, build_decoders, first_difference, run_benchmark
from draftsmith.models.dflash import DFlashConfig, build_dflash
from draftsmith.models.dspark import DSparkConfig, build_dspark
from draftsmith.models.eagle3 import Eagle3Config, Eagle3Model
from draftsmith.models.io import save_draft
from draftsmith.decoding import Generation, RoundRecord, SamplingConfig
from draftsmith.targets.model import load_tokenizer
from draftsmith.utils.io import InputError


pytestmark = pytest.mark.usefixtures("one_thread")


def rnd(rows, proposed, accepted, committed, cut=None, draft_s=0.1, verify_s=0.3):
    n = len(rows)
    return RoundRecord(list(rows), list(proposed), list(proposed), list(accepted), list(committed),
                       list(cut or [""] * n), draft_s, verify_s)


# --------------------------------------------------------------------------- metrics


def hand_generation():
    """Two answers: row 0 ends at EOS (its EOS came as a bonus), row 1 runs into the length cap.
    Rounds (proposed 4): row 0 accepts 3, then 4 (its last round ends with the bonus EOS);
    row 1 accepts 0, then 1 cut to 1 token at the cap, then a round with an empty draft."""
    rounds = [
        rnd([0, 1], [4, 4], [3, 0], [4, 1]),
        rnd([0, 1], [4, 4], [4, 1], [5, 1], cut=["eos", "length"]),
    ]
    return Generation(outputs=[[5] * 10, [6] * 3], finish=["eos", "length"], rounds=rounds,
                      prefill_s=0.5, decode_s=1.5)


def test_tau_counts_the_bonus_and_the_eos_rule():
    t = Tally()
    t.add(hand_generation())
    s = t.summary(compare=False)
    # row-round τ: 4, 1 (first round); 4 (EOS bonus not counted: 5 - 1), 1 (length cut) -> 10 / 4
    assert s["tau"] == pytest.approx(10 / 4)
    assert s["rounds"] == 4 and s["empty_rounds"] == 0
    # llama.cpp: 1 + accepted / non-empty rounds = 1 + 8 / 4
    assert s["tau_llama_cpp"] == pytest.approx(3.0)
    # without the capped answer (row 1): row 0 only -> (4 + 4) / 2
    assert s["tau_uncapped"] == pytest.approx(4.0)
    assert s["capped"] == 1 and s["capped_share"] == 0.5 and s["samples"] == 2
    assert s["acceptance_rate"] == pytest.approx(8 / 16) and s["mean_draft_len"] == 4
    assert s["tokens"] == 13 and s["tokens_per_s"] == pytest.approx(13 / 2.0)
    assert s["decode_tokens_per_s"] == pytest.approx((13 - 2) / 1.5)
    assert s["draft_ms_per_round"] == pytest.approx(100) and s["verify_ms_per_round"] == pytest.approx(300)
    assert s["verify_rate"] == pytest.approx((16 + 4) / 0.6)
    assert s["mismatches"] is None


def test_survival_and_conditional_acceptance():
    # accepted counts 0, 1, 2, 4 of 4 proposed
    t = Tally()
    t.add(Generation([[1]] * 4, ["eos"] * 4, [rnd([0, 1, 2, 3], [4] * 4, [0, 1, 2, 4], [1, 2, 3, 5])]))
    s = t.summary(compare=False)
    assert s["survival"] == pytest.approx([3 / 4, 2 / 4, 1 / 4, 1 / 4])
    assert s["conditional_acceptance"] == pytest.approx([3 / 4, 2 / 3, 1 / 2, 1 / 1])


def test_llama_cpp_tau_skips_empty_rounds():
    t = Tally()
    t.add(Generation([[1] * 5], ["length"], [rnd([0], [0], [0], [1]), rnd([0], [3], [2], [3])]))
    s = t.summary(compare=False)
    assert s["tau"] == pytest.approx((1 + 3) / 2)
    assert s["tau_llama_cpp"] == pytest.approx(1 + 2 / 1) and s["empty_rounds"] == 1
    assert math.isnan(s["tau_uncapped"])  # every answer hit the cap
    assert json_safe(s)["tau_uncapped"] is None


def test_keep_rows_splits_round_times():
    kept = keep_rows([rnd([0, 1], [4, 4], [3, 0], [4, 1], draft_s=0.2, verify_s=0.4)], [1])
    assert kept[0].rows == [1] and kept[0].accepted == [0] and kept[0].committed == [1]
    assert kept[0].draft_s == pytest.approx(0.1) and kept[0].verify_s == pytest.approx(0.2)
    assert keep_rows([rnd([0], [4], [1], [2])], [5]) == []


def test_per_sample_tau_counts_and_the_bootstrap_interval():
    t = Tally()
    t.add(hand_generation())
    # row 0: 4 + 4 (EOS bonus not counted); row 1: 1 + 1; one record per answer by default
    assert [(a, b) for _, a, b in t.per_sample] == [(8, 2), (2, 2)]
    assert t.summary(compare=False)["tau_ci"] == [1.0, 4.0]  # two answers: all-row-1 .. all-row-0
    # 200 answers of one round each, τ 1 or 3 half the time: pooled 2, standard error 1/√200
    half = [(1, 1), (3, 1)] * 100
    lo, hi = bootstrap_ratio(half)
    assert lo == pytest.approx(2 - 1.96 / 200 ** 0.5, abs=0.03) and hi == pytest.approx(2 + 1.96 / 200 ** 0.5, abs=0.03)
    assert bootstrap_ratio([(6, 3)] * 50) == (2.0, 2.0)  # no spread, no width


def test_the_turns_of_one_record_are_resampled_together():
    """mt-bench style: two turns per record. Keyed by record, the bootstrap unit is the record
    (its turns summed); unkeyed (the control), each turn counts as an independent sample."""
    keyed, loose = Tally(), Tally()
    for turn in range(2):
        gen = Generation([[1]] * 3, ["eos"] * 3, [rnd([0, 1, 2], [4] * 3, [0, 2, 4], [1, 3, 5])])
        keyed.add(gen, keys=[("d", r) for r in range(3)])
        loose.add(gen)
    assert by_record(keyed.per_sample) == [(2, 2), (6, 2), (10, 2)]
    assert len(by_record(loose.per_sample)) == 6
    assert keyed.summary(False)["tau"] == loose.summary(False)["tau"] == pytest.approx(3.0)


def test_paired_bootstrap_sees_a_consistent_ratio_that_unpaired_answers_hide():
    """Draft a accepts 10 % more than b on every prompt while prompts vary 1..4 in τ: the paired
    interval is tight around 1.1; the same answers paired with the wrong prompts (the control)
    give an interval wide enough to contain 1."""
    b = [(10 * k, 10) for k in (1, 2, 3, 4)] * 10
    a = [(int(n * 1.1), d) for n, d in b]
    lo, hi = bootstrap_ratio(a, b)
    assert lo == pytest.approx(1.1, abs=0.005) and hi == pytest.approx(1.1, abs=0.005), (lo, hi)
    shuffled = a[1:] + a[:1]
    lo_x, hi_x = bootstrap_ratio(shuffled, b)
    assert lo_x < 1.0 < hi_x, (lo_x, hi_x)


def test_build_metrics_compares_every_pair_of_drafts():
    plain, d1, d2 = Tally(), Tally(), Tally()
    plain.add(Generation([[1] * 10], ["eos"], [rnd([0], [0], [0], [1])] * 9, 1.0, 4.0))
    d1.add(hand_generation())
    d2.add(Generation([[5] * 10, [6] * 3], ["eos", "length"], [rnd([0, 1], [4, 4], [1, 0], [2, 1])]))
    m = build_metrics({"plain": {"a": plain}, "d1": {"a": d1}, "d2": {"a": d2}}, compare=False)
    (c,) = m["comparisons"]
    assert (c["first"], c["second"], c["records"]) == ("d1", "d2", 2)
    assert c["tau_ratio"] == pytest.approx((10 / 4) / (3 / 2))
    assert c["ci"][0] <= c["tau_ratio"] <= c["ci"][1]


def test_build_metrics_shape_and_speedup():
    plain, draft = Tally(), Tally()
    plain.add(Generation([[1] * 10], ["eos"], [rnd([0], [0], [0], [1])] * 9, 1.0, 4.0))
    draft.add(hand_generation())
    draft.add_comparison(None)
    draft.add_comparison({"position": 3, "top2_gap": 0.01})
    m = build_metrics({"plain": {"a": plain, "b": plain}, "d": {"a": draft, "b": Tally()}})
    assert set(m["drafts"]) == {"plain", "d"}
    for entry in m["drafts"].values():
        assert set(entry) == {"overall", "datasets"} and set(entry["datasets"]) == {"a", "b"}
    a = m["drafts"]["d"]["datasets"]["a"]
    assert a["plain_tokens_per_s"] == pytest.approx(10 / 5)
    assert a["speedup"] == pytest.approx((13 / 2) / (10 / 5))
    assert a["mismatches"] == 1 and a["compared"] == 2
    o = m["drafts"]["d"]["overall"]  # pools both datasets: dataset b added nothing
    assert o["tau"] == pytest.approx(10 / 4) and o["plain_tokens_per_s"] == pytest.approx(20 / 10)
    assert m["drafts"]["plain"]["overall"]["speedup"] == pytest.approx(1.0)
    assert m["drafts"]["plain"]["overall"]["tau"] == 1.0
    assert m["drafts"]["plain"]["overall"]["mismatches"] is None


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 4, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2


# --------------------------------------------------------------------------- datasets


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def eval_dir(tmp_path):
    d = tmp_path / "evalsets"
    d.mkdir()
    write_jsonl(d / "qa.jsonl", [{"turns": ["Hello there!"]}, {"turns": ["How are you today?"]},
                                 {"turns": ["Write a short poem about the sea."]}])
    write_jsonl(d / "chat.jsonl", [{"turns": ["The quick brown fox?", "Say it again."]},
                                   {"turns": ["def add(a, b):"]}])
    return d


def test_dataset_names_resolve_through_eval_dir_then_env(eval_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("DRAFTSMITH_EVAL_DIR", raising=False)
    assert resolve_dataset("qa", eval_dir) == ("qa", eval_dir / "qa.jsonl")
    monkeypatch.setenv("DRAFTSMITH_EVAL_DIR", str(eval_dir))
    assert resolve_dataset("chat", None) == ("chat", eval_dir / "chat.jsonl")
    other = tmp_path / "other"
    other.mkdir()
    write_jsonl(other / "qa.jsonl", [{"turns": ["x"]}])
    assert resolve_dataset("qa", other)[1] == other / "qa.jsonl"  # --eval-dir wins over the env
    path = write_jsonl(tmp_path / "mine.jsonl", [{"turns": ["y"]}])
    assert resolve_dataset(str(path), None) == ("mine", path)


def test_unknown_dataset_lists_known_names(eval_dir, monkeypatch):
    monkeypatch.delenv("DRAFTSMITH_EVAL_DIR", raising=False)
    with pytest.raises(InputError) as e:
        resolve_dataset("gsm9k", eval_dir)
    msg = str(e.value)
    assert "gsm9k" in msg and "chat, qa" in msg and "gsm8k" in msg and str(eval_dir) in msg
    with pytest.raises(InputError, match="pass --eval-dir"):
        resolve_dataset("qa", None)
    with pytest.raises(InputError, match="file not found"):
        resolve_dataset("missing/x.jsonl", None)


def test_bad_records_are_rejected_with_reasons(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"turns": ["ok"]}\nnot json\n{"turns": []}\n{"turns": ["a", 3]}\n{"turns": ["b", "c"]}\n')
    data = load_dataset(str(path))
    assert data.records == [["ok"], ["b", "c"]] and data.num_turns == 3
    assert len(data.rejected) == 3 and any(":2:" in r for r in data.rejected)
    assert any("turns[1] is int" in r for r in data.rejected)
    assert load_dataset(str(path), max_samples=1).records == [["ok"]]
    assert split_list(" a, b,,c ") == ["a", "b", "c"]


# --------------------------------------------------------------------------- tiny target + drafts


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny random Qwen3 target dir and DSpark / DFlash / EAGLE-3 draft dirs for it."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("eval")
    target = make_target_dir(root, "qwen3")
    hf = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    vocab = hf.config.vocab_size
    torch.manual_seed(0)
    dspark = build_dspark(DSparkConfig.from_target(hf.config, mask_token_id=vocab - 1, num_hidden_layers=1,
                                                   markov_rank=8, target_layer_ids=[0, 2], block_size=4))
    save_draft(dspark.init_from_target(hf), root / "dspark")
    dflash = build_dflash(DFlashConfig.from_target(hf.config, mask_token_id=vocab - 1, num_hidden_layers=1,
                                                   target_layer_ids=[1, 2], block_size=3))
    save_draft(dflash.init_from_target(hf), root / "dflash")
    eagle3 = Eagle3Model(Eagle3Config.from_target(hf.config, target_layer_ids=[0, 1, 2]))
    save_draft(eagle3.init_from_target(hf), root / "eagle3")
    return {"root": root, "target": target, "hf": hf}


def test_stop_ids_and_multi_turn_prompts(world):
    tok = load_tokenizer(str(world["target"]))
    stop = stop_token_ids(tok, world["hf"].config)
    assert tok.convert_tokens_to_ids("<|im_end|>") in stop
    ids = render_prompt(tok, ["first question", "second question"], ["first answer"])
    text = tok.decode(ids)
    assert text.index("first question") < text.index("first answer") < text.index("second question")
    assert text.endswith("<|im_start|>assistant\n")
    with pytest.raises(ValueError):
        render_prompt(tok, ["q"], ["a"])


def test_multi_turn_records_are_answered_in_sequence(world, eval_dir):
    tok = load_tokenizer(str(world["target"]))
    hf = copy.deepcopy(world["hf"]).double()
    settings = Settings(12, SamplingConfig(), stop_token_ids(tok, hf.config), tok.pad_token_id)
    decoders = build_decoders(hf, {"dspark": str(world["root"] / "dspark")}, ["ngram"], settings)
    seen = []
    for d in decoders:
        generate = d.engine.generate

        def spy(prompts, *a, _generate=generate, _name=d.name, **kw):
            seen.append((_name, [list(p) for p in prompts]))
            return _generate(prompts, *a, **kw)

        d.engine.generate = spy
    data = load_dataset("chat", eval_dir)
    bench = run_benchmark(decoders, [data], tok, settings)
    plain = [a for a in bench.answers if a.decoder == "plain"]
    assert [(a.record, a.turn) for a in plain] == [(0, 0), (0, 1), (1, 0)]
    assert len(bench.answers) == 3 * len(decoders)
    # every decoder saw the same prompts, in the interleaved order plain, ngram, dspark
    assert [name for name, _ in seen] == ["plain", "ngram", "dspark"] * 3
    assert seen[0][1] == seen[1][1] == seen[2][1]
    second = tok.decode(seen[3][1][0])  # record 0, turn 1
    assert plain[0].text and plain[0].text in second
    assert second.index("The quick brown fox?") < second.index(plain[0].text) < second.index("Say it again.")
    assert bench.tallies["dspark"]["chat"].samples == 3
    # batch 2 (record 1 has one turn, record 0 two): the same answers as one record at a time
    settings.batch_size = 2
    batched = run_benchmark(build_decoders(hf, {"dspark": str(world["root"] / "dspark")}, ["ngram"], settings),
                            [data], tok, settings)
    key = lambda a: (a.decoder, a.record, a.turn)  # noqa: E731
    assert {key(a): a.ids for a in batched.answers} == {key(a): a.ids for a in bench.answers}


def eval_args(world, eval_dir, out, *extra):
    p = argparse.ArgumentParser()
    commands.add_args(p)
    root = world["root"]
    return p.parse_args([
        "--target", str(world["target"]), "--draft", f"dspark={root / 'dspark'}",
        "--draft", f"dflash={root / 'dflash'}", "--draft", f"eagle3={root / 'eagle3'}",
        "--baselines", "ngram", "--datasets", f"qa,{eval_dir / 'chat.jsonl'}", "--eval-dir", str(eval_dir),
        "--max-new-tokens", "20", "--temperature", "0", "--dtype", "fp64", "--threads", "1",
        "--no-progress", "--out", str(out), *extra])


def test_eval_command_end_to_end(world, eval_dir, tmp_path):
    out = tmp_path / "out"
    assert commands.run(eval_args(world, eval_dir, out, "--max-samples", "2")) == 0
    m = json.loads((out / "metrics.json").read_text())
    names = {"plain", "ngram", "dspark", "dflash", "eagle3"}
    assert set(m["drafts"]) == names
    assert m["config"]["decoders"]["dflash"]["target_layer_ids"] == [1, 2]
    assert m["config"]["datasets"]["qa"]["records"] == 2  # --max-samples per dataset
    for name, entry in m["drafts"].items():
        assert set(entry) == {"overall", "datasets"} and set(entry["datasets"]) == {"qa", "chat"}
        o = entry["overall"]
        for key in ("tau", "tokens_per_s", "plain_tokens_per_s", "speedup", "tau_uncapped",
                    "tau_llama_cpp", "capped_share", "conditional_acceptance", "survival"):
            assert key in o
        assert o["speedup"] == pytest.approx(o["tokens_per_s"] / o["plain_tokens_per_s"])
        for ds in entry["datasets"].values():
            assert ds["speedup"] == pytest.approx(ds["tokens_per_s"] / ds["plain_tokens_per_s"])
        assert o["samples"] == 2 + 3  # qa: 2 records; chat: 2 records, 3 turns
        if name != "plain":
            assert o["mismatches"] == 0 and o["compared"] == 5  # lossless in float64
    # the accept path ran (so the equality above says something)
    assert m["drafts"]["ngram"]["overall"]["acceptance_rate"] > 0
    assert m["drafts"]["dspark"]["overall"]["acceptance_rate"] > 0
    overall = m["drafts"]["dspark"]["overall"]
    pooled = sum(m["drafts"]["dspark"]["datasets"][d]["rounds"] for d in ("qa", "chat"))
    assert overall["rounds"] == pooled  # overall pools the rounds of every dataset
    assert m["drafts"]["plain"]["overall"]["tau"] == 1.0
    lo, hi = overall["tau_ci"]  # bootstrap over the 4 records (chat's turns resampled together)
    assert lo <= overall["tau"] <= hi
    pairs = {(c["first"], c["second"]): c for c in m["comparisons"]}
    assert set(pairs) == {("ngram", "dspark"), ("ngram", "dflash"), ("ngram", "eagle3"), ("dspark", "dflash"),
                          ("dspark", "eagle3"), ("dflash", "eagle3")}
    c = pairs[("dspark", "dflash")]
    assert c["records"] == 4 and c["tau_ratio"] == pytest.approx(overall["tau"] / m["drafts"]["dflash"]["overall"]["tau"])
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    by_key = {}
    for a in answers:
        by_key.setdefault((a["dataset"], a["record"], a["turn"]), {})[a["decoder"]] = a["ids"]
    assert len(by_key) == 5 and all(set(v) == names for v in by_key.values())
    assert all(len({tuple(ids) for ids in v.values()}) == 1 for v in by_key.values())
    report = (out / "report.md").read_text()
    assert "τ dspark / τ dflash = " in report and "paired bootstrap over 4 records" in report
    for png in ("tau_per_dataset.png", "acceptance_by_position.png", "tokens_per_s.png"):
        assert f"]({png})" in report and (out / png).stat().st_size > 1000
    for name in names:
        assert f"**{name}**" in report


def test_eval_static_kv_decodes_through_the_static_cache_losslessly(world, eval_dir, tmp_path, monkeypatch):
    from draftsmith.decoding.kv import StaticTargetKV

    calls = []
    left_pad = StaticTargetKV.left_pad.__func__
    monkeypatch.setattr(StaticTargetKV, "left_pad",
                        classmethod(lambda cls, *a, **k: calls.append(1) or left_pad(cls, *a, **k)))
    out = tmp_path / "out"
    assert commands.run(eval_args(world, eval_dir, out, "--max-samples", "1", "--static-kv")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert calls  # every decoder's runs went through the static cache
    for name, entry in m["drafts"].items():
        if name != "plain":
            assert entry["overall"]["mismatches"] == 0 and entry["overall"]["compared"] > 0, name


def test_eval_n_max_is_recorded_and_lossless(world, eval_dir, tmp_path):
    """--n-max 2: DSpark/DFlash run llama.cpp's 2-slot block, EAGLE-3 and n-gram draft at most 2;
    recorded with the config and every decoder; greedy answers still equal plain decoding's."""
    out = tmp_path / "out"
    assert commands.run(eval_args(world, eval_dir, out, "--max-samples", "1", "--n-max", "2")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["n_max"] == 2 and m["config"]["truncate"] == "none"
    decoders = m["config"]["decoders"]
    assert decoders["plain"]["n_max"] is None
    assert all(decoders[n]["n_max"] == 2 for n in ("ngram", "dspark", "dflash", "eagle3"))
    for name, entry in m["drafts"].items():
        if name != "plain":
            o = entry["overall"]
            assert o["mismatches"] == 0 and o["compared"] == 3, name  # qa: 1, chat: 1 record, 2 turns
            assert o["mean_draft_len"] <= 2, name
    for name in ("dspark", "dflash", "eagle3"):
        assert m["drafts"][name]["overall"]["mean_draft_len"] == 2  # every round drafts exactly 2
    assert m["drafts"]["dspark"]["overall"]["acceptance_rate"] > 0
    with pytest.raises(InputError, match=r"draft 'dflash': n_max 4 must lie in 1\.\.3"):
        commands.run(eval_args(world, eval_dir, tmp_path / "o4", "--max-samples", "1", "--n-max", "4"))
    with pytest.raises(InputError, match="n_max 0 must be >= 1"):
        commands.run(eval_args(world, eval_dir, tmp_path / "o0", "--n-max", "0"))


def test_eval_command_errors(world, eval_dir, tmp_path):
    with pytest.raises(InputError, match="unknown baseline"):
        commands.run(eval_args(world, eval_dir, tmp_path / "o", "--baselines", "medusa"))
    with pytest.raises(InputError, match="NAME=PATH"):
        commands.parse_drafts(["nodir"])
    with pytest.raises(InputError, match="taken"):
        commands.run(eval_args(world, eval_dir, tmp_path / "o", "--draft", f"ngram={world['root'] / 'dspark'}"))
    with pytest.raises(InputError, match="unknown dataset"):
        commands.run(eval_args(world, eval_dir, tmp_path / "o", "--datasets", "nope"))


def test_report_renders_sampled_runs(tmp_path):
    """At T > 0 mismatches are not defined: the report shows a dash, plots still render."""
    plain, draft = Tally(), Tally()
    plain.add(Generation([[1] * 10], ["eos"], [rnd([0], [0], [0], [1])] * 9, 1.0, 4.0))
    draft.add(hand_generation())
    m = json_safe(build_metrics({"plain": {"a": plain}, "d": {"a": draft}}, compare=False))
    path = write_report(m, tmp_path)
    text = path.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| **d** |"))
    assert row.endswith("| – |")  # mismatches: not compared at T > 0
    assert (tmp_path / "tau_per_dataset.png").is_file()


def test_calibrate_then_truncated_eval_stays_lossless(world, eval_dir, tmp_path):
    """`draftsmith calibrate` stores STS temperatures with the draft; eval's survival and p-min
    truncation read them and still give plain decoding's answers (float64)."""
    import shutil

    from draftsmith.eval import calibrate
    from draftsmith.models.calibration import load_calibration

    draft = tmp_path / "dspark"
    shutil.copytree(world["root"] / "dspark", draft)
    p = argparse.ArgumentParser()
    calibrate.add_args(p)
    out = tmp_path / "cal"
    assert calibrate.run(p.parse_args([
        "--draft", str(draft), "--target", str(world["target"]), "--datasets", "qa,chat",
        "--eval-dir", str(eval_dir), "--max-new-tokens", "24", "--threads", "1", "--no-progress",
        "--out", str(out)])) == 0
    cal = load_calibration(draft)
    assert cal is not None and cal.decoding_temperature == 0.0 and len(cal.sts_temperatures) == 4
    report = json.loads((out / "calibration.json").read_text())
    assert report["rounds"] == cal.rounds > 0 and len(report["before"]) == 4
    assert (out / "reliability.png").is_file() and "![reliability]" in (out / "calibration.md").read_text()
    for rule in ("survival=0.3", "p-min=0.5"):
        p = argparse.ArgumentParser()
        commands.add_args(p)
        res = tmp_path / rule
        assert commands.run(p.parse_args([
            "--target", str(world["target"]), "--draft", f"dspark={draft}", "--datasets", "qa",
            "--eval-dir", str(eval_dir), "--max-new-tokens", "16", "--dtype", "fp64", "--threads", "1",
            "--no-progress", "--truncate", rule, "--out", str(res)])) == 0
        m = json.loads((res / "metrics.json").read_text())
        assert m["config"]["decoders"]["dspark"]["truncate"].startswith(rule)
        assert m["drafts"]["dspark"]["overall"]["mismatches"] == 0
    # survival truncation without a stored calibration is refused, a malformed rule too
    with pytest.raises(InputError, match="no calibration.json"):
        p = argparse.ArgumentParser()
        commands.add_args(p)
        commands.run(p.parse_args(["--target", str(world["target"]), "--draft", f"d={world['root'] / 'dspark'}",
                                   "--datasets", "qa", "--eval-dir", str(eval_dir), "--truncate",
                                   "survival=0.5", "--no-progress", "--out", str(tmp_path / "x")]))
    with pytest.raises(InputError, match="expected none"):
        commands.run(eval_args(world, eval_dir, tmp_path / "y", "--truncate", "sometimes"))


def test_help_shows_max_new_tokens_and_batch_size_defaults():
    p = argparse.ArgumentParser()
    commands.add_args(p)
    text = " ".join(p.format_help().split())
    assert "per answer (per turn) (default: 256)" in text
    assert "prompts decoded together (default: 1)" in text
