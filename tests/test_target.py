"""Targets: alias resolution, feature taps, export-hf round trip, tiny random families."""

import pytest
import torch

from draftsmith.target.model import TargetModel, check_layer_ids, load_hf_model, load_target_model
from draftsmith.target.resolve import resolve_target
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
