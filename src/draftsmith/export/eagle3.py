"""EAGLE-3 in the three dialects engines read (DESIGN §3.1, §4), both ways: `Eagle3Format`.

| dialect | architectures | layer ids | layer tensors |
|---|---|---|---|
| sglang | LlamaForCausalLMEagle3 | nested `eagle_config.eagle_aux_hidden_state_layer_ids` = i | midlayer.* |
| vllm | Eagle3LlamaForCausalLM | top-level `eagle_aux_hidden_state_layer_ids` = i + 1 | midlayer.* |
| speculators | Eagle3Speculator (+ speculators_config, transformer_layer_config) | top-level, i + 1 | layers.0.* |

Every dialect carries `draft_vocab_size` (always: llama.cpp detects EAGLE-3 by it), `d2t`
(offsets: target id = i + d2t[i]) and `t2d` (bool mask), also for a full vocabulary: a pruned draft
without `d2t` fails silently in vLLM. `embed_tokens.weight` (the frozen copy of the target's) is
written too, so an export is self-contained. llama.cpp's converter reads only the top-level key:
the vLLM dialect is the one to hand it.
"""

from __future__ import annotations

import types
from pathlib import Path

import torch
from torch import nn

from draftsmith.config import build_config
from draftsmith.export.formats import (
    FormatAdapter, ReadContext, WriteContext, config_from_manifest, strip_model_prefix,
)
from draftsmith.export.manifest import Key, check_keys, check_tensor_names, read_tensors, write_engine_dir
from draftsmith.models.eagle3 import Eagle3Config, default_eagle3_layers
from draftsmith.models.io import build_draft, load_weights
from draftsmith.models.layers import geometry_from_target
from draftsmith.models.vocab import t2d_from_ids, ids_from_d2t
from draftsmith.utils.io import InputError

DIALECTS = ("sglang", "vllm", "speculators")
ARCHITECTURES = {"sglang": "LlamaForCausalLMEagle3", "vllm": "Eagle3LlamaForCausalLM",
                 "speculators": "Eagle3Speculator"}
EAGLE3_ARCHITECTURES = {"LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM", "Eagle3Speculator",
                        "Eagle3DraftModel"}
SPECULATORS_TYPE = "eagle3"  # speculators' model type and algorithm name
NESTED_IDS = "eagle_config.eagle_aux_hidden_state_layer_ids"
TOP_IDS = "eagle_aux_hidden_state_layer_ids"

LAYER_GEOMETRY = ("model_type", "hidden_size", "intermediate_size", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
                  "rope_parameters", "vocab_size", "max_position_embeddings", "hidden_act",
                  "attention_bias", "tie_word_embeddings")


def _nbr(d: dict) -> bool:
    return bool(d.get("norm_before_residual"))


_COMMON = (
    Key("draft_vocab_size", "always written: llama.cpp detects EAGLE-3 by it, and it sizes "
        "lm_head / d2t (a pruned head without it loads as a full one)"),
    Key("target_hidden_size", "width of each fused target feature: fc reads 3 x this"),
)
_LAYER = (
    Key("hidden_size", "draft width (= the target's): midlayer, fc output, norm"),
    Key("intermediate_size", "MLP width of the midlayer"),
    Key("num_attention_heads", "query heads of the 2H-wide attention"),
    Key("num_key_value_heads", "key/value heads (GQA)"),
    Key("rms_norm_eps", "epsilon of every RMSNorm"),
    Key("rope_theta", "RoPE base; another value moves every rotation",
        alternatives=("rope_parameters.rope_theta",)),
    Key("vocab_size", "the target's vocabulary: embed_tokens rows, t2d length"),
    Key("num_hidden_layers", "must be 1: EAGLE-3 has one midlayer, and llama.cpp detects EAGLE-3 "
        "by num_hidden_layers == 1 with draft_vocab_size"),
)
SGLANG_KEYS = (
    Key("architectures", "SGLang picks its EAGLE-3 class (LlamaForCausalLMEagle3) by it"),
    *_LAYER, *_COMMON,
    Key(NESTED_IDS, "SGLang reads the fused target layers here, 0-based outputs (i); missing, it "
        "falls back to its default layers"),
    Key("norm_before_residual", "the residual is hidden_norm(h), not h: another function",
        when=_nbr),
)
VLLM_KEYS = (
    Key("architectures", "vLLM picks its EAGLE-3 class (Eagle3LlamaForCausalLM) by it"),
    *_LAYER, *_COMMON,
    Key(TOP_IDS, "vLLM and llama.cpp read the fused target layers here, as i + 1 (hidden_states "
        "index); missing, both fall back silently to [2, L//2, L-3]"),
    Key("norm_before_residual", "the residual is hidden_norm(h), not h: another function",
        when=_nbr),
)
SPECULATORS_KEYS = (
    Key("architectures", "speculators' Eagle3Speculator class"),
    Key("speculators_model_type", "`vllm serve <dir>` auto-detects a speculators model by it"),
    Key("speculators_config.algorithm", "selects the EAGLE-3 proposer"),
    Key("speculators_config.proposal_methods", "how many tokens to propose per step"),
    Key("speculators_config.default_proposal_method", "which proposal method vLLM uses"),
    Key("speculators_config.verifier.name_or_path", "the target this draft belongs to"),
    Key("speculators_config.verifier.architectures", "the target's model class"),
    *(Key(f"transformer_layer_config.{k.name}", k.why) for k in _LAYER),
    *_COMMON,
    Key("norm_before_residual", "the residual is hidden_norm(h) when true: another function"),
    Key(TOP_IDS, "the fused target layers as i + 1 (hidden_states index)"),
)
KEYS = {"sglang": SGLANG_KEYS, "vllm": VLLM_KEYS, "speculators": SPECULATORS_KEYS}

MID = ("input_layernorm.weight", "hidden_norm.weight", "post_attention_layernorm.weight",
       "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
       "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
       "mlp.down_proj.weight")


def layer_prefix(dialect: str) -> str:
    return "layers.0." if dialect == "speculators" else "midlayer."


def tensor_names(dialect: str) -> tuple[list[str], list[str]]:
    """(required, optional) tensor names of a dialect (DESIGN §4)."""
    prefix = layer_prefix(dialect)
    required = ["fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d"]
    return required + [prefix + n for n in MID], ["embed_tokens.weight"]


# --------------------------------------------------------------------------- export


def _layer_config(ours: dict) -> dict:
    """The Llama layer config of the draft (speculators' transformer_layer_config)."""
    layer = {k: ours[k] for k in LAYER_GEOMETRY if k in ours}
    return {**layer, "num_hidden_layers": 1, "architectures": ["LlamaForCausalLM"]}


def eagle3_config(model: nn.Module, dialect: str, dtype_name: str, verifier: dict) -> dict:
    """config.json of one dialect, checked key by key. `verifier`: {"name_or_path",
    "architectures"} of the target (speculators only)."""
    cfg = model.config
    ours = cfg.engine_config()
    ids = list(cfg.target_layer_ids)
    base = {k: v for k, v in ours.items() if k not in ("eagle_config", "norm_before_residual")}
    if cfg.norm_before_residual:
        base["norm_before_residual"] = True
    base["architectures"] = [ARCHITECTURES[dialect]]
    base["torch_dtype"] = dtype_name
    if dialect == "sglang":
        config = {**base, "eagle_config": {"eagle_aux_hidden_state_layer_ids": ids}}
    elif dialect == "vllm":
        config = {**base, TOP_IDS: [i + 1 for i in ids]}
    else:
        config = {
            "architectures": [ARCHITECTURES[dialect]], "speculators_model_type": SPECULATORS_TYPE,
            "speculators_config": {
                "algorithm": SPECULATORS_TYPE, "default_proposal_method": "greedy",
                "proposal_methods": [{"proposal_type": "greedy",
                                      "speculative_tokens": cfg.ttt_length}],
                "verifier": dict(verifier)},
            "transformer_layer_config": _layer_config(ours),
            "draft_vocab_size": cfg.draft_vocab, "norm_before_residual": cfg.norm_before_residual,
            "target_hidden_size": cfg.hidden_size, TOP_IDS: [i + 1 for i in ids],
            "torch_dtype": dtype_name}
    check_keys(config, KEYS[dialect], f"EAGLE-3 {dialect} config (export)", strict=True)
    return config


def dialect_layer_ids(cfg, dialect: str) -> dict:
    """How a dialect writes the layer ids: nested `i` (SGLang) or top-level `i + 1`."""
    ids = list(cfg.target_layer_ids)
    if dialect == "sglang":
        return {"engine_key": NESTED_IDS, "engine_values": ids, "engine_convention": "i"}
    return {"engine_key": TOP_IDS, "engine_values": [i + 1 for i in ids], "engine_convention": "i + 1"}


def eagle3_files(model: nn.Module, dialect: str, dtype_name: str, verifier: dict):
    """(config, tensors) of one dialect; tensors in the model's dtype."""
    state = model.state_dict()
    prefix = layer_prefix(dialect)
    tensors = {(prefix + k.removeprefix("midlayer.")) if k.startswith("midlayer.") else k: v
               for k, v in state.items()}
    required, optional = tensor_names(dialect)
    check_tensor_names(list(tensors), required, optional, f"draft model vs the {dialect} tensor map")
    return eagle3_config(model, dialect, dtype_name, verifier), tensors


class Eagle3Format(FormatAdapter):
    """EAGLE-3 in one engine dialect (`--format sglang`, `vllm` or `speculators`)."""

    takes = Eagle3Config
    reads = ", ".join(sorted(EAGLE3_ARCHITECTURES))

    def __init__(self, dialect: str):
        self.name = dialect
        self.holds = f"it holds EAGLE-3 as {ARCHITECTURES[dialect]}"

    def layout(self, cfg) -> str:
        return f"eagle3-{self.name}"

    def notes(self, cfg) -> list[str]:
        if self.name == "sglang" and cfg.norm_before_residual:
            return ["norm_before_residual: SGLang's support for it is unverified here"]
        return []

    def layer_ids(self, cfg) -> dict:
        return dialect_layer_ids(cfg, self.name)

    def write(self, draft, out_dir, ctx: WriteContext) -> list[str]:
        return write_engine_dir(out_dir, *eagle3_files(draft, self.name, ctx.dtype_name, ctx.verifier))

    @classmethod
    def detect(cls, data: dict) -> bool:
        return bool(set(data.get("architectures") or []) & EAGLE3_ARCHITECTURES) \
            or "speculators_model_type" in data

    @classmethod
    def read(cls, path: Path, data: dict, ctx: ReadContext) -> nn.Module:
        layers = None
        if not (ctx.manifest or {}).get("draftsmith_config"):
            layers = ctx.target_layers("an EAGLE-3 config does not record the target's layer count")
        return import_eagle3(path, data, ctx.manifest, layers, ctx.target_embeddings())


# --------------------------------------------------------------------------- import


def detect_dialect(data: dict) -> str:
    if "speculators_model_type" in data or "transformer_layer_config" in data:
        return "speculators"
    return "sglang" if "eagle_config" in data else "vllm"


def _layer_ids(data: dict, dialect: str, num_target_layers: int) -> list[int]:
    """draftsmith's ids (output of layer i) from whichever key the dialect wrote."""
    nested = (data.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    if dialect == "sglang" and nested:
        return [int(i) for i in nested]
    if data.get(TOP_IDS):
        return [int(i) - 1 for i in data[TOP_IDS]]
    # Engines then use [2, L//2, L-3] as hidden_states indices: the same layers, one lower.
    return default_eagle3_layers(num_target_layers)


def _eagle3_config(data: dict, manifest: dict | None, num_target_layers: int | None, where: str):
    cfg = config_from_manifest(manifest, Eagle3Config, where)
    if cfg is not None:
        written = _layer_ids(data, detect_dialect(data), cfg.num_target_layers)
        if written != cfg.target_layer_ids or data["draft_vocab_size"] != cfg.draft_vocab:
            raise InputError(f"{where}: config.json (layer ids {written}, draft_vocab_size "
                             f"{data['draft_vocab_size']}) disagrees with the manifest "
                             f"({cfg.target_layer_ids}, {cfg.draft_vocab}); one of them was edited")
        return cfg
    if num_target_layers is None:
        raise InputError(f"{where}: an EAGLE-3 config does not record the target's layer count; "
                         "pass the target (--target) so its layer ids can be checked")
    dialect = detect_dialect(data)
    flat = {**data, **(data.get("transformer_layer_config") or {})}
    geometry = geometry_from_target(types.SimpleNamespace(**flat))
    ttt = ((data.get("speculators_config") or {}).get("proposal_methods") or [{}])[0]
    fields = {**geometry, "num_target_layers": num_target_layers, "target_model_type": "",
              "target_layer_ids": _layer_ids(data, dialect, num_target_layers),
              "norm_before_residual": bool(data.get("norm_before_residual", False)),
              "draft_vocab_size": int(data["draft_vocab_size"]),
              "ttt_length": int(ttt.get("speculative_tokens", 7))}
    return build_config(Eagle3Config, fields, where=f"{where} (EAGLE-3 {dialect} import)")


def _vocab_maps(tensors: dict, cfg, where: str) -> None:
    """Fill d2t / t2d when a dialect left them out (vLLM drops t2d on load); refuse a pruned
    head without d2t (its rows cannot be mapped to target ids)."""
    if "d2t" not in tensors:
        if cfg.draft_vocab != cfg.vocab_size:
            raise InputError(f"{where}: draft_vocab_size {cfg.draft_vocab} < vocab_size "
                             f"{cfg.vocab_size} but no d2t tensor: the head's rows cannot be mapped "
                             "to target ids")
        tensors["d2t"] = torch.zeros(cfg.draft_vocab, dtype=torch.int64)
    if "t2d" not in tensors:
        tensors["t2d"] = t2d_from_ids(ids_from_d2t(tensors["d2t"].long()), cfg.vocab_size)


def import_eagle3(path: Path, data: dict, manifest: dict | None, num_target_layers: int | None,
                  target_embeddings) -> nn.Module:
    """Any EAGLE-3 dialect dir -> an Eagle3 model. `target_embeddings()` -> (embed, lm_head)
    supplies the embedding when the dir has none."""
    where = str(path / "config.json")
    dialect = detect_dialect(data)
    required = [k for k in KEYS[dialect] if k.name not in (NESTED_IDS, TOP_IDS)]
    check_keys(data, required, where)
    cfg = _eagle3_config(data, manifest, num_target_layers, where)
    tensors = {("midlayer." + k.removeprefix("layers.0.")) if k.startswith("layers.0.") else k: v
               for k, v in strip_model_prefix(read_tensors(path)).items()}
    if "embed_tokens.weight" not in tensors:
        tensors["embed_tokens.weight"] = target_embeddings()[0].to(tensors["fc.weight"].dtype)
    _vocab_maps(tensors, cfg, where)
    return load_weights(build_draft(cfg), tensors, where)
