"""Load a target causal LM and tap the features drafters train on.

One forward returns, for the chosen 0-based decoder layers, each layer's raw output
(HF `hidden_states[i + 1]`) concatenated on the last axis, plus the final *normed* hidden state
that feeds the LM head. Only the chosen layers are kept (forward hooks), never all of them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from draftsmith.targets.resolve import TargetSource, resolve_target
from draftsmith.utils.io import InputError, atomic_write_json, file_sha256
from draftsmith.utils.paths import cache_root

log = logging.getLogger(__name__)

_load_progress = True  # process default of the loading bars; `--no-progress` turns it off


def set_load_progress(enabled: bool) -> None:
    """Process-wide default for the progress bars shown while a target loads (cli: --no-progress)."""
    global _load_progress
    _load_progress = bool(enabled)


@contextlib.contextmanager
def loading_progress(enabled: bool | None) -> Iterator[None]:
    """Hide transformers' load (and save) bars inside the block unless `enabled`.

    `None` follows `set_load_progress`. Hiding covers "Loading weights" (transformers' switch) and
    the GGUF dequantization bar (plain tqdm in transformers, so its module's `tqdm` is swapped
    for a disabled one); both are put back afterwards.
    """
    enabled = _load_progress if enabled is None else enabled
    from transformers.utils import logging as hf_logging

    if enabled or not hf_logging.is_progress_bar_enabled():
        yield
        return
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    hf_logging.disable_progress_bar()
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm


@dataclass
class TargetOutput:
    features: torch.Tensor | None  # [B, S, len(layer_ids) * H], raw outputs of the tapped layers
    hidden: torch.Tensor  # [B, S, H], after the final norm (input of the LM head)
    cache: object | None = None  # the KV cache when use_cache=True


def load_tokenizer(source: TargetSource | str, require_chat_template: bool = True):
    """The target's own tokenizer (with its chat template)."""
    from transformers import AutoTokenizer

    source = resolve_target(source) if isinstance(source, str) else source
    kwargs = {"gguf_file": source.gguf_file} if source.kind == "gguf" else {}
    tok = AutoTokenizer.from_pretrained(source.path, **kwargs)
    if require_chat_template and not getattr(tok, "chat_template", None):
        raise InputError(
            f"target {source.name!r}: its tokenizer has no chat template, so prompts cannot be "
            "rendered the way the target was trained; use a chat/instruct model "
            "or add a chat_template to its tokenizer_config.json"
        )
    return tok


def gguf_sha256(path: Path) -> str:
    """Full-content sha256 of a GGUF file, remembered by (path, size, mtime_ns).

    The hash of a multi-GB file takes seconds, so it is kept in a small JSON sidecar under
    `$DRAFTSMITH_CACHE/targets/hashes/` (never beside the GGUF, which may be read-only) and
    recomputed only when the file's size or mtime changes.
    """
    path = Path(path).resolve()
    st = path.stat()
    stamp = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    name = hashlib.blake2b(str(path).encode("utf-8"), digest_size=8).hexdigest()
    sidecar = cache_root() / "targets" / "hashes" / f"{name}.json"
    try:
        known = json.loads(sidecar.read_text())
        if {k: known.get(k) for k in stamp} == stamp and isinstance(known.get("sha256"), str):
            return known["sha256"]
    except (OSError, ValueError, AttributeError):
        pass  # no sidecar yet, or an unreadable one: hash again
    log.info("hashing %s (%d bytes) to key its materialized dir", path, st.st_size)
    digest = file_sha256(path)
    sidecar.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(sidecar, {**stamp, "sha256": digest})
    return digest


def materialized_dir(source: TargetSource) -> Path:
    """Cache dir where a GGUF target is kept as a plain fp32 HF dir (built on first use), keyed by
    the GGUF's full content hash: another file never reuses these weights."""
    digest = gguf_sha256(source.gguf_path)
    return cache_root() / "targets" / f"{Path(source.gguf_file).stem}-{digest[:16]}"


def load_hf_model(source: TargetSource, dtype: torch.dtype = torch.float32,
                  progress: bool | None = None) -> nn.Module:
    """Load the weights exactly as transformers does (GGUF is dequantized to fp32).
    `progress`: show transformers' loading bars (None: the `set_load_progress` default)."""
    from transformers import AutoModelForCausalLM

    kwargs = {"gguf_file": source.gguf_file} if source.kind == "gguf" else {}
    try:
        with loading_progress(progress):
            model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, **kwargs)
    except OSError as e:
        raise InputError(f"target {source.name!r}: cannot load ({e})") from None
    return model.eval()


def load_target_model(
    target: str | TargetSource, dtype: torch.dtype = torch.float32, use_cache_dir: bool = True,
    progress: bool | None = None,
) -> tuple[nn.Module, TargetSource]:
    """Load a target. A GGUF target is materialized once as a plain HF dir in the cache dir
    (dequantizing takes ~18 s for SmolLM2; the cached dir loads in ~1 s) and loaded from there."""
    source = resolve_target(target) if isinstance(target, str) else target
    if source.kind == "gguf" and use_cache_dir:
        from draftsmith.targets.export_hf import export_hf

        cached = materialized_dir(source)
        if not (cached / "draftsmith_target.json").is_file():
            log.info("materializing %s as a plain HF dir in %s (once)", source.name, cached)
            export_hf(source, cached, progress=progress)
        model = load_hf_model(TargetSource(source.name, "hf_dir", str(cached)), dtype, progress)
        return model, source
    return load_hf_model(source, dtype, progress), source


def num_layers(model: nn.Module) -> int:
    return len(model.get_decoder().layers)


def check_layer_ids(layer_ids: list[int], n_layers: int) -> None:
    """Tapped layers are 0-based decoder layers; the final layer is never a feature (DESIGN §3.1)."""
    for i in layer_ids:
        if not isinstance(i, int) or i < 0 or i >= n_layers:
            raise InputError(f"target layer id {i} out of range: the target has layers 0..{n_layers - 1}")
        if i == n_layers - 1:
            raise InputError(
                f"target layer id {i} is the final layer; its output is what the LM head predicts "
                f"from, not a feature (use ids 0..{n_layers - 2})"
            )


class TargetModel(nn.Module):
    """A frozen target with feature taps on `layer_ids` (0-based decoder layers)."""

    def __init__(self, model: nn.Module, layer_ids: list[int] | None = None, source=None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.source = source
        self.layers = model.get_decoder().layers
        self.layer_ids = list(layer_ids or [])
        check_layer_ids(self.layer_ids, len(self.layers))
        self._taps: dict[int, torch.Tensor] = {}
        for i in set(self.layer_ids):
            self.layers[i].register_forward_hook(self._make_hook(i))

    def _make_hook(self, i: int):
        def hook(_module, _inputs, output):
            self._taps[i] = output[0] if isinstance(output, tuple) else output

        return hook

    @property
    def config(self):
        return self.model.config

    @torch.no_grad()
    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None,
                use_cache: bool = False) -> TargetOutput:
        self._taps.clear()
        out = self.model.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache, use_cache=use_cache,
        )
        feats = torch.cat([self._taps[i] for i in self.layer_ids], dim=-1) if self.layer_ids else None
        self._taps.clear()
        new_cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        return TargetOutput(feats, out.last_hidden_state, new_cache)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits from normed hidden states (applies a final softcap if the family has one)."""
        head = self.model.get_output_embeddings()
        logits = head(hidden.to(head.weight.dtype))
        cap = getattr(self.config.get_text_config(), "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits


def load_target(target: str, layer_ids: list[int] | None = None,
                dtype: torch.dtype = torch.float32, progress: bool | None = None) -> TargetModel:
    model, source = load_target_model(target, dtype, progress=progress)
    return TargetModel(model, layer_ids, source)


def describe(source: TargetSource, model: nn.Module) -> dict:
    cfg = model.config
    return {"target": source.name, "kind": source.kind, "model_type": cfg.model_type,
            "num_hidden_layers": num_layers(model), "hidden_size": cfg.get_text_config().hidden_size,
            "vocab_size": cfg.get_text_config().vocab_size}

