"""Draft directories: `config.json` + `model.safetensors`, written atomically, validated on open.

DSpark/DFlash dirs carry DeepSpec's config keys with DeepSpec's conditional presence and DESIGN §4's
tensor names (a full-vocabulary one is what DeepSpec, SGLang, vLLM and llama.cpp's converter
load). EAGLE-3 dirs use the `midlayer.*` layout with `num_hidden_layers: 1` and always
`draft_vocab_size`, `d2t` and `t2d` (SGLang's dialect; `export` writes the others). Our own fields
live in the `draftsmith` sub-dict: drafter kind, format version, package version and the full
typed config, which is what `load_draft` rebuilds the model from. A DeepSpec DSpark/DFlash dir
without that sub-dict is imported from its top-level keys.
"""

from __future__ import annotations

import json
import os
import types
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from draftsmith import __version__
from draftsmith.config import build_config
from draftsmith.models.dflash import DFlashConfig, build_dflash
from draftsmith.models.dspark import DSparkConfig, build_dspark
from draftsmith.models.eagle3 import Eagle3Config, Eagle3Model
from draftsmith.models.layers import geometry_from_target
from draftsmith.models.vocab import check_vocab_maps
from draftsmith.utils.io import InputError, atomic_dir, atomic_write_json

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
DRAFTERS = {
    "dspark": (DSparkConfig, build_dspark),
    "dflash": (DFlashConfig, build_dflash),
    "eagle3": (Eagle3Config, Eagle3Model),
}
DEEPSPEC_ARCHITECTURES = {"Qwen3DSparkModel", "Gemma4DSparkModel"}


# --------------------------------------------------------------------------- config.json


def _geometry_json(cfg) -> dict:
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_fraction < 1.0:
        rope = {"rope_type": "proportional", "rope_theta": cfg.rope_theta,
                "partial_rotary_factor": cfg.rope_fraction}
    return {
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": rope,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": cfg.hidden_act,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
    }


def _dspark_json(cfg: DSparkConfig) -> dict:
    """DeepSpec's Qwen3DSparkModel config (Gemma4DSparkModel for the Gemma family)."""
    gemma = cfg.family == "gemma"
    out = {
        "architectures": ["Gemma4DSparkModel" if gemma else "Qwen3DSparkModel"],
        "model_type": "gemma4_text" if gemma else "qwen3",
        **_geometry_json(cfg),
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_target_layers": cfg.num_target_layers,
        "block_size": cfg.block_size,
        "layer_types": ["full_attention"] * cfg.num_hidden_layers,
        "mask_token_id": cfg.mask_token_id,
        "target_layer_ids": list(cfg.target_layer_ids),
        "num_anchors": cfg.num_anchors,
        "enable_confidence_head": cfg.enable_confidence_head,
        "markov_rank": cfg.markov_rank,
    }
    if cfg.enable_confidence_head:
        out["confidence_head_with_markov"] = cfg.confidence_head_with_markov
    if cfg.markov_rank > 0:
        out["markov_head_type"] = cfg.markov_head_type
    if cfg.pruned:
        out["draft_vocab_size"] = cfg.draft_vocab
    if gemma:
        out.update(hidden_activation=cfg.hidden_act, final_logit_softcapping=cfg.final_logit_softcapping,
                   attention_k_eq_v=cfg.attention_k_eq_v, global_head_dim=cfg.head_dim,
                   num_global_key_value_heads=cfg.num_key_value_heads)
    if getattr(cfg, "slot_semantics", "deepspec") == "zlab":
        # z-lab's layout computes a different function: never label it as DeepSpec's.
        out["architectures"] = ["DFlashDraftModel"]
        out["dflash_config"] = {"mask_token_id": cfg.mask_token_id,
                                "target_layer_ids": list(cfg.target_layer_ids)}
    return out


def _eagle3_json(cfg: Eagle3Config) -> dict:
    return {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        **_geometry_json(cfg),
        "num_hidden_layers": 1,
        "draft_vocab_size": cfg.draft_vocab,
        "target_hidden_size": cfg.hidden_size,
        "norm_before_residual": cfg.norm_before_residual,
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(cfg.target_layer_ids)},
    }


def draft_config_json(model: nn.Module) -> dict:
    """The config.json of a draft model: engine keys + the `draftsmith` sub-dict."""
    cfg = model.config
    out = _eagle3_json(cfg) if cfg.drafter == "eagle3" else _dspark_json(cfg)
    out["draftsmith"] = {"kind": cfg.drafter, "format_version": FORMAT_VERSION,
                         "version": __version__, "config": cfg.model_dump(mode="json")}
    return out


def config_from_json(data: dict, where: str = CONFIG_FILE):
    """config.json contents -> the typed draft config (our sub-dict, else a DeepSpec import)."""
    meta = data.get("draftsmith")
    if meta is None:
        return _import_deepspec(data, where)
    if not isinstance(meta, dict):
        raise InputError(f"{where}: 'draftsmith' must be an object")
    kind = meta.get("kind")
    if kind not in DRAFTERS:
        raise InputError(f"{where}: unknown drafter kind {kind!r} (draftsmith.kind); "
                         f"known: {', '.join(sorted(DRAFTERS))}")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise InputError(f"{where}: draftsmith.format_version {version!r} is not supported "
                         f"(this draftsmith reads versions up to {FORMAT_VERSION})")
    cls = DRAFTERS[kind][0]
    return build_config(cls, dict(meta.get("config") or {}), where=f"{where}: draftsmith.config")


def _import_deepspec(data: dict, where: str):
    """A DeepSpec DSpark/DFlash config (no draftsmith sub-dict) -> DSparkConfig/DFlashConfig."""
    archs = set(data.get("architectures") or [])
    if not archs & DEEPSPEC_ARCHITECTURES:
        raise InputError(f"{where}: unknown drafter kind: no 'draftsmith.kind' and architectures "
                         f"{sorted(archs)} are none of {sorted(DEEPSPEC_ARCHITECTURES)}")
    missing = [k for k in ("num_target_layers", "mask_token_id", "target_layer_ids") if k not in data]
    if missing:
        raise InputError(f"{where}: DeepSpec config lacks {', '.join(missing)}")
    fields = {**geometry_from_target(types.SimpleNamespace(**data)),
              "num_target_layers": data["num_target_layers"],
              "target_model_type": ""}
    for key in ("num_hidden_layers", "block_size", "mask_token_id", "target_layer_ids", "num_anchors",
                "enable_confidence_head", "confidence_head_with_markov", "markov_rank",
                "markov_head_type", "draft_vocab_size"):
        if key in data:
            fields[key] = data[key]
    has_heads = int(data.get("markov_rank", 0)) > 0 or bool(data.get("enable_confidence_head"))
    cls = DSparkConfig if has_heads else DFlashConfig
    if not has_heads:
        fields.setdefault("confidence_head_with_markov", False)
    return build_config(cls, fields, where=f"{where} (DeepSpec import)")


def build_draft(config) -> nn.Module:
    """A freshly initialized draft model for a typed draft config."""
    return DRAFTERS[config.drafter][1](config)


# --------------------------------------------------------------------------- save / load


def _tensors_of(model: nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[name] = t.cpu().contiguous()
    return out


def write_draft_files(model: nn.Module, out_dir: Path, dtype: torch.dtype | None = None) -> None:
    """config.json + model.safetensors into the existing dir `out_dir` (a staging dir)."""
    tensors = _tensors_of(model, dtype)
    config = draft_config_json(model)
    config["torch_dtype"] = str(dtype or model.fc.weight.dtype).removeprefix("torch.")
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    with open(out_dir / WEIGHTS_FILE, "rb") as f:
        os.fsync(f.fileno())
    atomic_write_json(out_dir / CONFIG_FILE, config)


def save_draft(model: nn.Module, out_dir: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write `out_dir/config.json` + `out_dir/model.safetensors` atomically (`atomic_dir`: an
    existing `out_dir` is replaced only when it is a draft dir, whose config.json carries the
    `draftsmith` sub-dict, or empty). `dtype` casts floating tensors (e.g. torch.bfloat16 for
    DeepSpec's format); None keeps them."""
    out = Path(out_dir)
    with atomic_dir(out, marker=CONFIG_FILE, key="draftsmith") as staging:
        write_draft_files(model, staging, dtype)
    return out


def read_config_json(path: str | os.PathLike) -> dict:
    """The raw config.json of a draft (or export) dir, InputError naming the file when unreadable."""
    file = Path(path) / CONFIG_FILE
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{file}: not found (is {path} a draft dir?)") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{file}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise InputError(f"{file}: expected a JSON object")
    return data


def read_draft_config(path: str | os.PathLike):
    """The typed config of the draft dir at `path` (InputError naming the file when invalid)."""
    return config_from_json(read_config_json(path), where=str(Path(path) / CONFIG_FILE))


def check_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """InputError naming every missing, unexpected and shape-mismatched tensor."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    shapes = [f"{k} {tuple(tensors[k].shape)} (expected {expected[k]})"
              for k in sorted(expected.keys() & tensors.keys()) if tuple(tensors[k].shape) != expected[k]]
    problems = [f"missing tensors: {', '.join(missing)}"] if missing else []
    problems += [f"unexpected tensors: {', '.join(extra)}"] if extra else []
    problems += [f"shape mismatch: {'; '.join(shapes)}"] if shapes else []
    if problems:
        raise InputError(f"{where}: does not match its config.json: " + " | ".join(problems))


def load_draft(path: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild a draft model from a draft dir, validating every tensor name and shape.
    Floating weights keep the file's dtype unless `dtype` is given."""
    path = Path(path)
    config = read_draft_config(path)
    file = path / WEIGHTS_FILE
    try:
        tensors = load_file(str(file))
    except FileNotFoundError:
        raise InputError(f"{file}: not found") from None
    except (SafetensorError, OSError) as e:
        raise InputError(f"{file}: not a readable safetensors file ({e})") from None
    model = build_draft(config)
    check_tensors(model, tensors, str(file))
    file_dtype = tensors["fc.weight"].dtype
    model.to(file_dtype).load_state_dict(tensors, strict=True)
    if config.drafter == "eagle3":
        check_vocab_maps(model.d2t, model.t2d)
    elif config.pruned:
        model.refresh_t2d()
        check_vocab_maps(model.d2t, model.t2d)
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
