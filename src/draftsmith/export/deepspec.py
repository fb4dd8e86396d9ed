"""DeepSpec-compatible DSpark / DFlash drafts (DESIGN §4) and z-lab's DFlash layout, both ways.

`DeepSpecFormat` is the adapter of `--format deepspec`, and of sglang / vllm for DSpark / DFlash.
Export: `config.json` = the draft config's `engine_config()` (DeepSpec's keys with DeepSpec's
conditional presence: `confidence_head_with_markov` only with the confidence head,
`markov_head_type` only with a Markov head; written by `models.dspark`, the one place that
defines them), checked here key by key; tensors named as DeepSpec names them, bf16 by default,
full vocabulary. That is what DeepSpec's classes, SGLang `DSPARK`, vLLM `dspark` and
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
from draftsmith.export.formats import (
    FormatAdapter, ReadContext, WriteContext, config_from_manifest, strip_model_prefix,
)
from draftsmith.export.manifest import Key, check_keys, check_tensor_names, read_tensors, write_engine_dir
from draftsmith.models.base import engine_config_class
from draftsmith.models.dflash import ZLAB_ARCHITECTURE, DFlashConfig
from draftsmith.models.dspark import DEEPSPEC_ARCHITECTURES, DSparkConfig
from draftsmith.models.io import build_draft, load_weights
from draftsmith.models.layers import geometry_from_target
from draftsmith.utils.io import InputError


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


def deepspec_config(model: nn.Module, dtype_name: str) -> dict:
    """config.json of the DeepSpec layout, checked key by key (conditional keys strictly)."""
    config = {**model.config.engine_config(), "torch_dtype": dtype_name}
    check_keys(config, DEEPSPEC_KEYS, "DeepSpec config (export)", strict=True)
    return config


def zlab_config(model: nn.Module, dtype_name: str) -> dict:
    """config.json of z-lab's DFlash layout: geometry, block_size, nested dflash_config."""
    cfg = model.config
    config = {k: v for k, v in cfg.engine_config().items()
              if k not in ("mask_token_id", "target_layer_ids", "num_anchors",
                           "enable_confidence_head", "markov_rank")}
    config["dflash_config"] = {"mask_token_id": cfg.mask_token_id, "block_size": cfg.block_size,
                               "target_layer_ids": list(cfg.target_layer_ids)}
    config["architectures"] = [ZLAB_ARCHITECTURE]
    config["torch_dtype"] = dtype_name
    check_keys(config, ZLAB_KEYS, "z-lab DFlash config (export)")
    return config


def block_files(model: nn.Module, dtype_name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of the layout the draft computes: DeepSpec's (pruned: the llama.cpp
    extension) for DeepSpec slots, else z-lab's. Tensors are the model's, in its dtype."""
    cfg = model.config
    state = model.state_dict()
    if cfg.deepspec_slots:
        names, optional = deepspec_tensor_names(cfg), set()
        config = deepspec_config(model, dtype_name)
    else:
        if cfg.pruned:
            raise InputError(f"a z-lab DFlash with a pruned head ({cfg.draft_vocab} of "
                             f"{cfg.vocab_size} ids) has no export layout: z-lab's layout carries "
                             "no LM head of its own (engines use the target's)")
        names = deepspec_tensor_names(cfg, with_embeddings=False)
        optional = {"embed_tokens.weight", "lm_head.weight"}
        config = zlab_config(model, dtype_name)
    check_tensor_names(list(state), names, sorted(optional), "draft model vs the DeepSpec tensor map")
    return config, {k: state[k] for k in names}


class DeepSpecFormat(FormatAdapter):
    """DSpark / DFlash for an engine that reads DeepSpec's layout: `deepspec` (a pruned head:
    the llama.cpp extension, said so) or SGLang's DSPARK / vLLM's dspark (`zlab_layout`: z-lab
    slots in z-lab's layout; a pruned head is refused, not verified there)."""

    takes = DSparkConfig
    holds = "DeepSpec's format holds DSpark / DFlash (DeepSpec's own Eagle3 is not servable anywhere here)"
    reads = ", ".join([*DEEPSPEC_ARCHITECTURES, ZLAB_ARCHITECTURE])

    def __init__(self, name: str, zlab_layout: bool):
        self.name, self.zlab_layout = name, zlab_layout

    def check(self, cfg) -> None:
        if not cfg.deepspec_slots and not self.zlab_layout:
            self.refuse(cfg, "it computes another function than DeepSpec's (slot k predicts anchor + "
                        "k, not anchor + k + 1), so a DeepSpec reader would run its block one slot "
                        "off; export it as sglang, vllm or gguf (z-lab's layout)", kind="z-lab DFlash")
        if cfg.deepspec_slots and cfg.pruned and self.zlab_layout:
            self.refuse(cfg, f"its head is pruned ({cfg.draft_vocab} of {cfg.vocab_size} ids) and "
                        "that is a llama.cpp extension SGLang's DSPARK / vLLM's dspark are not "
                        "verified to read; export it as gguf, or as deepspec (the extension, for "
                        "llama.cpp)")

    def layout(self, cfg) -> str:
        if not cfg.deepspec_slots:
            return "zlab-dflash"
        return "deepspec+llama.cpp-pruned-head" if cfg.pruned else "deepspec"

    def notes(self, cfg) -> list[str]:
        if not cfg.deepspec_slots:
            return ["z-lab DFlash layout: no embedding / LM head (shared with the target)"]
        if cfg.pruned:
            return [f"pruned head ({cfg.draft_vocab} of {cfg.vocab_size} ids): written as the "
                    "llama.cpp extension (draft_vocab_size + d2t; lm_head and markov_w2 with "
                    f"{cfg.draft_vocab} rows). DeepSpec cannot load it; SGLang / vLLM are "
                    "unverified; llama.cpp's converter reads it"]
        return []

    def layer_ids(self, cfg) -> dict:
        if not cfg.deepspec_slots:
            return {"engine_key": "dflash_config.target_layer_ids",
                    "engine_values": list(cfg.target_layer_ids), "engine_convention": "i"}
        return {"engine_key": "target_layer_ids", "engine_values": list(cfg.target_layer_ids),
                "engine_convention": "i (llama.cpp's converter adds 1)"}

    def write(self, draft, out_dir, ctx: WriteContext) -> list[str]:
        return write_engine_dir(out_dir, *block_files(draft, ctx.dtype_name))

    @classmethod
    def detect(cls, data: dict) -> bool:
        archs = set(data.get("architectures") or [])
        return bool(archs & set(DEEPSPEC_ARCHITECTURES)) or ZLAB_ARCHITECTURE in archs or "dflash_config" in data

    @classmethod
    def read(cls, path: Path, data: dict, ctx: ReadContext) -> nn.Module:
        if set(data.get("architectures") or []) & set(DEEPSPEC_ARCHITECTURES):
            return import_deepspec(path, data, ctx.manifest)
        name = ctx.target_name("z-lab's DFlash layout has no embedding or LM head (it shares the "
                               "target's)")
        return import_zlab(path, data, ctx.manifest, ctx.target_embeddings(name))


# --------------------------------------------------------------------------- import


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
    cls = engine_config_class(data, where)
    cfg = config_from_manifest(manifest, cls, where)
    if cfg is not None:
        _agree(cfg, data, {"mask_token_id": "mask_token_id", "block_size": "block_size",
                           "target_layer_ids": "target_layer_ids", "markov_rank": "markov_rank",
                           "num_hidden_layers": "num_hidden_layers"}, where)
    else:
        cfg = cls.from_engine_config(data, where)
    return load_weights(build_draft(cfg), strip_model_prefix(read_tensors(path)), where)


def _zlab_config(data: dict, manifest: dict | None, where: str) -> DFlashConfig:
    if data.get("architectures") != [ZLAB_ARCHITECTURE] or any(
            k in data["dflash_config"] for k in ("conv_kernel_size", "selector_rank")):
        raise InputError(f"{where}: {data.get('architectures')} with {sorted(data['dflash_config'])}"
                         f" is not z-lab's original DFlash (DFlash2 selectors are not supported)")
    sliding = [t for t in data.get("layer_types") or [] if t != "full_attention"]
    if sliding and data.get("use_sliding_window"):
        raise InputError(f"{where}: layer_types {data['layer_types']} use sliding-window attention, "
                         "which draftsmith's DFlash layers do not implement")
    cfg = config_from_manifest(manifest, DFlashConfig, where)
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
    tensors = strip_model_prefix(read_tensors(path))
    if "embed_tokens.weight" not in tensors or "lm_head.weight" not in tensors:
        embed, head = target_embeddings()
        dtype = tensors["fc.weight"].dtype
        tensors.setdefault("embed_tokens.weight", embed.to(dtype))
        tensors.setdefault("lm_head.weight", head.to(dtype))
    return load_weights(build_draft(cfg), tensors, where)
