"""What a training run records about itself and refuses: compute dtypes chosen for the machine,
what stopped it, resumes with other inputs, late or misattributed errors."""

import json
import logging

import pytest
import torch

from draftsmith.train.metrics import read_metrics
from draftsmith.utils import dtypes
from draftsmith.utils.io import InputError
from train_fixtures import make_data, make_recipe, make_target_dir


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    return {"data": make_data(root / "data.jsonl"), "llama": make_target_dir(root, "llama")}


def _recipe(world, tmp_path, *overrides, **sections):
    from draftsmith.train.recipe import load_recipe

    return load_recipe(str(make_recipe(tmp_path / "r.yaml", world["llama"], "dspark", **sections)),
                       list(overrides))


def _train(recipe, data, run):
    from draftsmith.drafters import train

    return train(recipe, str(data), run, progress=False)


# --------------------------------------------------------------------------- compute dtypes


@pytest.mark.parametrize("native,expect", [(True, "bf16"), (False, "fp32")])
def test_auto_dtype_follows_native_bf16(monkeypatch, native, expect):
    monkeypatch.setattr(dtypes, "cpu_bf16_support", lambda: (native, "probe"))
    chosen = dtypes.resolve("auto", "cpu")
    assert chosen.name == expect and chosen.torch == dtypes.TORCH[expect]
    assert chosen.reason.startswith("auto")
    assert dtypes.resolve("bf16", "cpu").name == "bf16"  # an explicit choice is kept
    assert dtypes.resolve("fp32", "cpu").reason == "set explicitly"


def test_this_cpu_probe_agrees_with_its_flags():
    native, why = dtypes.cpu_bf16_support()
    flags = dtypes._cpuinfo_flags()
    if flags:  # Linux: the decision must match what the kernel reports
        assert native == bool({"amx_bf16", "avx512_bf16"} & flags), why


def test_shipped_cpu_recipes_default_to_auto():
    from draftsmith.train.recipe import load_recipe

    for name in ("smollm2-135m/dspark", "smollm2-135m/dflash", "smollm2-135m/eagle3"):
        r = load_recipe(name)
        assert r.features.target_dtype == "auto" and r.train.precision == "auto", name
        # one sample per forward on a CPU (padded batches ran the cache at half the tokens/s on
        # an AVX2 CPU); padded on a GPU
        assert r.features.batching == "auto", name
        # defined by optimizer steps, the time budget only a guard above them
        assert r.train.max_steps and r.train.time_budget_min >= 60, name


def test_run_records_dtypes_and_what_stopped_it(world, tmp_path, monkeypatch):
    monkeypatch.setattr(dtypes, "cpu_bf16_support", lambda: (False, "no native bf16 (test)"))
    run = tmp_path / "run"
    _train(_recipe(world, tmp_path, "train.max_steps=3", "features.target_dtype=auto", "train.precision=auto"),
           world["data"], run)
    records = read_metrics(run)
    compute = [m["compute"] for m in records if "compute" in m]
    assert compute == [{"target_dtype": {"dtype": "fp32", "reason": "auto: no native bf16 (test)"},
                        "precision": {"dtype": "fp32", "reason": "auto: no native bf16 (test)"}}]
    assert records[-1]["stopped_by"] == "max_steps" and records[-1]["step"] == 3


def test_time_budget_stop_is_recorded_and_printed(world, tmp_path, capsys):
    from draftsmith.cli import main

    recipe = make_recipe(tmp_path / "r.yaml", world["llama"], "dspark")
    run = tmp_path / "run"
    rc = main(["train", "--recipe", str(recipe), "--data", str(world["data"]), "--out", str(run),
               "--no-progress", "--set", "train.time_budget_min=0.0001"])
    assert rc == 0
    end = read_metrics(run)[-1]
    assert end["stopped_by"] == "time_budget" and end["step"] == 1
    assert "stopped by the time budget at step 1" in capsys.readouterr().out
    # resuming past the budget stop drops the old end marker: one end record, the last one
    rc = main(["train", "--recipe", str(recipe), "--data", str(world["data"]), "--out", str(run),
               "--no-progress", "--set", "train.max_steps=3"])
    records = read_metrics(run)
    assert rc == 0 and [m for m in records if "stopped_by" in m] == [records[-1]]
    assert records[-1]["stopped_by"] == "max_steps" and records[-1]["step"] == 3


# --------------------------------------------------------------------------- resume


def test_resume_refuses_other_data(world, tmp_path):
    run = tmp_path / "run"
    _train(_recipe(world, tmp_path, "train.max_steps=2"), world["data"], run)
    changed = tmp_path / "changed.jsonl"
    lines = world["data"].read_text().splitlines()
    rec = json.loads(lines[3])
    rec["conversations"][-1]["content"] += " and then some more words"  # same ids, other content
    changed.write_text("\n".join(lines[:3] + [json.dumps(rec)] + lines[4:]) + "\n")
    with pytest.raises(InputError, match="started with other data.*train:"):
        _train(_recipe(world, tmp_path, "train.max_steps=4"), changed, run)
    assert (run / "step_latest").resolve().name == "step_2"
    # the same data resumes
    assert _train(_recipe(world, tmp_path, "train.max_steps=4"), world["data"], run).name == "step_4"


def test_resume_refuses_another_recipe_but_takes_resumable_keys(world, tmp_path):
    run = tmp_path / "run"
    _train(_recipe(world, tmp_path, "train.max_steps=2"), world["data"], run)
    with pytest.raises(InputError, match=r"another recipe \(model.block_size: 3 -> 4"):
        _train(_recipe(world, tmp_path, "train.max_steps=4", "model.block_size=4"), world["data"], run)
    recipe = make_recipe(tmp_path / "e3.yaml", world["llama"], "eagle3")
    from draftsmith.train.recipe import load_recipe

    with pytest.raises(InputError, match="drafter: 'dspark' -> 'eagle3'"):
        _train(load_recipe(str(recipe), ["train.max_steps=4"]), world["data"], run)
    final = _train(_recipe(world, tmp_path, "train.max_steps=4", "train.eval_every=1", "train.threads=2",
                           "train.checkpoint_every=1"), world["data"], run)
    assert final.name == "step_4"
    assert json.loads((run / "recipe.json").read_text())["train"]["max_steps"] == 4


def test_rerun_with_lower_max_steps_changes_nothing(world, tmp_path):
    run = tmp_path / "run"
    _train(_recipe(world, tmp_path, "train.max_steps=3"), world["data"], run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    final = _train(_recipe(world, tmp_path, "train.max_steps=2"), world["data"], run)
    assert final.name == "step_3"
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert json.loads((run / "recipe.json").read_text())["train"]["max_steps"] == 3


def test_no_resume_starts_over_with_new_inputs(world, tmp_path):
    run = tmp_path / "run"
    _train(_recipe(world, tmp_path, "train.max_steps=2"), world["data"], run)
    from draftsmith.drafters import train

    final = train(_recipe(world, tmp_path, "train.max_steps=2", "model.block_size=4"), str(world["data"]),
                  run, resume=False, progress=False)
    assert final.name == "step_2"
    assert json.loads((run / "recipe.json").read_text())["model"]["block_size"] == 4


# --------------------------------------------------------------------------- early, right errors


def test_missing_data_fails_before_the_target_loads(world, tmp_path, monkeypatch):
    from draftsmith.train import setup

    def no_load(*a, **k):
        raise AssertionError("the target was loaded before --data was checked")

    monkeypatch.setattr(setup, "load_target_model", no_load)
    with pytest.raises(InputError, match="--data .*missing.jsonl"):
        _train(_recipe(world, tmp_path), tmp_path / "missing.jsonl", tmp_path / "run")
    with pytest.raises(InputError, match="--heldout .*nope.jsonl"):
        _train(_recipe(world, tmp_path, f"data.heldout={tmp_path / 'nope.jsonl'}"), world["data"],
               tmp_path / "run")


def test_set_errors_blame_the_set_flag_not_the_file(world, tmp_path):
    with pytest.raises(InputError) as e:
        _recipe(world, tmp_path, "optim.lr=-1")
    assert str(e.value).startswith("--set optim.lr=-1: optim.lr:"), str(e.value)
    (tmp_path / "bad.yaml").write_text(make_recipe(tmp_path / "r.yaml", world["llama"], "dspark")
                                       .read_text().replace("lr: 0.003", "lr: -1"))
    from draftsmith.train.recipe import load_recipe

    with pytest.raises(InputError) as e:  # negative control: a bad value in the file blames the file
        load_recipe(str(tmp_path / "bad.yaml"))
    assert str(e.value).startswith(f"{tmp_path / 'bad.yaml'}: optim.lr:"), str(e.value)
    with pytest.raises(InputError, match="e.g. --set optim.lr=3e-4"):
        _recipe(world, tmp_path, "optim.lr")


def test_empty_heldout_split_warns_and_logs_no_bare_steps(world, tmp_path, caplog):
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        _train(_recipe(world, tmp_path, "train.max_steps=4", "data.heldout_fraction=0"), world["data"], run)
    assert "held-out split is empty" in caplog.text
    assert all(set(m) - {"step"} for m in read_metrics(run)), "a metrics line with nothing but a step"
    assert not any("eval/tau_sim" in m for m in read_metrics(run))


def test_train_threads_hold_for_the_run_only(world, tmp_path):
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    _train(_recipe(world, tmp_path, "train.max_steps=1", f"train.threads={want}"), world["data"], tmp_path / "run")
    assert torch.get_num_threads() == before


def test_resume_of_a_run_recorded_before_a_new_recipe_key(world, tmp_path):
    run = tmp_path / "run"
    _train(_recipe(world, tmp_path, "train.max_steps=2"), world["data"], run)
    old = json.loads((run / "recipe.json").read_text())
    del old["data"]["max_record_chars"]  # as written before the key existed
    (run / "recipe.json").write_text(json.dumps(old))
    assert _train(_recipe(world, tmp_path, "train.max_steps=3"), world["data"], run).name == "step_3"
    with pytest.raises(InputError, match="data.max_record_chars: 1000000 -> 50"):
        _train(_recipe(world, tmp_path, "train.max_steps=4", "data.max_record_chars=50"), world["data"], run)


def test_records_over_the_size_guard_are_skipped_and_named(world, tmp_path, caplog):
    data = tmp_path / "data.jsonl"
    lines = world["data"].read_text().splitlines()
    big = {"id": "huge", "conversations": [{"role": "user", "content": "x " * 400},
                                           {"role": "assistant", "content": "y " * 400}]}
    data.write_text("\n".join(lines + [json.dumps(big)]) + "\n")
    with caplog.at_level(logging.WARNING):
        _train(_recipe(world, tmp_path, "train.max_steps=1", "data.max_record_chars=1000"), data, tmp_path / "run")
    assert "over data.max_record_chars 1000: skipped" in caplog.text and "huge" in caplog.text
    assert json.loads((tmp_path / "run" / "data.json").read_text())["train_records"] + \
        json.loads((tmp_path / "run" / "data.json").read_text())["heldout_records"] == len(lines)


# --------------------------------------------------------------------------- data sources


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _conv(rid, answer="alpha beta gamma delta"):
    return {"id": rid, "conversations": [{"role": "user", "content": "tell me"},
                                         {"role": "assistant", "content": answer}]}


def _data_cfg(**kw):
    from draftsmith.train.recipe import DataConfig

    return DataConfig(**{"max_length": 96, **kw})


def test_heldout_conversations_never_reach_training_through_another_source(world, tmp_path):
    """A held-out conversation (ShareGPT ids `<conv>_<part>`) is excluded from --data's other
    parts and from every mix source, with a held-out file and with the hash split alike."""
    from draftsmith.targets.model import load_tokenizer
    from draftsmith.data.sources import sharegpt_conversation as conversation_key
    from draftsmith.train.dataset import prepare_data

    tok = load_tokenizer(str(world["llama"]))
    main = _write(tmp_path / "regen.jsonl", [_conv(f"c{i}_0") for i in range(40)])
    raw = _write(tmp_path / "raw.jsonl", [_conv(f"c{i}_{p}", "raw words here") for i in range(40) for p in (0, 1)])
    held = _write(tmp_path / "held.jsonl", [_conv("c3_0"), _conv("c7_0")])

    data = prepare_data(str(main), tok, _data_cfg(heldout=str(held), mix=[{"path": str(raw)}]))
    trained = {s.id.split(":")[-1] for s in data.train}
    assert {conversation_key(i) for i in trained} & {"c3", "c7"} == set()
    assert len(data.train) == 38 + 76 and any(s.id.startswith("mix0:") for s in data.train)

    data = prepare_data(str(main), tok, _data_cfg(heldout_fraction=0.25, mix=[{"path": str(raw), "ratio": 0.5}]))
    held_keys = {conversation_key(s.id) for s in data.heldout}
    assert held_keys and not held_keys & {conversation_key(s.id.split(":")[-1]) for s in data.train}
    n_main = sum(not s.id.startswith("mix") for s in data.train)
    assert sum(s.id.startswith("mix0:") for s in data.train) == round(0.5 / (1 - 0.5) * n_main)  # half the set
    assert any("held-out conversation record(s) excluded" in line for line in data.lines)

    # negative control: the exclusion is what keeps them out (the raw source holds the held-out ids)
    assert {conversation_key(r.split(":")[-1]) for r in (f"c{i}_1" for i in range(40))} >= held_keys


def test_mix_ratio_is_a_share_in_0_1(world, tmp_path):
    """data.mix ratio: a source's share of the training records; outside [0, 1] or shares that
    leave --data nothing: one line naming the field."""
    from draftsmith.config import build_config
    from draftsmith.targets.model import load_tokenizer
    from draftsmith.train.dataset import prepare_data
    from draftsmith.train.recipe import DataConfig

    for bad in (1.5, -0.1):
        with pytest.raises(InputError, match=r"recipe.yaml: mix\.0\.ratio: ") as e:
            build_config(DataConfig, {"mix": [{"path": "raw.jsonl", "ratio": bad}]}, where="recipe.yaml")
        assert "\n" not in str(e.value)
    tok = load_tokenizer(str(world["llama"]))
    main = _write(tmp_path / "regen.jsonl", [_conv(f"c{i}_0") for i in range(20)])
    raw = _write(tmp_path / "raw.jsonl", [_conv(f"r{i}_0", "raw words") for i in range(30)])
    with pytest.raises(InputError, match="data.mix ratios sum to 1"):
        prepare_data(str(main), tok, _data_cfg(heldout_fraction=0.0, mix=[{"path": str(raw), "ratio": 0.6},
                                                                          {"path": str(raw), "ratio": 0.4}]))
    data = prepare_data(str(main), tok, _data_cfg(heldout_fraction=0.0, mix=[{"path": str(raw), "ratio": 0.2}]))
    assert sum(s.id.startswith("mix0:") for s in data.train) == 5  # 0.2 of 25 records
    data = prepare_data(str(main), tok, _data_cfg(heldout_fraction=0.0, mix=[{"path": str(raw), "ratio": 0.9}]))
    assert sum(s.id.startswith("mix0:") for s in data.train) == 30  # asks 180: all 30, and says so
    assert any("asks for 180 records, the source has 30: all used" in line for line in data.lines)


def test_long_records_become_windows_instead_of_being_cut(world, tmp_path):
    from draftsmith.targets.model import load_tokenizer
    from draftsmith.train.dataset import prepare_data

    tok = load_tokenizer(str(world["llama"]))
    long = " ".join(["alpha beta gamma delta epsilon"] * 40)
    data_path = _write(tmp_path / "d.jsonl", [_conv("long_0", long), _conv("short_0")])
    cut = prepare_data(str(data_path), tok, _data_cfg(max_length=64, heldout_fraction=0.0))
    win = prepare_data(str(data_path), tok, _data_cfg(max_length=64, heldout_fraction=0.0, long_records="windows"))
    full = tok.apply_chat_template(_conv("x", long)["conversations"], tokenize=True)
    full = list(full["input_ids"] if isinstance(full, dict) or hasattr(full, "keys") else full)
    assert [s.id for s in cut.train] == ["long_0", "short_0"] and len(cut.train[0].input_ids) == 64
    windows = [s for s in win.train if s.id.startswith("long_0#w")]
    assert len(windows) == -(-len(full) // 64) and all(len(s.input_ids) <= 64 for s in windows)
    # the windows tile the whole record; a window's first token is never a label
    assert sum((s.input_ids for s in windows), []) == full
    assert all(s.loss_mask[0] == 0 for s in windows)
    assert sum(sum(s.loss_mask) for s in windows) > sum(cut.train[0].loss_mask)


# --------------------------------------------------------------------------- streaming (data.stream)


def _stream_world(tmp_path):
    long = " ".join(["alpha beta gamma delta epsilon"] * 12)
    main = _write(tmp_path / "regen.jsonl", [_conv(f"c{i}_0", long if i % 5 == 0 else f"answer {i} beta")
                                             for i in range(40)])
    raw = _write(tmp_path / "raw.jsonl", [_conv(f"c{i}_{p}", "raw words here") for i in range(40) for p in (0, 1)])
    return main, raw


def test_stream_matches_the_in_memory_path_on_limits_guards_and_a_heldout_file(world, tmp_path):
    from draftsmith.targets.model import load_tokenizer
    from draftsmith.train.dataset import prepare_data

    tok = load_tokenizer(str(world["llama"]))
    main, raw = _stream_world(tmp_path)
    (tmp_path / "bad.jsonl").write_text(main.read_text() + "not json\n" + json.dumps(_conv("big_0", "x" * 900)) + "\n")
    held = _write(tmp_path / "held.jsonl", [_conv("c3_0"), _conv("c7_0", "held answer")])
    for k, cfg in enumerate(({"limit": 30, "heldout_fraction": 0.2, "mix": [{"path": str(raw), "ratio": 0.9}]},
                             {"heldout": str(held), "max_record_chars": 400, "mix": [{"path": str(raw)}]})):
        mem = prepare_data(str(tmp_path / "bad.jsonl"), tok, _data_cfg(**cfg))
        st = prepare_data(str(tmp_path / "bad.jsonl"), tok, _data_cfg(stream=True, **cfg), store=tmp_path / f"s{k}")
        assert _as_tuples(st.train) == _as_tuples(mem.train) and _as_tuples(st.heldout) == _as_tuples(mem.heldout)
        assert st.lines == mem.lines, (st.lines, mem.lines)


def test_an_empty_stream_publishes_no_store(world, tmp_path):
    from draftsmith.targets.model import load_tokenizer
    from draftsmith.train.dataset import prepare_data

    tok = load_tokenizer(str(world["llama"]))
    users_only = _write(tmp_path / "u.jsonl", [{"id": f"u{i}", "conversations": [{"role": "user", "content": "hi"}]}
                                               for i in range(5)])
    for _ in range(2):  # the second run fails the same way: no empty store was left to reuse
        with pytest.raises(InputError, match="no trainable tokens"):
            prepare_data(str(users_only), tok, _data_cfg(stream=True, heldout_fraction=0.0), store=tmp_path / "s")
    assert not (tmp_path / "s").exists()


def _as_tuples(samples):
    return [(s.id, s.input_ids, s.loss_mask, s.truncated, s.length_capped) for s in samples]


def test_stream_renders_the_same_samples_into_a_store_it_reuses(world, tmp_path):
    """data.stream: the training samples (held-out conversations excluded from every source, a
    mix ratio, windows) are those of the in-memory path, in the same order, read from disk."""
    from draftsmith.targets.model import load_tokenizer
    from draftsmith.train.dataset import prepare_data
    from draftsmith.train.samples import SampleStore

    tok = load_tokenizer(str(world["llama"]))
    main, raw = _stream_world(tmp_path)
    cfg = {"max_length": 32, "heldout_fraction": 0.25, "long_records": "windows",
           "mix": [{"path": str(raw), "ratio": 0.5}]}
    mem = prepare_data(str(main), tok, _data_cfg(**cfg))
    store = tmp_path / "run" / "samples"
    st = prepare_data(str(main), tok, _data_cfg(stream=True, **cfg), store=store)
    assert isinstance(st.train, SampleStore) and not isinstance(mem.train, SampleStore)
    assert _as_tuples(st.train) == _as_tuples(mem.train) and len(st.train) > 40
    assert any("#w" in s.id for s in st.train) and any(s.id.startswith("mix0:") for s in st.train)
    assert _as_tuples(st.heldout) == _as_tuples(mem.heldout)
    assert _as_tuples(st.train[3:6]) == _as_tuples(mem.train[3:6]) and st.train[-1].id == mem.train[-1].id
    assert st.lines == mem.lines and any("held-out conversation record(s) excluded" in x for x in st.lines)

    again = prepare_data(str(main), tok, _data_cfg(stream=True, **cfg), store=store)
    assert _as_tuples(again.train) == _as_tuples(mem.train) and again.lines == mem.lines
    other = _write(tmp_path / "other.jsonl", [_conv(f"o{i}_0") for i in range(10)])
    with pytest.raises(InputError, match="rendered from other data"):
        prepare_data(str(other), tok, _data_cfg(stream=True, **cfg), store=store)
    with pytest.raises(InputError, match="no sample store with these inputs"):  # a rank > 0 never writes
        prepare_data(str(other), tok, _data_cfg(stream=True, **cfg), store=tmp_path / "none", write_store=False)
    # a run starting over (--no-resume) rewrites its own store for the new data
    fresh = prepare_data(str(other), tok, _data_cfg(stream=True, **cfg), store=store, replace_store=True)
    assert {s.id.split("#")[0] for s in fresh.train if not s.id.startswith("mix0:")} <= {f"o{i}_0" for i in range(10)}
    with open(store / "tokens.bin", "r+b") as f:  # a damaged store is refused on open
        f.truncate(8)
    with pytest.raises(InputError, match="tokens.bin: 8 bytes, the manifest says"):
        SampleStore(store)


def test_stream_holds_a_sample_at_a_time_not_the_corpus(tmp_path):
    """Writing and reading a 1.2M-token store keeps Python allocations to a few MB; the same
    samples held as lists (the in-memory path, the control) take tens of MB."""
    import tracemalloc

    from draftsmith.data.templates import RenderedSample
    from draftsmith.train.samples import SampleStore

    def samples():
        for i in range(3000):
            yield RenderedSample(f"s{i}", list(range(300 + i % 7, 700 + i % 7)), [0] * 10 + [1] * 390)

    tracemalloc.start()
    try:
        store = SampleStore.write(tmp_path / "st", samples(), key="k")
        write_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        total = sum(sum(s.loss_mask) for s in store)
        read_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        held = list(samples())
        list_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total == 3000 * 390 and len(held) == len(store) == 3000
    assert store.manifest["tokens"] == 3000 * 400
    assert write_peak < 8e6 and read_peak < 8e6, (write_peak, read_peak)
    assert list_peak > 4 * max(write_peak, read_peak), (list_peak, write_peak, read_peak)
