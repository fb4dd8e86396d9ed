"""Format adapters: one class per engine format, writing a draft into a dir and reading one back.

An adapter instance is one `--format` for the drafts whose config class it `takes` (subclasses
included): `check(cfg)` refuses what the engine cannot load, with the reason; `write(draft,
out_dir, ctx)` writes the engine's files and returns their names; `layout`, `layer_ids` and
`notes` are what the manifest records; `finish` runs once the manifest exists (GGUF reads its
file back). Where a layout can be read back, the class `detect`s its config.json and `read`s the
dir into a draftsmith model.

`export` picks the adapter for (format, draft) by the draft config's class (`adapter_for`), so
a drafter's formats are the adapters that take its config class (`formats_for`): no format
names a drafter. `DraftsmithFormat`, draftsmith's own dir, takes every drafter.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import ClassVar, NoReturn

import torch
from torch import nn

from draftsmith.config import build_config
from draftsmith.export.manifest import TargetInfo, target_architectures
from draftsmith.models.base import DraftConfig
from draftsmith.models.io import CONFIG_FILE, WEIGHTS_FILE, load_draft, write_draft_files
from draftsmith.utils.io import InputError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Weight types only a GGUF export writes: llama.cpp's converter quantizes the fp32-staged draft.
GGUF_QUANT_DTYPES = ("q8_0",)


def torch_dtype(dtype: str) -> torch.dtype:
    """The torch dtype the draft is cast to before writing: a DTYPES key's own, fp32 for a GGUF
    quantized type (the converter quantizes from full precision)."""
    return DTYPES[dtype] if dtype in DTYPES else torch.float32


@dataclass
class WriteContext:
    """What a write needs besides the draft: the export dtype (the draft is already cast to it)
    and the target the export is made for."""

    dtype: str  # a DTYPES key, or a GGUF_QUANT_DTYPES one for `--format gguf`
    target: TargetInfo

    @property
    def dtype_name(self) -> str:
        return str(torch_dtype(self.dtype)).removeprefix("torch.")

    @cached_property
    def verifier(self) -> dict:
        """speculators' record of the target: {"name_or_path", "architectures"}."""
        return {"name_or_path": self.target.name, "architectures": target_architectures(self.target)}


@dataclass
class ReadContext:
    """What a read may need from outside the dir: the export manifest and the target (`--target`,
    else the one the manifest names), loaded only when the layout leaves something out."""

    path: Path
    manifest: dict | None
    target: str | None = None

    def target_name(self, why: str) -> str:
        name = self.target or ((self.manifest or {}).get("target") or {}).get("id")
        if not name:
            raise InputError(f"{self.path}: {why}; pass the target (--target)")
        return name

    def target_embeddings(self, name: str | None = None):
        """() -> (embedding [V, H], LM head [V, H]) of the target, loaded on first call."""
        name = name or self.target or ((self.manifest or {}).get("target") or {}).get("id") or ""

        def load():
            from draftsmith.targets.model import load_target_model

            hf, _ = load_target_model(name)
            return (hf.get_input_embeddings().weight.detach(),
                    hf.get_output_embeddings().weight.detach())
        return load

    def target_layers(self, why: str) -> int:
        from transformers import AutoConfig

        from draftsmith.targets.resolve import resolve_target

        source = resolve_target(self.target_name(why))
        kwargs = {"gguf_file": source.gguf_file} if source.kind == "gguf" else {}
        cfg = AutoConfig.from_pretrained(source.path, **kwargs)
        return int(cfg.get_text_config().num_hidden_layers)


class FormatAdapter:
    """One engine format for the drafts whose config class it `takes` (see the module docstring)."""

    name: str = ""  # the --format value
    takes: ClassVar[type] = DraftConfig
    holds: str = ""  # what the format holds, said when a draft is not one it takes
    reads: ClassVar[str] = ""  # the layouts `read` takes (for the unknown-layout error)
    readable: ClassVar[bool] = True  # whether `import_draft` reads what `write` wrote

    def check(self, cfg) -> None:
        """InputError when the engine cannot load this draft in this format."""

    def refuse(self, cfg, why: str, kind: str | None = None) -> NoReturn:
        raise InputError(f"--format {self.name} does not take a {kind or cfg.drafter} draft: {why}")

    def layout(self, cfg) -> str:
        return self.name

    def notes(self, cfg) -> list[str]:
        return []

    def layer_ids(self, cfg) -> dict:
        """{"engine_key", "engine_values", "engine_convention"}: how this format writes the ids."""
        raise NotImplementedError

    def write(self, draft: nn.Module, out_dir: Path, ctx: WriteContext) -> list[str]:
        raise NotImplementedError

    def finish(self, out_dir: Path, cfg, manifest: dict, ctx: WriteContext) -> None:
        """After the manifest is built, before it is written (may add to it)."""

    @classmethod
    def detect(cls, data: dict) -> bool:
        """Whether a dir whose config.json is `data` is in a layout this class reads."""
        return False

    @classmethod
    def read(cls, path: Path, data: dict, ctx: ReadContext) -> nn.Module:
        raise InputError(f"{path}: this layout cannot be read back")


def takes_config(adapter: FormatAdapter, cfg) -> bool:
    return issubclass(cfg if isinstance(cfg, type) else type(cfg), adapter.takes)


def most_specific(adapters: Sequence[FormatAdapter], cfg) -> FormatAdapter | None:
    """The adapter whose `takes` is the nearest class of `cfg` (a config or a config class)."""
    for klass in (cfg if isinstance(cfg, type) else type(cfg)).__mro__:
        for adapter in adapters:
            if adapter.takes is klass:
                return adapter
    return None


# --------------------------------------------------------------------------- helpers shared by readers


def config_from_manifest(manifest: dict | None, cls, where: str):
    """The typed config an export manifest recorded, when it is one of `cls`'s kind (else None)."""
    meta = (manifest or {}).get("draftsmith_config") or {}
    if meta.get("kind") != cls.drafter:
        return None
    return build_config(cls, dict(meta.get("config") or {}), where=f"{where}: draftsmith_config")


def strip_model_prefix(tensors: dict) -> dict:
    """Accept `model.`-prefixed names (some savers add it to every tensor)."""
    if tensors and all(k.startswith("model.") for k in tensors):
        return {k.removeprefix("model."): v for k, v in tensors.items()}
    return tensors


# --------------------------------------------------------------------------- draftsmith's own dir


class DraftsmithFormat(FormatAdapter):
    """draftsmith's own draft dir (what `train --init-from` and `models.io.load_draft` read)."""

    name = "draftsmith"
    holds = "draftsmith's own draft dirs"
    reads = "draftsmith's own dirs"

    def layer_ids(self, cfg) -> dict:
        return {"engine_key": "draftsmith.config.target_layer_ids",
                "engine_values": list(cfg.target_layer_ids), "engine_convention": "i"}

    def write(self, draft, out_dir, ctx):
        write_draft_files(draft, out_dir)
        return [CONFIG_FILE, WEIGHTS_FILE]

    @classmethod
    def detect(cls, data):
        return "draftsmith" in data

    @classmethod
    def read(cls, path: str | os.PathLike, data, ctx):
        return load_draft(path)
