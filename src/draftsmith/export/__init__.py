"""Export drafts to the formats engines load, and import those formats back.

`export(draft_dir, fmt, out_dir, target=..., dtype=...)` writes `out_dir` atomically: the engine's
files plus `draftsmith_manifest.json` (manifest.py). Formats:

| fmt | DSpark / DFlash (DeepSpec slots) | z-lab DFlash | EAGLE-3 |
|---|---|---|---|
| deepspec | DeepSpec layout (pruned: llama.cpp extension, said so) | refused | refused |
| sglang | DeepSpec layout for SGLang DSPARK (full vocabulary) | z-lab layout | nested ids (i) |
| vllm | DeepSpec layout for vLLM dspark (full vocabulary) | z-lab layout | top-level ids (i + 1) |
| speculators | refused | refused | Eagle3Speculator (i + 1) |
| gguf | llama.cpp converter, checked | llama.cpp converter | from the vLLM dialect |
| draftsmith | draftsmith's own draft dir (what `train --init-from` and `models.io.load_draft` read) |

`import_draft(path, target=None)` reads any of them — and DeepSpec's released checkpoints, z-lab's
DFlash releases and foreign EAGLE-3 dirs — into a draftsmith model; export's `--draft` accepts all
of them, so `--format draftsmith` turns a foreign checkpoint into one `train --init-from` and the
evaluator load.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from torch import nn

from draftsmith.engines.llama_cpp import LLAMA_CPP_VERSION
from draftsmith.export import gguf
from draftsmith.export.deepspec import (
    DEEPSPEC_ARCHITECTURES,
    ZLAB_ARCHITECTURE,
    deepspec_files,
    import_deepspec,
    import_zlab,
    is_zlab,
)
from draftsmith.export.eagle3 import EAGLE3_ARCHITECTURES, eagle3_files, import_eagle3
from draftsmith.export.manifest import (
    MANIFEST_FILE,
    TargetInfo,
    build_manifest,
    check_target_matches,
    describe_target,
    find_recipe,
    read_config,
    read_manifest,
    serve_settings,
    target_architectures,
    target_hf_dir,
    write_engine_dir,
)
from draftsmith.models.io import load_draft, write_draft_files
from draftsmith.utils.io import InputError, atomic_dir, atomic_write_json

__all__ = ["DTYPES", "FORMATS", "export", "import_draft", "resolve_draft_dir"]

log = logging.getLogger(__name__)

FORMATS = ("deepspec", "sglang", "vllm", "speculators", "gguf", "draftsmith")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# --------------------------------------------------------------------------- import


def resolve_draft_dir(path: str | os.PathLike) -> Path:
    """A draft dir; a training run dir stands for its `step_latest` checkpoint."""
    p = Path(path)
    if not (p / "config.json").is_file() and p.is_dir():
        steps = sorted((int(c.name[5:]), c) for c in p.glob("step_*")
                       if c.name[5:].isdigit() and (c / "config.json").is_file())
        if (p / "step_latest" / "config.json").is_file():
            p = p / "step_latest"
        elif steps:
            p = steps[-1][1]
    if not (p / "config.json").is_file():
        raise InputError(f"{path}: not a draft dir (no config.json) nor a training run "
                         "(no step_latest/ or step_N/ checkpoint)")
    return p.resolve()


def _target_name(target: str | None, manifest: dict | None, path: Path, why: str) -> str:
    name = target or ((manifest or {}).get("target") or {}).get("id")
    if not name:
        raise InputError(f"{path}: {why}; pass the target (--target)")
    return name


def _target_embeddings(target: str):
    """() -> (embedding [V, H], LM head [V, H]) of the target, loaded on first call."""
    def load():
        from draftsmith.target.model import load_target_model

        hf, _ = load_target_model(target)
        return (hf.get_input_embeddings().weight.detach(),
                hf.get_output_embeddings().weight.detach())
    return load


def _target_layers(target: str) -> int:
    from transformers import AutoConfig

    from draftsmith.target.resolve import resolve_target

    source = resolve_target(target)
    kwargs = {"gguf_file": source.gguf_file} if source.kind == "gguf" else {}
    cfg = AutoConfig.from_pretrained(source.path, **kwargs)
    return int(cfg.get_text_config().num_hidden_layers)


def import_draft(path: str | os.PathLike, target: str | None = None) -> nn.Module:
    """Load any supported draft layout into a draftsmith model (weights in the file's dtype):
    draftsmith's own dir, DeepSpec-compatible (ours or DeepSpec's released layout), z-lab
    DFlash, EAGLE-3 in the SGLang, vLLM or speculators dialect. `target` (default: the one the
    export manifest names) supplies what a layout leaves out: z-lab's embedding and LM head, a
    foreign EAGLE-3 dir's layer count and embedding."""
    path = resolve_draft_dir(path)
    data = read_config(path)
    manifest = read_manifest(path)
    archs = set(data.get("architectures") or [])
    if "draftsmith" in data:
        return load_draft(path)
    if archs & set(DEEPSPEC_ARCHITECTURES):
        return import_deepspec(path, data, manifest)
    if ZLAB_ARCHITECTURE in archs or "dflash_config" in data:
        name = _target_name(target, manifest, path, "z-lab's DFlash layout has no embedding or "
                                                    "LM head (it shares the target's)")
        return import_zlab(path, data, manifest, _target_embeddings(name))
    if archs & EAGLE3_ARCHITECTURES or "speculators_model_type" in data:
        layers = None
        if not (manifest or {}).get("draftsmith_config"):
            layers = _target_layers(_target_name(
                target, manifest, path, "an EAGLE-3 config does not record the target's layer count"))
        lazy = _target_embeddings(target or ((manifest or {}).get("target") or {}).get("id") or "")
        return import_eagle3(path, data, manifest, layers, lazy)
    raise InputError(f"{path / 'config.json'}: unknown draft layout (architectures {sorted(archs)}); "
                     f"known: draftsmith's own dirs, {', '.join(DEEPSPEC_ARCHITECTURES)}, "
                     f"{ZLAB_ARCHITECTURE}, {', '.join(sorted(EAGLE3_ARCHITECTURES))}")


# --------------------------------------------------------------------------- export


def _provenance(src: Path) -> dict:
    """What the draft's own files say about its training: recipe target and max length (from
    RUN/recipe.json), or the manifest of an earlier export."""
    recipe = find_recipe(src)
    manifest = read_manifest(src) or {}
    target = (recipe or {}).get("target") or (manifest.get("target") or {}).get("id")
    max_len = ((recipe or {}).get("data") or {}).get("max_length")
    if max_len is None:
        max_len = manifest.get("max_trained_length")
    config_sha = hashlib.sha256((src / "config.json").read_bytes()).hexdigest()
    return {"target": target, "max_trained_length": max_len,
            "source": {"draft_dir": str(src), "config_sha256": config_sha,
                       "recipe": "recipe.json" if recipe is not None else None}}


def _refuse(fmt: str, cfg, why: str):
    kind = "z-lab DFlash" if is_zlab(cfg) else cfg.drafter
    raise InputError(f"--format {fmt} does not take a {kind} draft: {why}")


def _write_dspark(fmt: str, model: nn.Module, staging: Path, dtype_name: str):
    """DSpark / DFlash for deepspec, sglang, vllm -> (layout, files, layer ids, notes)."""
    cfg = model.config
    if is_zlab(cfg):
        if fmt == "deepspec":
            _refuse(fmt, cfg, "it computes another function than DeepSpec's (slot k predicts "
                    "anchor + k, not anchor + k + 1), so a DeepSpec reader would run its block one "
                    "slot off; export it as sglang, vllm or gguf (z-lab's layout)")
        layout, notes = "zlab-dflash", ["z-lab DFlash layout: no embedding / LM head (shared "
                                        "with the target)"]
    elif cfg.pruned and fmt != "deepspec":
        _refuse(fmt, cfg, f"its head is pruned ({cfg.draft_vocab} of {cfg.vocab_size} ids) and "
                "that is a llama.cpp extension SGLang's DSPARK / vLLM's dspark are not verified "
                "to read; export it as gguf, or as deepspec (the extension, for llama.cpp)")
    elif cfg.pruned:
        layout = "deepspec+llama.cpp-pruned-head"
        notes = [f"pruned head ({cfg.draft_vocab} of {cfg.vocab_size} ids): written as the "
                 "llama.cpp extension (draft_vocab_size + d2t; lm_head and markov_w2 with "
                 f"{cfg.draft_vocab} rows). DeepSpec cannot load it; SGLang / vLLM are unverified; "
                 "llama.cpp's converter reads it"]
    else:
        layout, notes = "deepspec", []
    config, tensors, layer_ids = deepspec_files(model, dtype_name)
    return layout, write_engine_dir(staging, config, tensors), layer_ids, notes


def _write_format(fmt: str, model: nn.Module, dtype: str, staging: Path, info: TargetInfo):
    """Write one format into `staging` -> (layout, files, layer-id record, notes, gguf extra)."""
    cfg = model.config
    dtype_name = str(DTYPES[dtype]).removeprefix("torch.")
    verifier = {"name_or_path": info.name, "architectures": target_architectures(info)}
    if fmt == "draftsmith":
        write_draft_files(model, staging)
        return ("draftsmith", ["config.json", "model.safetensors"],
                {"engine_key": "draftsmith.config.target_layer_ids",
                 "engine_values": list(cfg.target_layer_ids), "engine_convention": "i"}, [], None)
    if fmt == "gguf":
        gguf.convert(model, staging / gguf.GGUF_FILE, dtype, target_hf_dir(info), verifier)
        shifted = [i + 1 for i in cfg.target_layer_ids]
        arch = "eagle3" if cfg.drafter == "eagle3" else "dflash"
        return ("gguf", [gguf.GGUF_FILE], {"engine_key": f"{arch}.target_layers",
                                           "engine_values": shifted, "engine_convention": "i + 1"},
                [], {"file": gguf.GGUF_FILE, "converter": f"llama.cpp {LLAMA_CPP_VERSION} "
                     "convert_hf_to_gguf.py", "outtype": gguf.OUTTYPES[dtype]})
    if cfg.drafter == "eagle3":
        if fmt == "deepspec":
            _refuse(fmt, cfg, "DeepSpec's format holds DSpark / DFlash (DeepSpec's own Eagle3 is "
                    "not servable anywhere here); use sglang, vllm, speculators or gguf")
        config, tensors, layer_ids = eagle3_files(model, fmt, dtype_name, verifier)
        notes = []
        if fmt == "sglang" and cfg.norm_before_residual:
            notes.append("norm_before_residual: SGLang's support for it is unverified here")
        return f"eagle3-{fmt}", write_engine_dir(staging, config, tensors), layer_ids, notes, None
    if fmt == "speculators":
        _refuse(fmt, cfg, "speculators' format here is Eagle3Speculator; export DSpark / DFlash "
                "as deepspec, vllm (its dspark method), sglang or gguf")
    return (*_write_dspark(fmt, model, staging, dtype_name), None)


def export(draft_dir: str | os.PathLike, fmt: str, out_dir: str | os.PathLike, *,
           target: str | None = None, dtype: str = "bf16", manifest_extra: dict | None = None) -> Path:
    """Export the draft at `draft_dir` (any layout `import_draft` reads; a run dir means its
    step_latest) as `fmt` into `out_dir`, weights cast to `dtype` (bf16 | fp16 | fp32), with a
    manifest. `target` defaults to the training recipe's (or the source manifest's) target.
    `manifest_extra` is merged into the manifest (`serve.p_min` is validated and applied)."""
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise InputError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    out = Path(out_dir)
    with atomic_dir(out, marker=MANIFEST_FILE) as staging:
        src = resolve_draft_dir(draft_dir)
        prov = _provenance(src)
        name = target or prov["target"]
        if not name:
            raise InputError(f"{src}: no target named (no recipe.json next to the checkpoint, no "
                             "manifest); the manifest must record the target (id, revision, chat "
                             "template) so engines pair the draft with its model: pass --target")
        model = import_draft(src, name).eval()
        info = describe_target(name)
        check_target_matches(model.config, info)
        model = model.to(DTYPES[dtype])
        extra = dict(manifest_extra or {})
        serve = serve_settings(model.config, (extra.pop("serve", None) or {}).get("p_min"))
        layout, files, layer_ids, notes, gguf_extra = _write_format(fmt, model, dtype, staging, info)
        manifest = build_manifest(
            fmt=fmt, layout=layout, cfg=model.config, target=info, dtype=dtype,
            layer_ids=layer_ids, max_trained_length=prov["max_trained_length"], serve=serve,
            files=files, notes=notes, source=prov["source"], extra=extra)
        if gguf_extra is not None:
            checked = gguf.check_gguf(staging / gguf.GGUF_FILE, model.config, manifest)
            manifest["gguf"] = {**gguf_extra, "metadata_checked": checked}
        for note in notes:
            log.warning("%s: %s", out, note)
        atomic_write_json(staging / MANIFEST_FILE, manifest)
    return out
