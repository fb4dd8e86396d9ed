"""Everything the train loop needs, built from a recipe: target, data, draft, feature source.

Kept apart from `loop.py` so the loop reads top to bottom.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from draftsmith.data.templates import RenderedSample
from draftsmith.features.cache import VERSION as CACHE_VERSION
from draftsmith.features.cache import FeatureCache, FeatureCacheError, build_cache, check_top_k
from draftsmith.features.online import FeaturePolicy, SampleFeatures, compute_features, target_identity
from draftsmith.models.io import build_draft, load_draft
from draftsmith.models.vocab import build_draft_vocab
from draftsmith.targets.model import TargetModel, load_target_model, load_tokenizer
from draftsmith.train.dataset import TrainData, prepare_data, supervised_token_counts
from draftsmith.train.init import init_layers_from_target, init_markov_from_bigrams
from draftsmith.train.parallel import DistInfo, barrier
from draftsmith.train.recipe import Recipe
from draftsmith.utils.dtypes import ComputeDtype
from draftsmith.utils.dtypes import resolve as resolve_dtype
from draftsmith.utils.io import InputError
from draftsmith.utils.paths import cache_root

log = logging.getLogger(__name__)


@torch.no_grad()
def final_norm_scale(hf_target: nn.Module) -> torch.Tensor:
    """[H] the per-dimension scale the target's final norm applies (whatever its convention: w,
    Gemma's 1 + w): its output on an all-ones row, whose RMS is 1."""
    norm = hf_target.get_decoder().norm
    weight = next(norm.parameters())
    eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))
    ones = torch.ones(1, weight.shape[0], dtype=weight.dtype, device=weight.device)
    return norm(ones)[0].float().cpu() * (1 + eps) ** 0.5


def build_model(recipe: Recipe, hf_target: nn.Module, data: TrainData, init_from: str | None) -> nn.Module:
    """The draft, initialized from the target (frozen embedding / LM head copies) or from a
    draft dir (`init_from`, e.g. a DeepSpec checkpoint for continued training)."""
    if init_from:
        return freeze(load_draft(init_from), recipe.optim.freeze, data.lines)
    cls = recipe.model_config_class()
    cfg = cls.from_target(hf_target.config, **recipe.model)
    model = build_draft(cfg)
    kept = None
    if cfg.draft_vocab_size and cfg.draft_vocab_size < cfg.vocab_size:
        counts = supervised_token_counts(data.train, cfg.vocab_size)
        specials = [i for i in range(min(cfg.vocab_size, 64)) if counts[i] > 0]
        kept = build_draft_vocab(counts, cfg.draft_vocab_size, always_include=specials).kept_ids
        covered = counts[kept].sum().item() / max(counts.sum().item(), 1)
        data.lines.append(f"draft vocabulary: {cfg.draft_vocab_size} of {cfg.vocab_size} tokens cover "
                          f"{covered:.2%} of the training labels")
    model = model.init_from_target(hf_target, kept)
    if recipe.init.layers == "target":
        data.lines.append(init_layers_from_target(model, hf_target, data.train))
    with torch.no_grad():
        if recipe.init.final_norm == "target":
            model.norm.weight.copy_(final_norm_scale(hf_target).to(model.norm.weight.dtype))
        elif recipe.init.final_norm != 1.0:
            model.norm.weight.mul_(recipe.init.final_norm)
    if recipe.init.markov == "bigram":
        data.lines.append(init_markov_from_bigrams(model, data.train, recipe.init.bigram_smoothing))
    model = freeze(model, recipe.optim.freeze, data.lines)
    param_groups(model, recipe.optim.lr, recipe.optim.lr_scale)  # a typo fails before any cache work
    return model


def matching(names: list[str], pattern: str, field: str) -> list[str]:
    """The parameter names `pattern` (fnmatch) matches; none is an InputError naming the recipe
    field (a typo must not silently change nothing)."""
    matched = fnmatch.filter(names, pattern)
    if not matched:
        raise InputError(f"{field}: {pattern!r} matches no {'trained ' if field == 'optim.lr_scale' else ''}"
                         f"parameter of the draft (names look like {', '.join(names[:4])}, ...)")
    return matched


def param_groups(model, base_lr: float, lr_scale: dict[str, float]) -> list[dict]:
    """Trained parameters in AdamW groups: the first group at `base_lr`, then one per
    `optim.lr_scale` pattern (fnmatch on parameter names) at base_lr × scale. A pattern that
    matches no trained parameter, or a parameter two patterns match, is an InputError naming it."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    owner: dict[str, str] = {}
    for pattern in sorted(lr_scale):  # one order however the recipe was read (resume)
        for name in matching(list(params), pattern, "optim.lr_scale"):
            if name in owner:
                raise InputError(f"optim.lr_scale: {name} matches {owner[name]!r} and {pattern!r}; "
                                 "make the patterns disjoint")
            owner[name] = pattern
    rest = [p for n, p in params.items() if n not in owner]
    scaled = [{"params": [params[n] for n in params if owner.get(n) == pt], "lr": base_lr * lr_scale[pt]}
              for pt in sorted(lr_scale)]
    return ([{"params": rest, "lr": base_lr}] if rest else []) + scaled


def freeze(model: nn.Module, patterns: list[str], lines: list[str]) -> nn.Module:
    """Stop gradients to the parameters whose names match any of `patterns` (`optim.freeze`);
    a pattern that matches no parameter is an InputError (a typo must not train everything)."""
    if not patterns:
        return model
    names = [n for n, _ in model.named_parameters()]
    hit: set[str] = set()
    for pattern in patterns:
        hit.update(matching(names, pattern, "optim.freeze"))
    count = 0
    for name, p in model.named_parameters():
        if name in hit:
            count += p.numel() if p.requires_grad else 0
            p.requires_grad_(False)
    lines.append(f"optim.freeze: {len(hit)} tensors ({count:,} more parameters) frozen by {patterns}")
    return model


class FeatureSource:
    """Features of rendered samples: computed by the target (online) or read from a cache."""

    def __init__(self, target: TargetModel, cache: FeatureCache | None, policy: FeaturePolicy):
        self.target, self.cache, self.policy = target, cache, policy
        self.index = {rid: i for i, rid in enumerate(cache.record_ids)} if cache is not None else {}

    def __call__(self, samples: list[RenderedSample]) -> list[SampleFeatures]:
        if self.cache is None:
            return compute_features(self.target, samples, self.policy)
        return [self.cache[self.index[s.id]] for s in samples]


def _cache_dir(recipe: Recipe, target: TargetModel, samples: list[RenderedSample]) -> Path:
    """recipe.features.cache_dir, else a directory keyed by everything the cache's bytes depend on
    (the records' content by their fingerprints, and the cache format version)."""
    if recipe.features.cache_dir:
        return Path(recipe.features.cache_dir)
    top_k = {"top_k": recipe.features.top_k} if recipe.features.top_k else {}  # older keys unchanged
    key = json.dumps({"format_version": CACHE_VERSION, "target": target_identity(target),
                      "layers": target.layer_ids, "dtype": recipe.features.dtype,
                      "max_length": recipe.data.max_length, **top_k,
                      "samples": [(s.id, s.fingerprint) for s in samples]}, sort_keys=True)
    return cache_root() / "features" / hashlib.sha256(key.encode()).hexdigest()[:16]


@contextlib.contextmanager
def _build_lock(path: Path):
    """An exclusive lock next to the cache dir, held while it is checked and built."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def feature_source(recipe: Recipe, target: TargetModel, data: TrainData, info: DistInfo,
                   tokenizer, cache_dir: str | None, progress: bool) -> FeatureSource:
    """Online features, or a cache that rank 0 builds (or resumes, or reuses) first."""
    policy = FeaturePolicy(batching=recipe.features.batching,
                           max_batch_tokens=recipe.features.max_batch_tokens)
    top_k = recipe.features.top_k
    check_top_k(top_k, target.config.vocab_size, "features.top_k")
    if recipe.features.mode == "online" and not cache_dir:
        if top_k:
            raise InputError("features.top_k stores p_t in a feature cache: it needs features.mode: cache "
                             "(or --cache); online features compute the exact p_t every step")
        return FeatureSource(target, None, policy)
    samples = data.train + data.heldout  # a list, or a SampleStore's ConcatSamples (data.stream)
    path = Path(cache_dir) if cache_dir else _cache_dir(recipe, target, samples)
    if info.is_main:
        with _build_lock(path):  # two runs sharing one cache (dspark + dflash) build it once
            manifest = path / "manifest.json"
            if not (manifest.is_file() and json.loads(manifest.read_text()).get("complete")):
                log.info("building the feature cache in %s", path)
                build_cache(target, samples, path, dtype=recipe.features.dtype, policy=policy,
                            max_length=recipe.data.max_length, tokenizer=tokenizer, progress=progress,
                            top_k=top_k)
    barrier()
    cache = FeatureCache.open(path, expect_target=target, expect_layer_ids=target.layer_ids)
    cache.check_samples(samples, recipe.data.max_length)  # a stale cache is refused
    if top_k and cache.top_k != top_k:
        have = f"top-k {cache.top_k}" if cache.top_k else "no top-k p_t"
        raise FeatureCacheError(f"{path}: the cache holds {have}; features.top_k is {top_k}: rebuild it "
                                "with that top_k (another --cache, or none to build one)")
    return FeatureSource(target, cache, policy)


def _prepare(recipe: Recipe, data_path: str, tokenizer, info: DistInfo, store: Path | None,
             replace_store: bool) -> TrainData:
    """The run's data; with data.stream rank 0 writes the sample store while the other ranks
    wait, then they open it (an error on rank 0 still reaches the barrier, then is raised)."""
    if not recipe.data.stream:
        return prepare_data(data_path, tokenizer, recipe.data)
    if not info.is_main:
        barrier()
        return prepare_data(data_path, tokenizer, recipe.data, store, write_store=False)
    try:
        return prepare_data(data_path, tokenizer, recipe.data, store, replace_store=replace_store)
    finally:
        barrier()


@dataclass
class Setup:
    target: TargetModel
    tokenizer: object
    data: TrainData
    model: nn.Module
    features: FeatureSource
    target_dtype: ComputeDtype  # what the target computes features and p_t in
    precision: ComputeDtype  # the draft's autocast dtype (fp32 master weights either way)


def build_setup(recipe: Recipe, data_path: str, info: DistInfo, cache_dir: str | None = None,
                init_from: str | None = None, progress: bool = True, check_data=None,
                store: Path | None = None, replace_store: bool = False) -> Setup:
    """Target, data, draft and feature source; `check_data(TrainData)` runs once the data is
    rendered, before the draft is built or a feature cache is touched. `store`: where
    `data.stream` writes the training samples (rank 0 writes, the other ranks then open it;
    `replace_store`: a store of other inputs is rewritten, as when a run starts over)."""
    dtype = resolve_dtype(recipe.features.target_dtype, info.device)
    hf, source = load_target_model(recipe.target, dtype.torch)
    tokenizer = load_tokenizer(source)
    data = _prepare(recipe, data_path, tokenizer, info, store, replace_store)
    if check_data is not None:
        check_data(data)
    model = build_model(recipe, hf, data, init_from)
    target = TargetModel(hf, list(model.config.target_layer_ids), source).to(info.device)
    features = feature_source(recipe, target, data, info, tokenizer, cache_dir, progress)
    return Setup(target, tokenizer, data, model.to(info.device), features, dtype,
                 resolve_dtype(recipe.train.precision, info.device))
