"""Draft directories: `config.json` + `model.safetensors`, written atomically, validated on open.

The top-level keys are the draft config's `engine_config()` (models.base): DSpark/DFlash dirs carry
DeepSpec's config keys with DeepSpec's conditional presence and DESIGN §4's tensor names (a
full-vocabulary one is what DeepSpec, SGLang, vLLM and llama.cpp's converter load). EAGLE-3 dirs
use the `midlayer.*` layout with `num_hidden_layers: 1` and always `draft_vocab_size`, `d2t` and
`t2d` (SGLang's dialect; `export` writes the others). Our own fields live in the `draftsmith`
sub-dict: drafter kind, format version, package version and the full typed config, which is what
`load_draft` rebuilds the model from. A dir without that sub-dict is read by the config class
that claims its keys (DeepSpec's DSpark / DFlash dirs).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from draftsmith import __version__
from draftsmith.config import build_config
from draftsmith.models.base import config_class, engine_config_class
from draftsmith.utils.io import InputError, atomic_dir, atomic_write_json

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


# --------------------------------------------------------------------------- config.json


def draft_config_json(model: nn.Module) -> dict:
    """The config.json of a draft model: the config's engine keys + the `draftsmith` sub-dict."""
    cfg = model.config
    out = cfg.engine_config()
    out["draftsmith"] = {"kind": cfg.drafter, "format_version": FORMAT_VERSION,
                         "version": __version__, "config": cfg.model_dump(mode="json")}
    return out


def config_from_json(data: dict, where: str = CONFIG_FILE):
    """config.json contents -> the typed draft config (our sub-dict, else the engine keys of
    whichever drafter config claims them: a DeepSpec import)."""
    meta = data.get("draftsmith")
    if meta is None:
        return engine_config_class(data, where).from_engine_config(data, where)
    if not isinstance(meta, dict):
        raise InputError(f"{where}: 'draftsmith' must be an object")
    cls = config_class(meta.get("kind"), where=f"{where}: draftsmith.kind: ")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise InputError(f"{where}: draftsmith.format_version {version!r} is not supported "
                         f"(this draftsmith reads versions up to {FORMAT_VERSION})")
    return build_config(cls, dict(meta.get("config") or {}), where=f"{where}: draftsmith.config")


def build_draft(config) -> nn.Module:
    """A freshly initialized draft model for a typed draft config."""
    return config.build()


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


def load_weights(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> nn.Module:
    """Validate names and shapes, load in the tensors' dtype, restore and check the vocab maps
    (every reader of a draft's weights: `load_draft` and the format adapters)."""
    check_tensors(model, tensors, where)
    model.to(tensors["fc.weight"].dtype).load_state_dict(tensors, strict=True)
    model.restore_vocab_maps()
    return model


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
    model = load_weights(build_draft(config), tensors, str(file))
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
