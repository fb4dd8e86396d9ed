"""Targets: alias resolution, feature taps, export-hf round trip, tiny random families."""

import pytest
import torch

from draftsmith.targets.model import TargetModel, check_layer_ids, load_hf_model, load_target_model
from draftsmith.targets.resolve import TargetSource, resolve_target
from draftsmith.utils.io import InputError
from tiny_targets import tiny_target


def test_unknown_alias_and_missing_files_fail_clearly(tmp_path):
    with pytest.raises(InputError, match="unknown target 'smollm9'"):
        resolve_target("smollm9")
    with pytest.raises(InputError, match="GGUF file not found"):
        resolve_target(str(tmp_path / "x.gguf"))
    (tmp_path / "d").mkdir()
    with pytest.raises(InputError, match="no config.json"):
        resolve_target(str(tmp_path / "d"))


def test_layer_ids_are_checked():
    check_layer_ids([0, 3, 28], 30)
    with pytest.raises(InputError, match="final layer"):
        check_layer_ids([1, 29], 30)
    with pytest.raises(InputError, match="out of range"):
        check_layer_ids([30], 30)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma"])
def test_features_equal_hidden_states_of_chosen_layers(family):
    model = tiny_target(family)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    target = TargetModel(model, [0, 2])
    out = target(ids)
    ref = model(ids, output_hidden_states=True)
    H = model.config.hidden_size
    assert out.features.shape == (2, 9, 2 * H) and out.hidden.shape == (2, 9, H)
    # bitwise: two forwards of the same [2, 9] ids through the same kernels in this process
    torch.testing.assert_close(out.features[..., :H], ref.hidden_states[1], rtol=0, atol=0)
    torch.testing.assert_close(out.features[..., H:], ref.hidden_states[3], rtol=0, atol=0)
    torch.testing.assert_close(target.logits(out.hidden), ref.logits, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_export_hf_greedy_equals_gguf(tmp_path, smol_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from draftsmith.cli import main

    out = tmp_path / "smol-hf"
    assert main(["target", "export-hf", "--target", "smollm2-135m", "--out", str(out)]) == 0
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == smol_tokenizer.chat_template
    gguf = load_hf_model(resolve_target("smollm2-135m"))
    prompt = tok.apply_chat_template([{"role": "user", "content": "Name three colors."}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    a = exported.generate(**prompt, max_new_tokens=24, do_sample=False)
    b = gguf.generate(**prompt, max_new_tokens=24, do_sample=False)
    assert torch.equal(a, b)
    assert a.shape[1] > prompt["input_ids"].shape[1] + 4


@pytest.mark.slow
def test_alias_loads_through_cached_plain_dir():
    model, source = load_target_model("smollm2-135m")
    assert source.kind == "gguf" and model.config.num_hidden_layers == 30
    assert "quantization_config" not in model.config.to_dict()


# ---- issue 13: loading bars under --no-progress, materialized-target cache key ----------------


def test_no_progress_hides_the_loading_bars(tmp_path, capfd, monkeypatch):
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    from draftsmith.targets import model as target_model

    from draftsmith.targets.export_hf import export_hf
    from train_fixtures import make_target_dir

    out = make_target_dir(tmp_path, "llama")  # with a tokenizer, for export_hf
    source = TargetSource(str(out), "hf_dir", str(out))
    capfd.readouterr()
    load_hf_model(source, progress=True)
    assert "Loading weights" in capfd.readouterr().err  # the bar this test is about
    load_hf_model(source, progress=False)
    assert "Loading weights" not in capfd.readouterr().err
    export_hf(source, tmp_path / "plain", progress=False)  # how a GGUF target is materialized
    assert "Loading weights" not in (err := capfd.readouterr().err) and "Writing model" not in err
    monkeypatch.setattr(target_model, "_load_progress", True)  # restored after the test
    target_model.set_load_progress(False)  # what `draftsmith ... --no-progress` does
    load_target_model(str(out))
    with target_model.loading_progress(None):  # GGUF dequantization uses tqdm directly
        list(gguf_utils.tqdm(range(3), desc="de-quantizing"))
    assert "Loading weights" not in (err := capfd.readouterr().err) and "de-quantizing" not in err
    assert hf_logging.is_progress_bar_enabled()  # switched back off only while loading


def test_cli_no_progress_sets_the_loading_default(tmp_path, monkeypatch):
    from draftsmith import cli
    from draftsmith.targets import model as target_model

    monkeypatch.setattr(target_model, "_load_progress", True)
    missing = str(tmp_path / "missing.jsonl")
    assert cli.main(["eval", "--datasets", missing, "--out", str(tmp_path / "o")]) == 2
    assert target_model._load_progress is True
    assert cli.main(["eval", "--datasets", missing, "--out", str(tmp_path / "o"),
                     "--no-progress"]) == 2
    assert target_model._load_progress is False


def _fake_gguf(path, middle: bytes):
    """A file whose first and last MiB are fixed and whose middle is `middle`."""
    end = bytes(range(256)) * 4096  # 1 MiB
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(end + middle + end)
    return TargetSource(str(path), "gguf", str(path.parent), path.name)


def test_materialized_dir_is_keyed_by_the_whole_file(tmp_path, monkeypatch):
    import os

    from draftsmith.targets.model import materialized_dir

    monkeypatch.setenv("DRAFTSMITH_CACHE", str(tmp_path / "cache"))
    a = _fake_gguf(tmp_path / "a" / "m.gguf", b"\x00" * 4096)
    b = _fake_gguf(tmp_path / "b" / "m.gguf", b"\x00" * 2048 + b"\x01" + b"\x00" * 2047)
    key_a, key_b = materialized_dir(a), materialized_dir(b)
    assert key_a != key_b  # same size, same first and last MiB, different middle
    assert key_a.parent == key_b.parent == tmp_path / "cache" / "targets"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["m.gguf"]  # nothing beside it
    # the hash is cached by (path, size, mtime_ns): same stat -> not read again
    stat = a.gguf_path.stat()
    a.gguf_path.write_bytes(b.gguf_path.read_bytes())
    os.utime(a.gguf_path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert materialized_dir(a) == key_a
    os.utime(a.gguf_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert materialized_dir(a) == key_b  # re-hashed: now the same content as b
