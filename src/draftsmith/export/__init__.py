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

Each (format, drafter family) is one format adapter (`formats.FormatAdapter`): `ADAPTERS` below,
picked by the draft config's class, so a drafter exports as the formats whose adapters take its
config class (`formats_for`) and any other `--format` is refused in one line that lists them.

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

from torch import nn

from draftsmith.export.deepspec import DeepSpecFormat
from draftsmith.export.eagle3 import Eagle3Format
from draftsmith.export.formats import (
    DTYPES, GGUF_QUANT_DTYPES, DraftsmithFormat, FormatAdapter, ReadContext, WriteContext, most_specific,
    takes_config, torch_dtype,
)
from draftsmith.export.gguf import GGUF_ADAPTERS, serve_settings
from draftsmith.export.manifest import (
    MANIFEST_FILE,
    build_manifest,
    check_target_matches,
    describe_target,
    find_recipe,
    read_config,
    read_manifest,
)
from draftsmith.utils.io import InputError, atomic_dir, atomic_write_json

__all__ = ["ADAPTERS", "DTYPES", "GGUF_QUANT_DTYPES", "FORMATS", "export", "formats_for", "import_draft", "resolve_draft_dir"]

log = logging.getLogger(__name__)

ADAPTERS: tuple[FormatAdapter, ...] = (
    DeepSpecFormat("deepspec", zlab_layout=False),
    DeepSpecFormat("sglang", zlab_layout=True), Eagle3Format("sglang"),
    DeepSpecFormat("vllm", zlab_layout=True), Eagle3Format("vllm"),
    Eagle3Format("speculators"),
    *GGUF_ADAPTERS,
    DraftsmithFormat(),
)
FORMATS = tuple(dict.fromkeys(a.name for a in ADAPTERS))
READERS = (DraftsmithFormat, DeepSpecFormat, Eagle3Format)  # tried in this order


def formats_for(cfg) -> dict[str, FormatAdapter]:
    """--format -> adapter for a draft config (or config class): the formats it exports as."""
    return {a.name: a for a in ADAPTERS if takes_config(a, cfg)}


def adapter_for(fmt: str, cfg) -> FormatAdapter:
    """The adapter of `fmt` for this draft; one line naming what else it exports as otherwise."""
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    adapter = most_specific([a for a in ADAPTERS if a.name == fmt], cfg)
    if adapter is None:
        holds = "; ".join(a.holds for a in ADAPTERS if a.name == fmt)
        raise InputError(f"--format {fmt} does not take {cfg.drafter} drafts ({holds}); "
                         f"{cfg.drafter} drafts export as: {', '.join(formats_for(cfg))}")
    return adapter


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


def import_draft(path: str | os.PathLike, target: str | None = None) -> nn.Module:
    """Load any supported draft layout into a draftsmith model (weights in the file's dtype):
    draftsmith's own dir, DeepSpec-compatible (ours or DeepSpec's released layout), z-lab
    DFlash, EAGLE-3 in the SGLang, vLLM or speculators dialect. `target` (default: the one the
    export manifest names) supplies what a layout leaves out: z-lab's embedding and LM head, a
    foreign EAGLE-3 dir's layer count and embedding."""
    path = resolve_draft_dir(path)
    data = read_config(path)
    ctx = ReadContext(path, read_manifest(path), target)
    for reader in READERS:
        if reader.detect(data):
            return reader.read(path, data, ctx)
    archs = sorted(data.get("architectures") or [])
    raise InputError(f"{path / 'config.json'}: unknown draft layout (architectures {archs}); "
                     f"known: {', '.join(r.reads for r in READERS)}")


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


def export(draft_dir: str | os.PathLike, fmt: str, out_dir: str | os.PathLike, *,
           target: str | None = None, dtype: str = "bf16", manifest_extra: dict | None = None) -> Path:
    """Export the draft at `draft_dir` (any layout `import_draft` reads; a run dir means its
    step_latest) as `fmt` into `out_dir`, weights cast to `dtype` (bf16 | fp16 | fp32; for gguf also q8_0, quantized by
    llama.cpp's converter from fp32), with a
    manifest. `target` defaults to the training recipe's (or the source manifest's) target.
    `manifest_extra` is merged into the manifest (`serve.p_min` and `serve.n_max` are validated and
    applied)."""
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if dtype not in DTYPES and not (fmt == "gguf" and dtype in GGUF_QUANT_DTYPES):
        quant = f" (GGUF also {', '.join(GGUF_QUANT_DTYPES)})" if dtype in GGUF_QUANT_DTYPES else ""
        raise InputError(f"--dtype {dtype!r} for --format {fmt}: choose one of {', '.join(DTYPES)}{quant}")
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
        cfg = model.config
        check_target_matches(cfg, info)
        model = model.to(torch_dtype(dtype))
        extra = dict(manifest_extra or {})
        wanted = extra.pop("serve", None) or {}
        serve = serve_settings(cfg, wanted.get("p_min"), wanted.get("n_max"))
        adapter = adapter_for(fmt, cfg)
        adapter.check(cfg)
        ctx = WriteContext(dtype, info)
        files, notes = adapter.write(model, staging, ctx), adapter.notes(cfg)
        manifest = build_manifest(
            fmt=fmt, layout=adapter.layout(cfg), cfg=cfg, target=info, dtype=dtype,
            layer_ids=adapter.layer_ids(cfg), max_trained_length=prov["max_trained_length"],
            serve=serve, files=files, notes=notes, source=prov["source"], extra=extra)
        adapter.finish(staging, cfg, manifest, ctx)
        for note in notes:
            log.warning("%s: %s", out, note)
        atomic_write_json(staging / MANIFEST_FILE, manifest)
    return out
