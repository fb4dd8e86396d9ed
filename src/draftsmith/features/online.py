"""Target features for training, computed by one function whether online or for the cache.

`compute_features` is the only place that runs the target for training features: the online
mode (`OnlineFeatures`, called by the train loop per batch) and the cache builder both call it,
so an fp32 cache holds exactly (bitwise) what the online mode would have computed.

Per sample it returns the tapped layers' raw outputs (0-based decoder layer i = HF
`hidden_states[i + 1]`, concatenated on the last axis) and the final *normed* hidden state that
feeds the LM head. The loss reads the normed hidden (p_t = softmax(lm_head(hidden[t]))) only at
positions t whose next token is supervised (`loss_mask[t + 1] == 1`), so by default the hidden is
kept only there (`hidden_mask`), zero elsewhere, in both modes.

Batching: on CPU one unpadded sequence per forward (shapes depend only on the sample, so results
are bitwise reproducible); `padded` (right padding, batches of similar lengths under a token
budget) is the GPU option.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Literal

import torch

from draftsmith.config import StrictConfig
from draftsmith.data.templates import RenderedSample
from draftsmith.targets.model import TargetModel, load_target, num_layers
from draftsmith.utils.io import InputError

# config keys that do not change what a forward computes
VOLATILE_CONFIG_KEYS = frozenset({
    "_name_or_path", "name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash",
    "use_cache", "output_hidden_states", "output_attentions", "return_dict", "attn_implementation",
    "_attn_implementation", "_attn_implementation_autoset", "_attn_implementation_internal",
    "architectures", "quantization_config", "pruned_heads", "tf_legacy_loss", "torchscript",
    "chunk_size_feed_forward", "problem_type", "id2label", "label2id",
})
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class SampleFeatures:
    """Target features of one rendered sample (all tensors share the sample's length S)."""

    id: str  # source record id
    input_ids: torch.Tensor  # [S] int64
    loss_mask: torch.Tensor  # [S] uint8, 1 = token the drafter is trained to predict
    features: torch.Tensor  # [S, L*H] raw outputs of the tapped layers, concatenated
    hidden: torch.Tensor  # [S, H] final normed hidden; zero where hidden_mask is False
    hidden_mask: torch.Tensor  # [S] bool, True where `hidden` holds the real value
    # a cache built with top-k (features.top_k): the target's k most likely tokens and their
    # full-vocabulary probabilities p_t at the hidden_mask positions ([S, k]; zeros elsewhere)
    topk_ids: torch.Tensor | None = None  # [S, k] int64
    topk_probs: torch.Tensor | None = None  # [S, k] float32

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> SampleFeatures:
        """A copy on `device` (non-blocking where possible)."""
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return SampleFeatures(self.id, move(self.input_ids), move(self.loss_mask),
                              move(self.features), move(self.hidden), move(self.hidden_mask),
                              move(self.topk_ids), move(self.topk_probs))


class FeaturePolicy(StrictConfig):
    """How samples are batched through the target, and where the normed hidden is kept."""

    batching: Literal["auto", "unpadded", "padded"] = "auto"  # auto: unpadded on CPU, padded on GPU
    max_batch_tokens: int = 16384  # padded: B * longest length per forward
    hidden_at: Literal["supervised", "all"] = "supervised"  # supervised: where loss_mask[t+1] == 1

    def resolved(self, device: torch.device) -> str:
        """The batching actually used on `device`."""
        if self.batching != "auto":
            return self.batching
        return "unpadded" if device.type == "cpu" else "padded"


def supervised_hidden_mask(loss_mask: torch.Tensor) -> torch.Tensor:
    """[S] bool: positions t whose next token is supervised (`loss_mask[t + 1] == 1`), i.e. the
    only positions the loss reads the target distribution p_t from."""
    mask = torch.zeros(loss_mask.shape[0], dtype=torch.bool, device=loss_mask.device)
    mask[:-1] = loss_mask[1:] != 0
    return mask


def _device_of(target: TargetModel) -> torch.device:
    return next(target.parameters()).device


def _finish(sample: RenderedSample, features: torch.Tensor, hidden: torch.Tensor,
            hidden_at: str) -> SampleFeatures:
    """Wrap one sample's [S, L*H] features and [S, H] hidden (already unpadded)."""
    device = features.device
    ids = torch.tensor(sample.input_ids, dtype=torch.int64, device=device)
    loss_mask = torch.tensor(sample.loss_mask, dtype=torch.uint8, device=device)
    if hidden_at == "all":
        hmask = torch.ones(ids.shape[0], dtype=torch.bool, device=device)
    else:
        hmask = supervised_hidden_mask(loss_mask)
        hidden = torch.where(hmask[:, None], hidden, torch.zeros((), dtype=hidden.dtype, device=device))
    return SampleFeatures(sample.id, ids, loss_mask, features, hidden, hmask)


def _padded_batches(samples: list[RenderedSample], max_batch_tokens: int) -> list[list[int]]:
    """Indices grouped by similar length (longest first) so that B * longest <= the budget."""
    order = sorted(range(len(samples)), key=lambda i: -len(samples[i].input_ids))
    batches: list[list[int]] = []
    for i in order:
        if batches:
            longest = len(samples[batches[-1][0]].input_ids)
            if (len(batches[-1]) + 1) * longest <= max_batch_tokens:
                batches[-1].append(i)
                continue
        batches.append([i])
    return batches


def _forward_padded(target: TargetModel, samples: list[RenderedSample], idx: list[int],
                    device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One right-padded forward over samples[idx]; returns unpadded (features, hidden) each."""
    lengths = [len(samples[i].input_ids) for i in idx]
    S = max(lengths)
    ids = torch.zeros(len(idx), S, dtype=torch.int64, device=device)  # [B, S], pad id 0 (masked)
    attn = torch.zeros(len(idx), S, dtype=torch.int64, device=device)
    for row, (i, n) in enumerate(zip(idx, lengths)):
        ids[row, :n] = torch.tensor(samples[i].input_ids, dtype=torch.int64, device=device)
        attn[row, :n] = 1
    out = target(ids, attention_mask=attn)
    return [(out.features[row, :n], out.hidden[row, :n]) for row, n in enumerate(lengths)]


@torch.no_grad()
def compute_features(target: TargetModel, samples: list[RenderedSample],
                     policy: FeaturePolicy | None = None) -> list[SampleFeatures]:
    """Run the target over `samples` and return their features, in input order, on the target's
    device and in its dtype. Unpadded batching gives results that depend only on each sample."""
    policy = policy or FeaturePolicy()
    if not target.layer_ids:
        raise InputError("the target has no feature layers (layer_ids is empty)")
    device = _device_of(target)
    for s in samples:
        if not s.input_ids:
            raise InputError(f"sample {s.id!r}: no tokens")
    results: list[SampleFeatures | None] = [None] * len(samples)
    if policy.resolved(device) == "unpadded":
        for i, s in enumerate(samples):
            out = target(torch.tensor([s.input_ids], dtype=torch.int64, device=device))  # [1, S]
            results[i] = _finish(s, out.features[0], out.hidden[0], policy.hidden_at)
    else:
        for idx in _padded_batches(samples, policy.max_batch_tokens):
            for i, (feats, hidden) in zip(idx, _forward_padded(target, samples, idx, device)):
                results[i] = _finish(samples[i], feats, hidden, policy.hidden_at)
    return results  # type: ignore[return-value]


# ---- target identity (recorded in cache manifests, checked when a cache is opened) ----------

def config_fingerprint(config) -> str:
    """sha256 (16 hex) of the model config dict without keys that do not change the forward."""
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)

    def clean(obj):
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in sorted(obj.items()) if k not in VOLATILE_CONFIG_KEYS}
        return obj

    text = json.dumps(clean(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@torch.no_grad()
def weights_probe(target: TargetModel) -> str:
    """sha256 (16 hex) of a few weights (64 embedding rows, the last decoder layer's first 4096
    values per tensor), rounded to bf16 so fp32- and bf16-loaded copies of a checkpoint agree.
    Tells apart two checkpoints that share a config (fine-tunes, random seeds)."""
    h = hashlib.sha256()
    parts = [("embed", target.model.get_input_embeddings().weight[:64])]
    parts += sorted(target.layers[-1].named_parameters())
    for name, p in parts:
        h.update(name.encode())
        h.update(p.detach().flatten()[:4096].to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def target_identity(target: TargetModel) -> dict:
    """What a cache records about the target that computed it."""
    text = target.config.get_text_config()
    source = getattr(target, "source", None)
    name = source.name if source is not None else (getattr(target.config, "_name_or_path", "") or
                                                   f"<{target.config.model_type} in memory>")
    return {"name": name, "fingerprint": config_fingerprint(target.config),
            "weights_probe": weights_probe(target), "model_type": target.config.model_type,
            "num_hidden_layers": num_layers(target.model), "hidden_size": int(text.hidden_size),
            "vocab_size": int(text.vocab_size),
            "dtype": str(next(target.parameters()).dtype).removeprefix("torch.")}


# ---- online mode ----------------------------------------------------------------------------

class OnlineFeaturesConfig(StrictConfig):
    """Online features: which target, which layers, in which dtype it runs."""

    target: str = "smollm2-135m"
    layer_ids: list[int]  # 0-based decoder layers (output of layer i)
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # the target's compute dtype
    device: str = "auto"  # auto: cuda when available, else cpu
    policy: FeaturePolicy = FeaturePolicy()


class OnlineFeatures:
    """Computes target features per training batch (no cache): `feats = online(samples)`."""

    def __init__(self, config: OnlineFeaturesConfig, target: TargetModel | None = None):
        self.config = config
        if target is None:
            target = load_target(config.target, config.layer_ids, TORCH_DTYPES[config.dtype])
            device = config.device
            if device == "auto":
                device = "cuda" if torch.cuda.is_available() else "cpu"
            target = target.to(device)
        elif list(target.layer_ids) != list(config.layer_ids):
            raise InputError(f"online features: target taps layers {target.layer_ids} but the "
                             f"config asks for {config.layer_ids}")
        self.target = target

    @property
    def identity(self) -> dict:
        return target_identity(self.target)

    def __call__(self, samples: list[RenderedSample]) -> list[SampleFeatures]:
        return compute_features(self.target, samples, self.config.policy)
