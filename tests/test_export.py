"""Exporters: every format's config and tensors key by key (DESIGN §4), the layer-id dialects
(§3.1), the manifest, refusals with reasons, and export -> import round trips whose logits are
bit-identical to the original draft cast to the export dtype. GGUF exports (marked `llama`) are
read back against their manifest and served once by llama-server."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from draftsmith.export import export, import_draft
from draftsmith.export import commands, gguf
from draftsmith.export.manifest import read_manifest
from draftsmith.models.dflash import DFlashConfig
from draftsmith.models.dspark import DSparkConfig
from draftsmith.models.eagle3 import Eagle3Config
from draftsmith.models.io import build_draft, load_draft, save_draft
from draftsmith.utils.io import InputError
from tiny_targets import tiny_target
from train_fixtures import VOCAB, make_target_dir, qwen3_style

# DESIGN §4, written out independently of the exporter's own key map.
DEEPSPEC_ALWAYS = {"architectures", "model_type", "hidden_size", "intermediate_size",
                   "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                   "rope_theta", "vocab_size", "num_hidden_layers", "num_target_layers",
                   "block_size", "layer_types", "mask_token_id", "target_layer_ids", "num_anchors",
                   "enable_confidence_head", "markov_rank", "tie_word_embeddings"}
EAGLE3_MID = {f"{p}.{n}" for p in ("self_attn",) for n in
              ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")}
EAGLE3_MID |= {"mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
               "input_layernorm.weight", "hidden_norm.weight", "post_attention_layernorm.weight"}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory) -> Path:
    return make_target_dir(tmp_path_factory.mktemp("target"), "llama")


@pytest.fixture(scope="module")
def hf_target(target_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(target_dir).eval()


def _perturb(model, seed: int) -> None:
    """Random norms and biases too, so a swapped or dropped tensor changes the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


def make_draft(root: Path, hf_target, target_dir: Path, drafter: str, name: str,
               vocab: int | None = None, **overrides) -> Path:
    """A tiny draft saved as RUN/step_1 with RUN/recipe.json naming its target."""
    if drafter == "eagle3":
        fields = {"target_layer_ids": [0, 1, 2], "ttt_length": 3, "draft_vocab_size": vocab}
        cls = Eagle3Config
    else:
        fields = {"num_hidden_layers": 2, "block_size": 3, "mask_token_id": 5,
                  "target_layer_ids": [0, 2], "num_anchors": 8, "draft_vocab_size": vocab}
        cls = DSparkConfig if drafter == "dspark" else DFlashConfig
        if drafter == "dspark":
            fields["markov_rank"] = 8
    cfg = cls.from_target(hf_target.config, **{**fields, **overrides})
    torch.manual_seed(len(name))
    model = build_draft(cfg)
    kept = None
    if vocab:
        kept = torch.sort(torch.randperm(cfg.vocab_size)[:vocab]).values
    model.init_from_target(hf_target, kept)
    _perturb(model, len(name))
    run = root / name
    save_draft(model, run / "step_1")
    (run / "recipe.json").write_text(json.dumps({"drafter": drafter, "target": str(target_dir),
                                                 "data": {"max_length": 96}}))
    return run / "step_1"


def outputs(model, seed: int = 1) -> list[torch.Tensor]:
    """Draft logits (and confidence logits) on fixed random inputs, in the model's dtype."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    dtype = model.fc.weight.dtype
    feats = torch.randn(2, 12, model.fc.in_features, generator=gen).to(dtype)
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=gen)
    with torch.no_grad():
        if cfg.drafter == "eagle3":
            return [model.draft_logits(h) for h in model(feats, ids, ttt_length=3)]
        anchors = torch.tensor([[2, 5, 8], [1, 4, 9]])
        hidden = model(feats, ids, anchors)  # [2, 3, γ, H]
        prev = torch.randint(0, cfg.vocab_size, hidden.shape[:-1], generator=gen)
        out = [hidden, model.draft_logits(hidden, prev)]
        conf = model.confidence(hidden, prev)
        return out + ([conf] if conf is not None else [])


def assert_same_outputs(original, imported, dtype=torch.bfloat16) -> None:
    """Bitwise: the export stores the original's weights cast to `dtype`, so both models hold the
    same bytes and run the same kernels on the same inputs in this process (whatever those
    kernels are on this CPU: AMX or emulated bf16)."""
    want = outputs(original.to(dtype))
    got = outputs(imported)
    assert imported.fc.weight.dtype == dtype
    assert len(want) == len(got)
    for a, b in zip(want, got):
        assert a.dtype == b.dtype == dtype
        assert torch.equal(a, b)


def _config(out: Path) -> dict:
    return json.loads((out / "config.json").read_text())


# --------------------------------------------------------------------------- DeepSpec


def test_deepspec_dspark_keys_tensors_manifest_and_round_trip(tmp_path, hf_target, target_dir):
    src = make_draft(tmp_path, hf_target, target_dir, "dspark", "ds")
    out = export(src, "deepspec", tmp_path / "out")
    cfg = _config(out)
    assert DEEPSPEC_ALWAYS <= set(cfg)
    assert cfg["architectures"] == ["Qwen3DSparkModel"] and cfg["model_type"] == "qwen3"
    assert cfg["tie_word_embeddings"] is False and "draftsmith" not in cfg
    assert cfg["target_layer_ids"] == [0, 2]  # DeepSpec dialect: i
    assert cfg["confidence_head_with_markov"] is True and cfg["markov_head_type"] == "vanilla"
    assert "draft_vocab_size" not in cfg
    assert cfg["layer_types"] == ["full_attention"] * 2
    tensors = load_file(out / "model.safetensors")
    H, V, r = 32, cfg["vocab_size"], 8
    shapes = {"fc.weight": (H, 2 * H), "lm_head.weight": (V, H), "embed_tokens.weight": (V, H),
              "markov_head.markov_w1.weight": (V, r), "markov_head.markov_w2.weight": (V, r),
              "confidence_head.proj.weight": (1, H + r), "confidence_head.proj.bias": (1,),
              "hidden_norm.weight": (H,), "norm.weight": (H,),
              "layers.1.self_attn.k_norm.weight": (8,), "layers.0.mlp.down_proj.weight": (H, 64)}
    for name, shape in shapes.items():
        assert tuple(tensors[name].shape) == shape, name
    assert "d2t" not in tensors and all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert len(tensors) == 5 + 2 * 11 + 4

    manifest = read_manifest(out)
    from transformers import AutoTokenizer

    template = AutoTokenizer.from_pretrained(target_dir).chat_template
    assert manifest["target"]["chat_template_sha256"] == hashlib.sha256(template.encode()).hexdigest()
    assert manifest["target"]["id"] == str(target_dir)
    assert manifest["target"]["revision"].startswith("fingerprint:")
    assert manifest["layer_ids"]["draftsmith"] == [0, 2]
    assert "hidden_states[i + 1]" in manifest["layer_ids"]["semantic"]
    assert manifest["mask_token_id"] == 5 and manifest["block_size"] == 3
    assert manifest["max_trained_length"] == 96
    assert manifest["serve"]["spec_type"] == "draft-dspark" and manifest["serve"]["n_max"] == 3
    assert manifest["draftsmith_version"] and manifest["dtype"] == "bf16"

    original = load_draft(src)
    assert_same_outputs(original, load_draft(out))  # what a DeepSpec-only reader gets
    assert_same_outputs(original, import_draft(out))  # through the manifest


@pytest.mark.parametrize("rank,conf,with_markov", [(8, True, True), (8, False, True),
                                                    (0, True, False), (8, True, False)])
def test_deepspec_conditional_keys(tmp_path, hf_target, target_dir, rank, conf, with_markov):
    src = make_draft(tmp_path, hf_target, target_dir, "dspark", f"c{rank}{conf}{with_markov}",
                     markov_rank=rank, enable_confidence_head=conf,
                     confidence_head_with_markov=with_markov)
    cfg = _config(export(src, "deepspec", tmp_path / "out"))
    assert ("confidence_head_with_markov" in cfg) == conf
    assert ("markov_head_type" in cfg) == (rank > 0)
    if conf:
        assert cfg["confidence_head_with_markov"] == with_markov
        w = load_file(tmp_path / "out" / "model.safetensors")["confidence_head.proj.weight"]
        assert w.shape[1] == 32 + (rank if with_markov else 0)
    assert_same_outputs(load_draft(src), import_draft(tmp_path / "out"))


def test_pruned_dspark_is_the_llama_cpp_extension_and_says_so(tmp_path, hf_target, target_dir, caplog):
    src = make_draft(tmp_path, hf_target, target_dir, "dspark", "pruned", vocab=100)
    out = export(src, "deepspec", tmp_path / "out", dtype="fp16")
    cfg, tensors, manifest = _config(out), load_file(out / "model.safetensors"), read_manifest(out)
    assert cfg["draft_vocab_size"] == 100
    assert tensors["lm_head.weight"].shape[0] == 100 and tensors["d2t"].shape == (100,)
    assert tensors["markov_head.markov_w2.weight"].shape[0] == 100
    assert tensors["markov_head.markov_w1.weight"].shape[0] == cfg["vocab_size"]
    assert tensors["d2t"].dtype == torch.int64
    assert manifest["layout"] == "deepspec+llama.cpp-pruned-head"
    assert "DeepSpec cannot load it" in manifest["notes"][0]
    assert "DeepSpec cannot load it" in caplog.text
    assert manifest["vocab"] == {"vocab_size": 416, "draft_vocab_size": 100, "pruned": True}
    assert_same_outputs(load_draft(src), import_draft(out), torch.float16)
    with pytest.raises(InputError, match="pruned"):
        export(src, "vllm", tmp_path / "vllm")  # vLLM's dspark: not verified for the extension


def test_dflash_exports_as_qwen3_dspark_and_serves_as_draft_dspark(tmp_path, hf_target, target_dir):
    src = make_draft(tmp_path, hf_target, target_dir, "dflash", "dflash")
    for fmt in ("deepspec", "vllm", "sglang"):
        out = export(src, fmt, tmp_path / fmt, dtype="fp32")
        cfg, manifest = _config(out), read_manifest(out)
        assert cfg["architectures"] == ["Qwen3DSparkModel"] and cfg["markov_rank"] == 0
        assert cfg["enable_confidence_head"] is False
        assert "confidence_head_with_markov" not in cfg and "markov_head_type" not in cfg
        assert manifest["serve"]["llama_server_args"] == ["--spec-type", "draft-dspark",
                                                          "--spec-draft-n-max", "3"]
        assert_same_outputs(load_draft(src), import_draft(out), torch.float32)


def test_missing_key_error_says_why(tmp_path, hf_target, target_dir):
    out = export(make_draft(tmp_path, hf_target, target_dir, "dspark", "k"), "deepspec",
                 tmp_path / "out")
    cfg = _config(out)
    del cfg["mask_token_id"], cfg["markov_head_type"]
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError) as e:
        import_draft(out)
    msg = str(e.value)
    assert "mask_token_id: the token fed in slots 1..γ-1" in msg
    assert "markov_head_type: which Markov head" in msg


# --------------------------------------------------------------------------- DeepSpec's released layout


def test_import_deepspec_released_layout_sharded_and_for_training(tmp_path, hf_target, target_dir):
    """A deep copy of the target's config plus DeepSpec's keys (no draftsmith sub-dict, no
    manifest), weights sharded by an index: evaluable, and convertible for --init-from."""
    src = make_draft(tmp_path, hf_target, target_dir, "dspark", "rel", enable_confidence_head=False)
    model = load_draft(src)
    released = tmp_path / "released"
    released.mkdir()
    cfg = json.loads((target_dir / "config.json").read_text())
    cfg.update(architectures=["Qwen3DSparkModel"], model_type="qwen3", num_target_layers=4,
               num_hidden_layers=2, block_size=3, tie_word_embeddings=False,
               layer_types=["full_attention"] * 2, mask_token_id=5, target_layer_ids=[0, 2],
               num_anchors=512, enable_confidence_head=False, markov_rank=8,
               markov_head_type="vanilla", head_dim=8, torch_dtype="bfloat16")
    (released / "config.json").write_text(json.dumps(cfg))
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(released / file))
    (released / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    imported = import_draft(released)
    assert imported.config.num_anchors == 512 and imported.config.enable_confidence_head is False
    assert_same_outputs(model, imported)
    ours = export(released, "draftsmith", tmp_path / "ours", target=str(target_dir))
    assert_same_outputs(model, load_draft(ours))  # what `train --init-from` reads
    assert read_manifest(ours)["layout"] == "draftsmith"


# --------------------------------------------------------------------------- z-lab DFlash


def test_zlab_dflash_import_and_export(tmp_path, hf_target, target_dir):
    src = make_draft(tmp_path, hf_target, target_dir, "dflash", "zlab", slot_semantics="zlab",
                     block_size=6)
    model = load_draft(src)
    zdir = tmp_path / "z-lab"
    zdir.mkdir()
    cfg = json.loads((target_dir / "config.json").read_text())
    cfg.update(architectures=["DFlashDraftModel"], model_type="qwen3", num_hidden_layers=2,
               num_target_layers=4, block_size=6, head_dim=8,
               layer_types=["full_attention"] * 2,
               dflash_config={"mask_token_id": 5, "target_layer_ids": [0, 2]})
    (zdir / "config.json").write_text(json.dumps(cfg))
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()
             if k not in ("embed_tokens.weight", "lm_head.weight")}  # z-lab shares the target's
    save_file(state, str(zdir / "model.safetensors"))
    with pytest.raises(InputError, match="shares the target"):
        import_draft(zdir)
    imported = import_draft(zdir, target=str(target_dir))
    assert imported.config.slot_semantics == "zlab" and imported.config.block_size == 6
    assert_same_outputs(model, imported)

    with pytest.raises(InputError, match="one slot off"):
        export(src, "deepspec", tmp_path / "ds")
    out = export(src, "vllm", tmp_path / "vllm")
    cfg, manifest = _config(out), read_manifest(out)
    assert cfg["architectures"] == ["DFlashDraftModel"]
    assert cfg["dflash_config"]["target_layer_ids"] == [0, 2] and cfg["block_size"] == 6
    assert "embed_tokens.weight" not in load_file(out / "model.safetensors")
    assert manifest["layout"] == "zlab-dflash"
    assert manifest["serve"]["spec_type"] == "draft-dflash" and manifest["serve"]["n_max"] == 5
    assert_same_outputs(model, import_draft(out))  # target from the manifest


# --------------------------------------------------------------------------- EAGLE-3


@pytest.mark.parametrize("dialect", ["sglang", "vllm", "speculators"])
def test_eagle3_dialects(tmp_path, hf_target, target_dir, dialect):
    src = make_draft(tmp_path, hf_target, target_dir, "eagle3", "e3", vocab=64)
    out = export(src, dialect, tmp_path / dialect)
    cfg, tensors, manifest = _config(out), load_file(out / "model.safetensors"), read_manifest(out)
    ids = [0, 1, 2]
    if dialect == "sglang":
        assert cfg["architectures"] == ["LlamaForCausalLMEagle3"]
        assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == ids
        assert "eagle_aux_hidden_state_layer_ids" not in cfg
    elif dialect == "vllm":
        assert cfg["architectures"] == ["Eagle3LlamaForCausalLM"]
        assert cfg["eagle_aux_hidden_state_layer_ids"] == [i + 1 for i in ids]
        assert "eagle_config" not in cfg
    else:
        assert cfg["architectures"] == ["Eagle3Speculator"]
        assert cfg["speculators_model_type"] == "eagle3"
        spec = cfg["speculators_config"]
        assert spec["algorithm"] == "eagle3" and spec["default_proposal_method"] == "greedy"
        assert spec["proposal_methods"] == [{"proposal_type": "greedy", "speculative_tokens": 3}]
        assert spec["verifier"] == {"name_or_path": str(target_dir),
                                    "architectures": ["LlamaForCausalLM"]}
        assert cfg["transformer_layer_config"]["num_hidden_layers"] == 1
        assert cfg["norm_before_residual"] is False
        assert cfg["eagle_aux_hidden_state_layer_ids"] == [i + 1 for i in ids]
    if dialect != "speculators":
        assert cfg["num_hidden_layers"] == 1
        assert "norm_before_residual" not in cfg  # optional, written when true
    assert cfg["draft_vocab_size"] == 64 and cfg["target_hidden_size"] == 32
    prefix = "layers.0." if dialect == "speculators" else "midlayer."
    want = {prefix + n for n in EAGLE3_MID} | {"fc.weight", "norm.weight", "lm_head.weight", "d2t",
                                                "t2d", "embed_tokens.weight"}
    assert set(tensors) == want
    assert tensors["fc.weight"].shape == (32, 96) and tensors["lm_head.weight"].shape == (64, 32)
    assert tensors["d2t"].dtype == torch.int64 and tensors["t2d"].dtype == torch.bool
    assert int(tensors["t2d"].sum()) == 64
    assert manifest["layer_ids"]["engine_values"] == (ids if dialect == "sglang" else [1, 2, 3])
    assert manifest["serve"]["spec_type"] == "draft-eagle3" and manifest["mask_token_id"] is None
    assert_same_outputs(load_draft(src), import_draft(out))


def test_foreign_eagle3_without_manifest_needs_the_target(tmp_path, hf_target, target_dir):
    src = make_draft(tmp_path, hf_target, target_dir, "eagle3", "f3", norm_before_residual=True)
    out = export(src, "vllm", tmp_path / "vllm")
    assert _config(out)["norm_before_residual"] is True
    (out / "draftsmith_manifest.json").unlink()
    with pytest.raises(InputError, match="layer count"):
        import_draft(out)
    imported = import_draft(out, target=str(target_dir))
    assert imported.config.target_layer_ids == [0, 1, 2]  # i + 1 read back as i
    assert_same_outputs(load_draft(src), imported)


# --------------------------------------------------------------------------- refusals and CLI


def test_formats_refuse_what_their_engines_cannot_load(tmp_path, hf_target, target_dir):
    e3 = make_draft(tmp_path, hf_target, target_dir, "eagle3", "r3")
    ds = make_draft(tmp_path, hf_target, target_dir, "dspark", "rd")
    with pytest.raises(InputError, match="DeepSpec's format holds DSpark"):
        export(e3, "deepspec", tmp_path / "a")
    with pytest.raises(InputError, match="Eagle3Speculator"):
        export(ds, "speculators", tmp_path / "b")
    with pytest.raises(InputError, match="--spec-draft-p-min"):
        export(make_draft(tmp_path, hf_target, target_dir, "dflash", "rf"), "deepspec",
               tmp_path / "c", manifest_extra={"serve": {"p_min": 0.5}})
    other = make_target_dir(tmp_path / "other", "llama")
    bad = json.loads((other / "config.json").read_text())
    bad["num_hidden_layers"] = 6
    (other / "config.json").write_text(json.dumps(bad))
    with pytest.raises(InputError, match="num_target_layers: draft 4 vs target 6"):
        export(ds, "deepspec", tmp_path / "d", target=str(other))
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging left behind


def test_strict_key_check_rejects_conditional_keys_out_of_place(tmp_path, hf_target, target_dir):
    from draftsmith.export.deepspec import DEEPSPEC_KEYS
    from draftsmith.export.manifest import check_keys

    out = export(make_draft(tmp_path, hf_target, target_dir, "dflash", "s"), "deepspec",
                 tmp_path / "out")
    cfg = _config(out)
    check_keys(cfg, DEEPSPEC_KEYS, "ok", strict=True)
    with pytest.raises(InputError, match="markov_head_type must be absent"):
        check_keys({**cfg, "markov_head_type": "vanilla"}, DEEPSPEC_KEYS, "x", strict=True)
    zlab = make_draft(tmp_path, hf_target, target_dir, "dflash", "zp", vocab=50,
                      slot_semantics="zlab")
    with pytest.raises(InputError, match="no LM head of its own"):
        export(zlab, "gguf", tmp_path / "zp-gguf")  # not "zp": that is the draft's run dir


@pytest.mark.parametrize("overrides,reason", [
    ({"markov_head_type": "gated"}, "only the vanilla Markov head"),
    ({"markov_head_type": "rnn"}, "only the vanilla Markov head"),
    ({"confidence_head_with_markov": False}, "confidence head without Markov features"),
    ({"markov_rank": 0, "confidence_head_with_markov": False}, "confidence head without Markov"),
])
def test_gguf_refuses_what_llama_cpp_cannot_serve(tmp_path, hf_target, target_dir, overrides, reason):
    src = make_draft(tmp_path, hf_target, target_dir, "dspark", "g", **overrides)
    with pytest.raises(InputError, match=reason):
        export(src, "gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_gguf_refuses_gemma_outside_llama_cpp_limits():
    from tiny_targets import tiny_config

    cfg = DSparkConfig.from_target(tiny_config("gemma"), mask_token_id=0, markov_rank=8,
                                   draft_vocab_size=50)
    problems = "\n".join(gguf.servable_problems(cfg))
    assert "attention_k_eq_v" in problems and "full vocabulary" in problems
    assert "softcap" in problems and "gelu_pytorch_tanh" not in problems
    fixed = cfg.model_copy(update={"attention_k_eq_v": True, "draft_vocab_size": None,
                                   "final_logit_softcapping": None})
    assert gguf.servable_problems(fixed) == []
    assert "gelu_pytorch_tanh" in gguf.servable_problems(fixed.model_copy(update={"hidden_act": "silu"}))[0]


def test_cli_export(tmp_path, hf_target, target_dir, capsys):
    src = make_draft(tmp_path, hf_target, target_dir, "dspark", "cli")
    parser = argparse.ArgumentParser()
    commands.add_args(parser)
    args = parser.parse_args(["--draft", str(src.parent), "--format", "deepspec", "--out",
                              str(tmp_path / "out"), "--p-min", "0.3"])
    assert commands.run(args) == 0
    text = capsys.readouterr().out
    assert "target_layer_ids = [0, 2]" in text and "--spec-draft-p-min 0.3" in text
    assert read_manifest(tmp_path / "out")["serve"]["p_min"] == 0.3
    export(src, "deepspec", tmp_path / "out", dtype="fp32")  # an earlier export is replaced
    with pytest.raises(InputError, match="not written by draftsmith"):
        export(src, "deepspec", src.parent)  # a training run dir never is


# --------------------------------------------------------------------------- GGUF through llama.cpp


@pytest.fixture(scope="module")
def llama_target(tmp_path_factory, smol_tokenizer):
    """A tiny random Llama with SmolLM2's tokenizer (llama.cpp's converter needs a tokenizer it
    recognizes) as an HF dir and as an f16 GGUF."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from draftsmith.engines import llama_cpp

    root = tmp_path_factory.mktemp("llama-target")
    hf = root / "hf"
    smol_tokenizer.save_pretrained(hf)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True, bos_token_id=smol_tokenizer.bos_token_id,
                         eos_token_id=smol_tokenizer.eos_token_id, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(hf)
    llama_cpp.ensure_llama_server()
    return hf, model, llama_cpp.convert_hf_to_gguf(hf, root / "target.gguf", outtype="f16")


GGUF_CASES = {
    "dspark": ("dspark", None, {"markov_rank": 16}),
    "dspark-pruned": ("dspark", 4096, {"markov_rank": 16}),
    "dflash": ("dflash", None, {}),
    "zlab-dflash": ("dflash", None, {"slot_semantics": "zlab", "block_size": 5}),
    "eagle3-pruned": ("eagle3", 4096, {"target_layer_ids": [1, 2, 3]}),
}


@pytest.mark.llama
@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_gguf_export_matches_manifest_and_serves(tmp_path, llama_target, case, capsys):
    from draftsmith.engines.llama_cpp import read_gguf_metadata

    hf_dir, hf_model, target_gguf = llama_target
    drafter, vocab, overrides = GGUF_CASES[case]
    overrides = {"mask_token_id": 16, "target_layer_ids": [1, 3], **overrides}
    if drafter == "eagle3":
        overrides.pop("mask_token_id")
    src = make_draft(tmp_path, hf_model, hf_dir, drafter, case, vocab=vocab, **overrides)
    out = tmp_path / "gguf"
    if case == "dspark":  # through the CLI, served against the target converted into the cache
        parser = argparse.ArgumentParser()
        commands.add_args(parser)
        assert commands.run(parser.parse_args(["--draft", str(src), "--format", "gguf", "--out",
                                               str(out), "--dtype", "fp16", "--check-serve"])) == 0
        assert "llama-server loaded" in capsys.readouterr().out
    else:
        export(src, "gguf", out, dtype="fp16")
    manifest = read_manifest(out)
    meta = read_gguf_metadata(out / "draft.gguf")
    arch = "eagle3" if drafter == "eagle3" else "dflash"
    assert meta["general.architecture"] == arch
    assert meta[f"{arch}.target_layers"] == manifest["layer_ids"]["engine_values"]
    assert manifest["layer_ids"]["engine_values"] == [i + 1 for i in manifest["layer_ids"]["draftsmith"]]
    if arch == "dflash":
        assert meta["dflash.block_size"] == manifest["block_size"]
        assert meta["tokenizer.ggml.mask_token_id"] == manifest["mask_token_id"] == 16
        if case != "zlab-dflash":
            assert meta["dflash.sample_from_anchor"] is True
            assert meta["dflash.has_confidence_head"] == (drafter == "dspark")
    for key, value in manifest["gguf"]["metadata_checked"].items():
        assert meta[key] == value
    names = set(gguf.gguf_tensor_names(out / "draft.gguf"))
    assert ("d2t" in names) == bool(vocab)
    if drafter != "eagle3" and not vocab:
        assert not names & {"token_embd.weight", "output.weight"}  # shared from the target
    result = gguf.serve_once(out / "draft.gguf", target_gguf, manifest)
    assert result["reply"]["choices"][0]["text"] is not None
    assert result["reply"]["usage"]["completion_tokens"] >= 1
    assert result["reply"]["timings"]["draft_n"] > 0  # the draft proposed tokens
    assert "draft acceptance" in result["log"]


def serve_check_args(*argv):
    from draftsmith.serve import check

    parser = argparse.ArgumentParser()
    check.add_args(parser)
    return parser.parse_args([str(a) for a in argv])


@pytest.mark.llama
def test_serve_check_end_to_end(tmp_path, llama_target, capsys, monkeypatch):
    """serve-check tunes the serve settings (cost curve, probes per draft weight type, held-out
    rounds per n_max), exports the draft with the choice, serves it, plain decoding on two target
    files (the faster is the speedup's denominator) and a peer, decodes the same prompt tokens
    offline under the same rule, and writes served.json; a second run reuses the tuning; a
    parity miss exits 1 naming causes."""
    from draftsmith.serve import check

    monkeypatch.setattr(gguf, "cache_root", lambda: tmp_path / "cache")  # the f32 plain target
    hf_dir, hf_model, _ = llama_target
    src = make_draft(tmp_path, hf_model, hf_dir, "dspark", "served", mask_token_id=16,
                     target_layer_ids=[1, 3], markov_rank=16)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"turns": ["Count from one to ten."]}\n{"turns": ["Name a colour.", "Another?"]}\n')
    args = serve_check_args("--draft", src, "--datasets", prompts, "--max-new-tokens", "12",
                            "--peers", "ngram-simple", "--threads", "1", "--no-progress",
                            "--tune-datasets", prompts, "--tune-samples", "1", "--tune-max-new-tokens", "8",
                            "--plain-types", "f32", "--p-min", "0", "--out", tmp_path / "sc")  # random draft: keep drafting
    code = check.run(args)
    result = json.loads((tmp_path / "sc" / "served.json").read_text())
    m = result["draft"]["datasets"]["p"]
    for key in ("served_tau", "offline_tau", "served_tokens_per_s", "plain_tokens_per_s", "speedup", "parity"):
        assert m[key] is not None, key
    assert code == (0 if m["parity_ok"] else 1)
    assert m["rounds"] > 0 and len(m["requests"]) == 2  # first turns only
    for r in m["requests"]:  # the server saw exactly our prompt tokens (no BOS added, no template)
        assert r["server_prompt_tokens"] == r["prompt_tokens"]
    assert set(result["peers"]) == {"ngram-simple", "plain"}
    assert m["speedup"] == pytest.approx(m["served_tokens_per_s"] / m["plain_tokens_per_s"])
    # the denominator: the faster of the two plain files, named
    assert len(result["plain"]) == 2 and result["plain_fastest"]["file"] in result["plain"]
    assert result["plain_fastest"]["tokens_per_s"] == max(p["served_tokens_per_s"] for p in result["plain"].values())
    assert result["speedup"] == pytest.approx(result["draft"]["overall"]["served_tokens_per_s"]
                                              / result["plain_fastest"]["tokens_per_s"])
    out = capsys.readouterr().out
    assert "| draft | p |" in out and "served speedup" in out and "break-even τ" in out
    # the tuning: measured, saved with the draft, and what was served
    tuning = json.loads((src / check.TUNING_FILE).read_text())
    assert set(tuning["probes"]) == {"fp16", "q8_0"} and {r["n_max"] for r in tuning["table"]} == {1, 2, 3}
    best = tuning["choice"]
    assert result["serve"] == {"dtype": best["dtype"], "n_max": best["n_max"], "p_min": None}  # the flag wins
    served_manifest = read_manifest(tmp_path / "sc" / "draft-gguf")
    assert served_manifest["dtype"] == best["dtype"] and served_manifest["serve"]["n_max"] == best["n_max"]
    server_args = result["config"]["llama_server_args"]
    assert server_args[server_args.index("--spec-draft-n-max") + 1] == str(best["n_max"])
    # a second run reuses the saved tuning; a parity miss exits 1 with the likely causes
    monkeypatch.setattr(check, "measure_tuning", lambda *a, **k: pytest.fail("measured again"))
    real = check.Offline.tau
    monkeypatch.setattr(check.Offline, "tau", lambda self, *a: {
        ds: {**v, "offline_tau": 3 * v["offline_tau"]} for ds, v in real(self, *a).items()})
    again = vars_to_argv(args)
    again[again.index("--plain-types") + 1], again[again.index("--peers") + 1] = "", ""  # keep it short
    assert check.run(serve_check_args(*again)) == 1
    assert "layer-id convention" in capsys.readouterr().out


def vars_to_argv(args) -> list[str]:
    """The argv that parses back to `args` (non-default values only)."""
    defaults = serve_check_args("--draft", "x")
    argv = []
    for key, value in vars(args).items():
        if value != getattr(defaults, key) or key == "draft":
            flag = "--" + key.replace("_", "-")
            argv += [flag] if value is True else [flag, str(value)]
    return argv


def test_serve_check_refuses_bad_flags_before_converting(tmp_path, hf_target, target_dir, monkeypatch):
    """--p-min for a draft without a confidence head, --n-max above what the draft proposes, a
    target of another model, an unknown weight type: one line naming the flag, before anything
    is converted or served."""
    from draftsmith.serve import check

    monkeypatch.setattr(check, "export", lambda *a, **k: pytest.fail("converted"))
    monkeypatch.setattr(gguf, "target_gguf", lambda *a, **k: pytest.fail("target converted"))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"turns": ["Hi."]}\n')
    dflash = make_draft(tmp_path, hf_target, target_dir, "dflash", "noconf")
    dspark = make_draft(tmp_path, hf_target, target_dir, "dspark", "conf", enable_confidence_head=True)
    base = ["--datasets", prompts, "--no-progress", "--out", tmp_path / "sc"]
    cases = [([*base, "--draft", dflash, "--p-min", "0.3"], "--p-min 0.3: llama.cpp truncates on the confidence head"),
             ([*base, "--draft", dspark, "--n-max", "4"], "--n-max 4: this dspark draft proposes at most 3"),
             ([*base, "--draft", dspark, "--plain-types", "q4_k"], "--plain-types 'q4_k'"),
             ([*base, "--draft", dspark, "--tune-dtypes", "q2_k"], "--tune-dtypes 'q2_k'")]
    for argv, message in cases:
        with pytest.raises(InputError, match=message) as e:
            check.run(serve_check_args(*argv))
        assert "\n" not in str(e.value)
    other = tmp_path / "other"  # another model: 6 layers where the draft's target has 4
    tiny_target("llama", vocab_size=VOCAB, num_hidden_layers=6).save_pretrained(other)
    qwen3_style().save_pretrained(other)
    with pytest.raises(InputError, match="the draft was not trained for target"):
        check.run(serve_check_args(*base, "--draft", dspark, "--target", other))
    with pytest.raises(SystemExit):  # argparse: a weight type llama.cpp's converter does not write
        serve_check_args("--draft", dspark, "--draft-dtype", "q4_0")
    # the same draft and flags pass the checks (and reach the conversion, stubbed here)
    with pytest.raises(BaseException, match="target converted"):
        check.run(serve_check_args(*base, "--draft", dspark, "--n-max", "3", "--p-min", "0.3"))


@pytest.mark.llama
def test_target_gguf_types(llama_target, tmp_path, monkeypatch):
    """The served target: a GGUF target's own file by default; `--target-type` converts the
    target's weights once into the cache (reused after); an unknown type is refused."""
    from draftsmith.engines.llama_cpp import read_gguf_metadata
    from draftsmith.export.manifest import describe_target

    monkeypatch.setattr(gguf, "cache_root", lambda: tmp_path)  # converted targets land here
    hf_dir, _, target_file = llama_target
    info = describe_target(str(target_file))
    assert gguf.target_gguf(info) == target_file
    f32 = gguf.target_gguf(info, "f32")
    assert f32 != target_file and f32.is_file() and f32.name.endswith("-f32.gguf")
    assert read_gguf_metadata(f32)["general.file_type"] == 0  # LLAMA_FTYPE_ALL_F32
    mtime = f32.stat().st_mtime_ns
    assert gguf.target_gguf(info, "f32") == f32 and f32.stat().st_mtime_ns == mtime
    with pytest.raises(InputError, match="target GGUF type 'q2_k'"):
        gguf.target_gguf(info, "q2_k")


def test_export_reads_the_serve_tuning_of_the_draft(tmp_path, hf_target, target_dir):
    """`export --format gguf` takes dtype, n_max and p_min from DRAFT/serve_tuning.json (what
    serve-check measured), flags override, other formats and --ignore-tuning ignore it; a tuning
    of another version is not used."""
    src = make_draft(tmp_path, hf_target, target_dir, "dspark", "tuned", enable_confidence_head=True)
    tuning = {"version": gguf.TUNING_VERSION, "machine": {"cpu": "x", "target_file": "t.gguf"},
              "choice": {"dtype": "q8_0", "n_max": 1, "p_min": 0.6}}
    (src / gguf.TUNING_FILE).write_text(json.dumps(tuning))

    def args(*extra):
        parser = argparse.ArgumentParser()
        commands.add_args(parser)
        return parser.parse_args(["--draft", str(src), "--out", str(tmp_path / "o"), *extra])

    assert commands.tuned_settings(args("--format", "gguf")) == {"dtype": "q8_0", "n_max": 1, "p_min": 0.6}
    assert commands.tuned_settings(args("--format", "deepspec")) == {}
    assert commands.tuned_settings(args("--format", "gguf", "--ignore-tuning")) == {}
    (src / gguf.TUNING_FILE).write_text(json.dumps({**tuning, "choice": {**tuning["choice"], "p_min": 0.0}}))
    assert commands.tuned_settings(args("--format", "gguf"))["p_min"] is None  # 0 = off
    (src / gguf.TUNING_FILE).write_text(json.dumps({**tuning, "version": 1}))
    assert commands.tuned_settings(args("--format", "gguf")) == {}
    (src / gguf.TUNING_FILE).write_text("{")
    with pytest.raises(InputError, match="serve_tuning.json:1: invalid JSON"):
        commands.tuned_settings(args("--format", "gguf"))


def test_bench_draft_variants_slice_a_loadable_smaller_draft(tmp_path, hf_target, target_dir):
    """bench/draft_variants.py: fewer layers, a subset of the taps (fc columns of those layers,
    in that order) and a smaller draft vocabulary give a draft dir that loads and validates."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "draft_variants.py"
    spec = importlib.util.spec_from_file_location("draft_variants", path)
    variants = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(variants)
    src = make_draft(tmp_path, hf_target, target_dir, "dspark", "v", vocab=64)
    full = load_draft(src)
    H = full.config.hidden_size
    name, opts = variants.parse_variant("small:layers=1,taps=2,vocab=32")
    assert (name, opts) == ("small", {"layers": 1, "taps": [2], "vocab": 32})
    variants.make_variant(src, tmp_path / name, **opts)
    small = load_draft(tmp_path / name)
    assert small.config.num_hidden_layers == 1 and list(small.config.target_layer_ids) == [2]
    assert torch.equal(small.fc.weight, full.fc.weight[:, H:2 * H])  # tap 2 is the second stored
    assert not torch.equal(small.fc.weight, full.fc.weight[:, :H])
    assert torch.equal(small.layers[0].mlp.up_proj.weight, full.layers[0].mlp.up_proj.weight)
    assert small.lm_head.weight.shape[0] == 32
    for bad in ("x:layers=0", "x:taps=1"):
        with pytest.raises(InputError, match="layers=0|taps=\\[1\\]"):
            variants.make_variant(src, tmp_path / "bad", **variants.parse_variant(bad)[1])
    with pytest.raises(InputError, match="NAME:layers"):
        variants.parse_variant("x:depth=2")
