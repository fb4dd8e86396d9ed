"""DeepSpec-compatible DSpark / DFlash drafts (DESIGN §4) and z-lab's DFlash layout, both ways.

Export: `config.json` = the draft's Qwen3-style config with DeepSpec's keys and DeepSpec's
conditional presence (`confidence_head_with_markov` only with the confidence head,
`markov_head_type` only with a Markov head), tensors named as DeepSpec names them, bf16 by
default, full vocabulary. That is what DeepSpec's classes, SGLang `DSPARK`, vLLM `dspark` and
llama.cpp's converter load. A pruned draft is written as the llama.cpp extension
(`draft_vocab_size` + `d2t`, `lm_head` / `markov_w2` with V_draft rows) and the export says so:
DeepSpec cannot load it. A z-lab-slot DFlash (slot k predicts anchor + k) computes a different
function and is written only in z-lab's own layout (`DFlashDraftModel`, nested `dflash_config`,
no embedding / LM head: it shares the target's).

Import: a DeepSpec-compatible dir, including DeepSpec's released layout (a deep copy of the
target's config plus its keys, sharded safetensors), and a z-lab DFlash dir (embedding and LM
head taken from the target).
"""

from __future__ import annotations

import types
from pathlib import Path

import torch
from torch import nn

from draftsmith.config import build_config
from draftsmith.export.manifest import Key, check_keys, check_tensor_names, read_tensors
from draftsmith.models.dflash import DFlashConfig
from draftsmith.models.dspark import DSparkConfig
from draftsmith.models.io import build_draft, check_tensors, config_from_json, draft_config_json
from draftsmith.models.layers import geometry_from_target
from draftsmith.models.vocab import check_vocab_maps
from draftsmith.utils.io import InputError

DEEPSPEC_ARCHITECTURES = ("Qwen3DSparkModel", "Gemma4DSparkModel")
ZLAB_ARCHITECTURE = "DFlashDraftModel"


def _has_conf(d: dict) -> bool:
    return bool(d.get("enable_confidence_head"))


def _has_markov(d: dict) -> bool:
    return int(d.get("markov_rank") or 0) > 0


def _pruned(d: dict) -> bool:
    return d.get("draft_vocab_size", d.get("vocab_size")) != d.get("vocab_size")


GEOMETRY_KEYS = (
    Key("hidden_size", "the target's hidden size: draft layers, fc and the shared embedding use it"),
    Key("intermediate_size", "MLP width of the draft layers (mlp.*_proj shapes)"),
    Key("num_attention_heads", "query heads of the draft attention (q_proj / o_proj shapes)"),
    Key("num_key_value_heads", "key/value heads (k_proj / v_proj shapes, GQA grouping)"),
    Key("head_dim", "per-head width (q_norm / k_norm shapes, RoPE dimension)"),
    Key("rms_norm_eps", "epsilon of every RMSNorm; another value changes every activation"),
    Key("rope_theta", "RoPE base at the real positions; another value moves every rotation",
        alternatives=("rope_parameters.rope_theta",)),
    Key("vocab_size", "the target's vocabulary: embed_tokens rows and markov_w1 rows"),
)

# DESIGN §4: the DeepSpec key map, with the reason each key matters to the engines that read it.
DEEPSPEC_KEYS = (
    Key("architectures", "DeepSpec, SGLang (DSPARK), vLLM (dspark) and llama.cpp pick the model "
        "class by it: Qwen3DSparkModel (DFlash too) or Gemma4DSparkModel"),
    Key("model_type", "the HF config class of the draft layers (qwen3: q/k-normed layers)"),
    *GEOMETRY_KEYS,
    Key("num_hidden_layers", "number of draft decoder layers (layers.{i}.*)"),
    Key("num_target_layers", "the target's layer count; DeepSpec validates target_layer_ids "
        "against it"),
    Key("block_size", "γ slots per block: the draft always sees its full block (bidirectional); "
        "llama.cpp writes dflash.block_size and serves n_max from it"),
    Key("layer_types", "attention type per draft layer (all full_attention); DeepSpec's attention "
        "reads sliding windows from it"),
    Key("mask_token_id", "the token fed in slots 1..γ-1; another id is another model (llama.cpp "
        "writes it as tokenizer.ggml.mask_token_id)"),
    Key("target_layer_ids", "which target layers feed fc, 0-based outputs (llama.cpp adds 1 "
        "itself); a wrong list feeds the draft other features"),
    Key("num_anchors", "DeepSpec's class requires it (training blocks per sequence)"),
    Key("enable_confidence_head", "whether confidence_head.proj.* exists; DeepSpec's class "
        "requires it"),
    Key("markov_rank", "rank r of the Markov head (0 = none): markov_w1 / markov_w2 shapes"),
    Key("tie_word_embeddings", "must be false: lm_head.weight is its own tensor"),
    Key("confidence_head_with_markov", "whether the confidence head reads [h; W1[prev]] (H + r "
        "inputs) or h alone; DeepSpec writes it only when the head is enabled", when=_has_conf),
    Key("markov_head_type", "which Markov head the weights belong to (llama.cpp converts only "
        "vanilla); DeepSpec writes it only when markov_rank > 0", when=_has_markov),
    Key("draft_vocab_size", "llama.cpp extension for a pruned head: lm_head / markov_w2 rows, "
        "with d2t mapping them to target ids; absent for a full vocabulary", when=_pruned),
)

ZLAB_KEYS = (
    Key("architectures", "z-lab's DFlashDraftModel (llama.cpp, SGLang and vLLM pick its DFlash "
        "class by it)"),
    *GEOMETRY_KEYS,
    Key("num_hidden_layers", "number of draft decoder layers (layers.{i}.*)"),
    Key("num_target_layers", "the target's layer count"),
    Key("block_size", "slots per block (16 in z-lab's releases); slot 0 is the anchor",
        alternatives=("dflash_config.block_size",)),
    Key("dflash_config.mask_token_id", "the token fed in slots 1..; llama.cpp reads it from "
        "dflash_config"),
    Key("dflash_config.target_layer_ids", "which target layers feed fc (0-based outputs); "
        "llama.cpp reads them from dflash_config"),
)


# --------------------------------------------------------------------------- tensor key map


def layer_tensor_names(cfg, i: int) -> list[str]:
    """DeepSpec's tensor names of draft layer i (Gemma: sandwich norms and layer_scalar; with
    attention_k_eq_v there is no v_proj)."""
    attn = ["q_proj", "k_proj", "o_proj", "q_norm", "k_norm"]
    if not (cfg.family == "gemma" and cfg.attention_k_eq_v):
        attn.append("v_proj")
    names = [f"layers.{i}.self_attn.{p}.weight" for p in attn]
    names += [f"layers.{i}.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]
    names += [f"layers.{i}.{n}.weight" for n in ("input_layernorm", "post_attention_layernorm")]
    if cfg.family == "gemma":
        names += [f"layers.{i}.{n}.weight" for n in ("pre_feedforward_layernorm",
                                                      "post_feedforward_layernorm")]
        names.append(f"layers.{i}.layer_scalar")
    return names


def deepspec_tensor_names(cfg, with_embeddings: bool = True) -> list[str]:
    """Every tensor of a DeepSpec-layout draft (DESIGN §4)."""
    names = ["fc.weight", "hidden_norm.weight", "norm.weight"]
    if with_embeddings:
        names += ["embed_tokens.weight", "lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        names += layer_tensor_names(cfg, i)
    if cfg.markov_rank > 0:
        names += ["markov_head.markov_w1.weight", "markov_head.markov_w2.weight"]
        extra = {"gated": "gate_proj", "rnn": "joint_proj"}.get(cfg.markov_head_type)
        if extra:  # research heads: only draftsmith's engine runs them
            names += [f"markov_head.{extra}.weight", f"markov_head.{extra}.bias"]
    if cfg.enable_confidence_head:
        names += ["confidence_head.proj.weight", "confidence_head.proj.bias"]
    if cfg.pruned:
        names.append("d2t")
    return names


# --------------------------------------------------------------------------- export


def is_zlab(cfg) -> bool:
    return getattr(cfg, "slot_semantics", "deepspec") == "zlab"


def deepspec_config(model: nn.Module, dtype_name: str) -> dict:
    """config.json of the DeepSpec layout, checked key by key (conditional keys strictly)."""
    config = {k: v for k, v in draft_config_json(model).items() if k != "draftsmith"}
    config["torch_dtype"] = dtype_name
    check_keys(config, DEEPSPEC_KEYS, "DeepSpec config (export)", strict=True)
    return config


def zlab_config(model: nn.Module, dtype_name: str) -> dict:
    """config.json of z-lab's DFlash layout: geometry, block_size, nested dflash_config."""
    cfg = model.config
    config = {k: v for k, v in draft_config_json(model).items()
              if k not in ("draftsmith", "mask_token_id", "target_layer_ids", "num_anchors",
                           "enable_confidence_head", "markov_rank")}
    config["dflash_config"] = {"mask_token_id": cfg.mask_token_id, "block_size": cfg.block_size,
                               "target_layer_ids": list(cfg.target_layer_ids)}
    config["architectures"] = [ZLAB_ARCHITECTURE]
    config["torch_dtype"] = dtype_name
    check_keys(config, ZLAB_KEYS, "z-lab DFlash config (export)")
    return config


def deepspec_files(model: nn.Module, dtype_name: str) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(config, tensors, layer-id record) of the layout the draft was trained in: DeepSpec's
    (pruned: the llama.cpp extension) or z-lab's. Tensors are the model's, in its dtype."""
    cfg = model.config
    state = model.state_dict()
    if is_zlab(cfg):
        if cfg.pruned:
            raise InputError(f"a z-lab DFlash with a pruned head ({cfg.draft_vocab} of "
                             f"{cfg.vocab_size} ids) has no export layout: z-lab's layout carries "
                             "no LM head of its own (engines use the target's)")
        names = deepspec_tensor_names(cfg, with_embeddings=False)
        config = zlab_config(model, dtype_name)
        layer_ids = {"engine_key": "dflash_config.target_layer_ids",
                     "engine_values": list(cfg.target_layer_ids), "engine_convention": "i"}
    else:
        names = deepspec_tensor_names(cfg)
        config = deepspec_config(model, dtype_name)
        layer_ids = {"engine_key": "target_layer_ids", "engine_values": list(cfg.target_layer_ids),
                     "engine_convention": "i (llama.cpp's converter adds 1)"}
    optional = {"embed_tokens.weight", "lm_head.weight"} if is_zlab(cfg) else set()
    check_tensor_names(list(state), names, sorted(optional), "draft model vs the DeepSpec tensor map")
    return config, {k: state[k] for k in names}, layer_ids


# --------------------------------------------------------------------------- import


def _strip_model_prefix(tensors: dict, expected: set[str]) -> dict:
    """Accept `model.`-prefixed names (some savers add it) when the plain names are expected."""
    if tensors and not set(tensors) & expected and all(k.startswith("model.") for k in tensors):
        return {k.removeprefix("model."): v for k, v in tensors.items()}
    return tensors


def _load_weights(model: nn.Module, tensors: dict, where: str) -> nn.Module:
    tensors = _strip_model_prefix(tensors, set(model.state_dict()))
    check_tensors(model, tensors, where)
    model.to(tensors["fc.weight"].dtype).load_state_dict(tensors, strict=True)
    if model.config.pruned:
        model.refresh_t2d()
        check_vocab_maps(model.d2t, model.t2d)
    return model


def _config_from_manifest(manifest: dict | None, cls, where: str):
    meta = (manifest or {}).get("draftsmith_config") or {}
    if meta.get("kind") != cls.drafter:
        return None
    return build_config(cls, dict(meta.get("config") or {}), where=f"{where}: draftsmith_config")


def _agree(cfg, data: dict, pairs: dict, where: str) -> None:
    """The manifest's config and config.json must describe the same draft."""
    wrong = [f"{key} {data[key]!r} vs manifest {getattr(cfg, attr)!r}" for key, attr in pairs.items()
             if key in data and data[key] != getattr(cfg, attr)]
    if wrong:
        raise InputError(f"{where}: config.json disagrees with {where.rsplit('/', 1)[0]}'s "
                         f"manifest ({'; '.join(wrong)}); one of them was edited")


def import_deepspec(path: Path, data: dict, manifest: dict | None) -> nn.Module:
    """A DeepSpec-compatible dir (ours, or DeepSpec's released layout) -> DSpark/DFlash model."""
    where = str(path / "config.json")
    check_keys(data, DEEPSPEC_KEYS, where)
    if -1 in list(data["target_layer_ids"]):
        raise InputError(f"{where}: target_layer_ids {data['target_layer_ids']} uses DeepSpec's -1 "
                         "(the embedding output); draftsmith's features are decoder-layer outputs")
    cls = DSparkConfig if _has_markov(data) or _has_conf(data) else DFlashConfig
    cfg = _config_from_manifest(manifest, cls, where)
    if cfg is not None:
        _agree(cfg, data, {"mask_token_id": "mask_token_id", "block_size": "block_size",
                           "target_layer_ids": "target_layer_ids", "markov_rank": "markov_rank",
                           "num_hidden_layers": "num_hidden_layers"}, where)
    else:
        cfg = config_from_json({k: v for k, v in data.items() if k != "draftsmith"}, where)
    return _load_weights(build_draft(cfg), read_tensors(path), where)


def _zlab_config(data: dict, manifest: dict | None, where: str) -> DFlashConfig:
    if data.get("architectures") != [ZLAB_ARCHITECTURE] or any(
            k in data["dflash_config"] for k in ("conv_kernel_size", "selector_rank")):
        raise InputError(f"{where}: {data.get('architectures')} with {sorted(data['dflash_config'])}"
                         f" is not z-lab's original DFlash (DFlash2 selectors are not supported)")
    sliding = [t for t in data.get("layer_types") or [] if t != "full_attention"]
    if sliding and data.get("use_sliding_window"):
        raise InputError(f"{where}: layer_types {data['layer_types']} use sliding-window attention, "
                         "which draftsmith's DFlash layers do not implement")
    cfg = _config_from_manifest(manifest, DFlashConfig, where)
    if cfg is not None:
        return cfg
    nested = data["dflash_config"]
    fields = {**geometry_from_target(types.SimpleNamespace(**data)),
              "num_target_layers": data["num_target_layers"], "target_model_type": "",
              "num_hidden_layers": data["num_hidden_layers"], "slot_semantics": "zlab",
              "block_size": nested.get("block_size", data.get("block_size")),
              "mask_token_id": nested["mask_token_id"],
              "target_layer_ids": list(nested["target_layer_ids"])}
    return build_config(DFlashConfig, fields, where=f"{where} (z-lab DFlash import)")


def import_zlab(path: Path, data: dict, manifest: dict | None, target_embeddings) -> nn.Module:
    """z-lab's DFlash dir -> a DFlash model with z-lab slot semantics. Its embedding and LM head
    are the target's: `target_embeddings()` -> (embed [V, H], lm_head [V, H]) supplies them when
    the dir has none."""
    where = str(path / "config.json")
    check_keys(data, ZLAB_KEYS, where)
    cfg = _zlab_config(data, manifest, where)
    tensors = _strip_model_prefix(read_tensors(path), {"fc.weight"})
    if "embed_tokens.weight" not in tensors or "lm_head.weight" not in tensors:
        embed, head = target_embeddings()
        dtype = tensors["fc.weight"].dtype
        tensors.setdefault("embed_tokens.weight", embed.to(dtype))
        tensors.setdefault("lm_head.weight", head.to(dtype))
    return _load_weights(build_draft(cfg), tensors, where)
