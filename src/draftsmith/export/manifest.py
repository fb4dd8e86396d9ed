"""What every export carries besides the engine's files: the manifest, and the key-map checks.

`draftsmith_manifest.json` (versioned) names what an engine needs to pair the draft with the
right target and run it the way it was trained:

- the target: id, revision (hub commit, or a content fingerprint of a local dir / GGUF file) and
  the sha256 of its tokenizer's chat template (a draft trained on one template drafts poorly for
  another);
- the layer-id semantic (draftsmith: the output of 0-based decoder layer i, HF
  `hidden_states[i + 1]`), the ids, and the key and convention this export wrote them in
  (DESIGN §3.1: DeepSpec and SGLang `i`, vLLM / speculators / GGUF `i + 1`);
- mask token, block size, max trained length, draft vocabulary, export dtype, draftsmith version;
- `serve`: the llama.cpp settings the draft was trained for (`spec_type`, `n_max`, `p_min`) and
  the exact server arguments they give (`gguf.serve_settings`);
- the drafter's full typed config, so importing the export back loses nothing.

Key maps: every format module lists its config keys as `Key`s, each with the reason an engine
needs it (and, for DeepSpec's conditional keys, the condition). `check_keys` turns a missing key
into an error that says why it matters.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from draftsmith import __version__
from draftsmith.models.layers import geometry_from_target
from draftsmith.targets.resolve import TargetSource, resolve_target
from draftsmith.models.io import read_config_json
from draftsmith.utils.io import InputError, atomic_write_json, read_json_file

MANIFEST_FILE = "draftsmith_manifest.json"
MANIFEST_FORMAT = "draftsmith-export"
MANIFEST_VERSION = 1
LAYER_SEMANTIC = ("draftsmith: id i = the output of 0-based decoder layer i "
                  "(HF hidden_states[i + 1]); never the final layer")


# --------------------------------------------------------------------------- key maps


@dataclass(frozen=True)
class Key:
    """One config key of an engine format: why the engine needs it, and when it is present
    (`when(config) -> bool`; None = always)."""

    name: str
    why: str
    when: Callable[[dict], bool] | None = None
    alternatives: tuple[str, ...] = ()  # other (dotted) names that carry the same value

    def expected(self, data: dict) -> bool:
        return self.when is None or bool(self.when(data))

    def present(self, data: dict) -> bool:
        return any(lookup(data, name)[0] for name in (self.name, *self.alternatives))


def lookup(data: dict, dotted: str) -> tuple[bool, Any]:
    """(present, value) of a possibly nested key `a.b.c`."""
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def check_keys(data: dict, keys: Sequence[Key], where: str, strict: bool = False) -> None:
    """InputError listing every required key missing from `data`, each with why it matters.
    `strict` also rejects conditional keys present when their condition is false (DeepSpec's
    classes branch on their presence)."""
    missing = [k for k in keys if k.expected(data) and not k.present(data)]
    stray = [k for k in keys if strict and not k.expected(data) and k.present(data)]
    if not missing and not stray:
        return
    lines = [f"  - {k.name}: {k.why}" for k in missing]
    lines += [f"  - {k.name} must be absent here (conditional key): {k.why}" for k in stray]
    head = f"{where}: " + ("missing required keys" if missing else "conditional keys out of place")
    raise InputError(head + ":\n" + "\n".join(lines))


def check_tensor_names(names: Sequence[str], required: Sequence[str], optional: Sequence[str],
                       where: str) -> None:
    """InputError unless every required tensor is present and nothing unknown is."""
    have = set(names)
    missing = sorted(set(required) - have)
    unknown = sorted(have - set(required) - set(optional))
    if missing or unknown:
        parts = [f"missing tensors: {', '.join(missing)}"] if missing else []
        parts += [f"unexpected tensors: {', '.join(unknown)}"] if unknown else []
        raise InputError(f"{where}: " + " | ".join(parts))


# --------------------------------------------------------------------------- files


def read_config(path: Path) -> dict:
    """config.json of a draft / export dir, InputError naming the file when unreadable."""
    return read_config_json(path)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a dir: model.safetensors, the shards of model.safetensors.index.json
    (how transformers saves large checkpoints), or its only *.safetensors file."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise InputError(f"{index}: not a safetensors index ({e})") from None
        files = sorted({path / name for name in weight_map.values()})
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise InputError(f"{path}: expected model.safetensors (or an index of shards); found "
                             f"{[f.name for f in files] or 'no safetensors file'}")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            tensors.update(load_file(str(file)))
        except (SafetensorError, OSError) as e:
            raise InputError(f"{file}: not a readable safetensors file ({e})") from None
    return tensors


def write_engine_dir(out: Path, config: dict, tensors: dict[str, torch.Tensor]) -> list[str]:
    """config.json + model.safetensors into `out` (a fresh staging dir) -> the file names."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    atomic_write_json(out / "config.json", config)
    return ["config.json", "model.safetensors"]


# --------------------------------------------------------------------------- the target


@dataclass(frozen=True)
class TargetInfo:
    """Identity of the target an export is made for."""

    name: str  # what the user (or the training recipe) called it
    kind: str  # hf_dir | gguf | hub
    revision: str
    chat_template_sha256: str | None
    config: Any  # the target's HF config
    source: TargetSource

    def as_json(self) -> dict:
        return {"id": self.name, "kind": self.kind, "revision": self.revision,
                "chat_template_sha256": self.chat_template_sha256}


def _fingerprint(files: Sequence[Path]) -> str:
    """Content fingerprint: sha256 over each file's name, size and first and last MiB (cheap on
    multi-GB weights, and changes whenever a file is rewritten with other values)."""
    h = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        h.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read(1 << 20))
    return h.hexdigest()[:32]


def target_revision(source: TargetSource) -> str:
    """Hub commit where one is known, else `fingerprint:<hex>` of the local files."""
    if source.kind == "gguf":
        return "fingerprint:" + _fingerprint([source.gguf_path])
    if source.kind == "hub":
        try:
            from huggingface_hub import snapshot_download

            path = snapshot_download(source.path, local_files_only=True)
        except Exception:  # noqa: BLE001 - any failure means "not in the local cache"
            return "unresolved: hub id not in the local cache"
        return "hub-commit:" + Path(path).name
    match = re.search(r"/snapshots/([0-9a-f]{40})(/|$)", str(Path(source.path).resolve()))
    if match:
        return "hub-commit:" + match.group(1)
    root = Path(source.path)
    files = [root / "config.json"] + sorted(p for ext in ("*.safetensors", "*.bin", "*.gguf")
                                            for p in root.glob(ext))
    return "fingerprint:" + _fingerprint(files)


def chat_template_sha256(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def describe_target(target: str | TargetSource) -> TargetInfo:
    """Resolve a target (alias, GGUF file, HF dir, hub id) to its identity and HF config."""
    from transformers import AutoConfig

    from draftsmith.targets.model import load_tokenizer

    source = resolve_target(target) if isinstance(target, str) else target
    kwargs = {"gguf_file": source.gguf_file} if source.kind == "gguf" else {}
    try:
        config = AutoConfig.from_pretrained(source.path, **kwargs)
    except (OSError, ValueError) as e:
        raise InputError(f"target {source.name!r}: cannot read its config ({e})") from None
    tokenizer = load_tokenizer(source, require_chat_template=False)
    return TargetInfo(source.name, source.kind, target_revision(source),
                      chat_template_sha256(tokenizer), config, source)


def target_hf_dir(info: TargetInfo) -> Path:
    """A plain HF dir of the target (what llama.cpp's converter takes as --target-model-dir):
    the dir itself, the materialized cache copy of a GGUF target (built once), or the hub
    snapshot."""
    source = info.source
    if source.kind == "hf_dir":
        return Path(source.path)
    if source.kind == "hub":
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source.path))
    from draftsmith.targets.export_hf import export_hf
    from draftsmith.targets.model import materialized_dir

    cached = materialized_dir(source)
    if not (cached / "draftsmith_target.json").is_file():
        export_hf(source, cached)
    return cached


def target_architectures(info: TargetInfo) -> list[str]:
    """The target's model class names (a config read from a GGUF file has none recorded: the
    causal-LM class transformers maps its model_type to)."""
    archs = list(getattr(info.config, "architectures", None) or [])
    if not archs:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(info.config, "model_type", ""))
        archs = [name] if name else []
    return archs


GEOMETRY_FIELDS = ("hidden_size", "vocab_size", "num_target_layers", "num_attention_heads",
                   "num_key_value_heads", "head_dim")


def check_target_matches(cfg, info: TargetInfo) -> None:
    """InputError when the draft's copied geometry is not this target's: a draft is bound to
    the target whose features and embeddings it was trained on."""
    target = geometry_from_target(info.config)
    wrong = [f"{f}: draft {getattr(cfg, f)} vs target {target[f]}" for f in GEOMETRY_FIELDS
             if getattr(cfg, f, target[f]) != target[f]]
    if wrong:
        raise InputError(f"the draft was not trained for target {info.name!r} ("
                         + "; ".join(wrong) + "); pass the target it was trained on (--target)")


# --------------------------------------------------------------------------- training provenance


def find_recipe(draft_dir: Path) -> dict | None:
    """The training recipe next to a checkpoint: RUN/recipe.json for RUN/step_N (or the
    draft dir itself)."""
    for cand in (draft_dir / "recipe.json", draft_dir.resolve().parent / "recipe.json"):
        if cand.is_file():
            data = read_json_file(cand)
            return data if isinstance(data, dict) else None
    return None


def read_manifest(path: str | os.PathLike) -> dict | None:
    """The manifest of an export dir, None when it has none; InputError when unreadable."""
    file = Path(path) / MANIFEST_FILE
    if not file.is_file():
        return None
    data = read_json_file(file)
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise InputError(f"{file}: not a draftsmith export manifest (format {MANIFEST_FORMAT!r})")
    if not isinstance(data.get("version"), int) or data["version"] > MANIFEST_VERSION:
        raise InputError(f"{file}: manifest version {data.get('version')!r} is newer than this "
                         f"draftsmith reads ({MANIFEST_VERSION})")
    return data


# --------------------------------------------------------------------------- the manifest


def build_manifest(*, fmt: str, layout: str, cfg, target: TargetInfo, dtype: str,
                   layer_ids: dict, max_trained_length: int | None, serve: dict,
                   files: Sequence[str], notes: Sequence[str], source: dict,
                   extra: dict | None = None) -> dict:
    """The manifest dict (see the module docstring). `layer_ids`: {"engine_key", "engine_values",
    "engine_convention"} as written by the format."""
    vocab = {"vocab_size": cfg.vocab_size, "draft_vocab_size": cfg.draft_vocab,
             "pruned": cfg.draft_vocab != cfg.vocab_size}
    manifest = {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
        "draftsmith_version": __version__,
        "export_format": fmt, "layout": layout, "drafter": cfg.drafter, "dtype": dtype,
        "target": target.as_json(),
        "layer_ids": {"semantic": LAYER_SEMANTIC, "draftsmith": list(cfg.target_layer_ids),
                      **layer_ids},
        "mask_token_id": getattr(cfg, "mask_token_id", None),
        "block_size": getattr(cfg, "block_size", None),
        "max_trained_length": max_trained_length,
        "vocab": vocab, "serve": serve, "files": sorted(files), "notes": list(notes),
        "source": source,
        "draftsmith_config": {"kind": cfg.drafter, "config": cfg.model_dump(mode="json")},
    }
    for key, value in (extra or {}).items():
        if key in manifest and isinstance(manifest[key], dict) and isinstance(value, dict):
            manifest[key] = {**manifest[key], **value}
        else:
            manifest[key] = value
    return manifest
