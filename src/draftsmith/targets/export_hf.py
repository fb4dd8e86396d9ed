"""`draftsmith target export-hf`: materialize a target as a plain fp32 HF model dir.

transformers loads a GGUF file (dequantizing to fp32) but flags the model as quantized, so
`save_pretrained` refuses it: we rebuild a plain model of the same class from its config (with the
quantization entry removed) and copy the state dict over. The dir carries the tokenizer and its chat
template, so `AutoModelForCausalLM.from_pretrained(DIR)` and llama.cpp's converter
(`--target-model-dir`) both take it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from draftsmith import __version__
from draftsmith.targets.resolve import TargetSource, resolve_target
from draftsmith.utils.io import atomic_dir, atomic_write_json

MARKER = "draftsmith_target.json"  # written last: a dir holding it is a complete export-hf output


def _plain_copy(model):
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), assign=True, strict=True)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    return plain.eval()


def export_hf(target: str | TargetSource, out: str | Path, progress: bool | None = None) -> Path:
    """Write DIR atomically (`atomic_dir`: staged in a hidden sibling, renamed when complete; an
    existing DIR is replaced only when it is an earlier export-hf output or empty). `progress`:
    transformers' load and save bars, as in `load_hf_model`."""
    from draftsmith.targets.model import load_hf_model, load_tokenizer, loading_progress

    source = resolve_target(target) if isinstance(target, str) else target
    out = Path(out)
    with loading_progress(progress), atomic_dir(out, marker=MARKER) as staging:
        model = load_hf_model(source, torch.float32, progress)
        tokenizer = load_tokenizer(source, require_chat_template=False)
        _plain_copy(model).save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        atomic_write_json(staging / MARKER, {
            "format": "draftsmith-target-hf", "version": 1, "draftsmith_version": __version__,
            "source": source.name, "source_kind": source.kind,
            "source_file": str(source.gguf_path or source.path), "dtype": "float32",
        })
    return out


def summary(out: Path) -> str:
    cfg = json.loads((out / "config.json").read_text())
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return (f"wrote {out}: {cfg.get('architectures')} {cfg.get('num_hidden_layers')} layers, "
            f"hidden {cfg.get('hidden_size')}, vocab {cfg.get('vocab_size')}, {size / 1e6:.0f} MB fp32")
