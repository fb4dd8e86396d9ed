"""A training recipe: which drafter, on which target, with which data, features and schedule.

Recipes are YAML (shipped under `draftsmith/recipes/<target>/<drafter>.yaml`; `--recipe` also
takes a path), validated into `Recipe`; `--set a.b=value` overrides any key. The `model` section
holds the drafter's own config fields (DSparkConfig / DFlashConfig / Eagle3Config); everything
about the target's geometry is derived from the target, never written in a recipe.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from draftsmith.config import StrictConfig, load_config
from draftsmith.data.conversations import DEFAULT_MAX_RECORD_CHARS
from draftsmith.models.base import config_class, drafter_configs
from draftsmith.train.objectives import LossWeights
from draftsmith.utils.io import InputError


class MixSource(StrictConfig):
    """One more conversations JSONL trained beside `--data` (e.g. raw ShareGPT conversations,
    whose labels a distillation loss takes from the target's p_t)."""

    path: str
    # this source's share of the training records, in [0, 1] (None: all of its records), first in
    # file order: with --data's n records and shares r_i, source i gives r_i / (1 - Σ r) · n
    ratio: float | None = Field(None, ge=0, le=1)


class DataConfig(StrictConfig):
    max_length: int = Field(2048, ge=8)  # tokens per rendered conversation (longer: truncated)
    heldout_fraction: float = Field(0.02, ge=0, lt=1)  # by id hash, when no heldout file is given
    heldout: str | None = None  # a conversations JSONL used as the held-out split instead
    max_heldout: int = Field(64, ge=1)  # held-out sequences evaluated at each eval
    limit: int | None = Field(None, ge=1)  # use only the first N training records
    # records longer than this many characters are skipped (counted and named), never tokenized
    max_record_chars: int = Field(DEFAULT_MAX_RECORD_CHARS, ge=1)
    template_kwargs: dict[str, Any] = {}  # e.g. {enable_thinking: false}
    # a rendered record longer than max_length: "truncate" keeps its first max_length tokens,
    # "windows" trains on every max_length window of it (each window read from its own start)
    long_records: Literal["truncate", "windows"] = "truncate"
    # more sources; held-out conversations (by conversation id) are excluded from every source
    mix: list[MixSource] = []
    # render the training records once, one at a time, into a memory-mapped sample store in the
    # run dir (RUN/samples, train/samples.py) and read a sample when a batch needs it: a corpus of
    # any size with its tokens on disk (per sample only an id and an offset stay in memory; the
    # held-out split stays in memory: it is small)
    stream: bool = False


class FeaturesConfig(StrictConfig):
    mode: Literal["online", "cache"] = "online"
    # default when mode == cache: $DRAFTSMITH_CACHE/features/<key>, the key hashing the target,
    # tapped layers, storage dtype, max_length and the records' content (train/setup.py)
    cache_dir: str | None = None
    dtype: Literal["fp32", "bf16", "fp16", "fp8-e4m3"] = "bf16"
    # auto: one unpadded sequence per target forward on CPU (bitwise reproducible), padded
    # length-bucketed batches on GPU; padded is ~2x faster on CPU too, equal up to float rounding
    batching: Literal["auto", "unpadded", "padded"] = "auto"
    max_batch_tokens: int = Field(4096, ge=64)
    # dtype the target runs in (features and p_t); auto: bf16 where the hardware runs it natively
    # (CUDA with bf16, a CPU with AMX or AVX512-BF16), else fp32 (utils/dtypes.py). SmolLM2 on 2
    # cores (issue 13's numbers): AMX bf16 ~3500 tok/s; AVX2-only fp32 587, emulated bf16 80 tok/s.
    target_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    # cache mode: also store the target's top-k next-token probabilities at every supervised
    # position, and train from them instead of recomputing the full-vocabulary head each epoch
    # (the mass outside the top k counts as outside the draft vocabulary; train/objectives.py).
    # Held-out eval/tau_sim always uses the exact full-vocabulary p_t. None: exact p_t throughout
    top_k: int | None = Field(None, ge=1)


class OptimConfig(StrictConfig):
    lr: float = Field(6e-4, gt=0)
    warmup_ratio: float = Field(0.04, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, gt=0)
    # parameter-name patterns (fnmatch, e.g. "layers.*.mlp.*") the optimizer never updates, on top
    # of what the drafter freezes itself (embedding, DSpark/DFlash LM head); each must match
    freeze: list[str] = []
    # parameter-name pattern (fnmatch) -> multiplier of lr for the parameters it matches (each
    # must match a trained parameter, no two the same one), e.g. {"layers.*": 0.1} for a backbone
    # copied from the target
    lr_scale: dict[str, float] = {}

    @field_validator("lr_scale")
    @classmethod
    def _positive_scales(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: x for k, x in v.items() if not x > 0}
        if bad:
            raise ValueError(f"optim.lr_scale: multipliers must be > 0, got {bad}")
        return v


class TrainConfig(StrictConfig):
    seed: int = 0
    epochs: int = Field(10, ge=1)
    max_steps: int | None = Field(None, ge=1)  # optimizer steps; caps epochs
    global_batch: int = Field(512, ge=1)  # sequences per optimizer step, over all ranks
    micro_batch: int = Field(4, ge=1)  # sequences per forward on one rank
    loss_chunk: int = Field(64, ge=1)  # anchors per logits chunk (memory bound)
    recompute: bool = True  # recompute each chunk's logits in backward (less memory, ~1.5x the time)
    checkpoint_every: int = Field(500, ge=1)  # optimizer steps; the last step always saves
    eval_every: int = Field(100, ge=1)
    log_every: int = Field(1, ge=1)
    # steps between train/tau_sim and c* metrics when no loss term needs p_t (DFlash): p_t costs
    # a full-vocabulary LM-head pass per supervised slot, ~40% of a step on CPU
    target_metrics_every: int = Field(10, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # autocast; auto: as features.target_dtype
    parallel: Literal["ddp", "fsdp2"] = "ddp"
    threads: int | None = Field(None, ge=1)  # torch CPU threads per process
    # make the next step's batches on a background thread; None (auto): on GPUs only (on a CPU
    # the thread takes cores from the step itself)
    prefetch: bool | None = None
    time_budget_min: float | None = Field(None, gt=0)  # stop (and checkpoint) after this long


class InitConfig(StrictConfig):
    # Scale of the draft's final RMSNorm at init. The LM head is a frozen copy of the target's;
    # with tied embeddings (SmolLM2) a unit-RMS hidden that still carries its input token's
    # embedding gives that token a logit near 80 and a saturated softmax that starves the L1
    # term of gradient. A small scale starts the draft unsaturated; the norm is trained.
    # "target": the target's own final-norm scale (its logit scale from the first step; context_leak's
    # measurement in the note of issue 14: the final norm sets the draft's logit temperature, and
    # from 0.1 or 1 Adam needs hundreds of steps to reach SmolLM2's ~1.8)
    final_norm: float | Literal["target"] = 1.0

    @field_validator("final_norm")
    @classmethod
    def _positive(cls, v):
        if v != "target" and not v > 0:
            raise ValueError(f"final_norm must be > 0 or 'target' (got {v})")
        return v
    # DSpark's vanilla Markov head: "random" (N(0, initializer_range)) or "bigram" (the rank-r
    # factorization of the training labels' smoothed log-bigram table; train/init.py)
    markov: Literal["random", "bigram"] = "random"
    bigram_smoothing: float = Field(1.0, gt=0)  # α of the additive smoothing towards the unigram
    # DSpark / DFlash backbone: "random" or "target" (copies of the target's last layers, fc reading
    # the output of the layer before them; train/init.py). Needs that layer in target_layer_ids.
    layers: Literal["random", "target"] = "random"


class LossConfig(StrictConfig):
    # α per term (train/objectives.py: ce, l1, bce, soft_ce, kl, ce_argmax); terms not named are
    # 0. None: the drafter's own default (DSpark 0.1 ce + 0.9 l1 + 1.0 bce, DFlash ce, Eagle3
    # soft_ce). kl / ce_argmax distill from the target's p_t instead of the text's next token.
    weights: LossWeights | None = None
    # "token": every supervised slot weighs the same; "sequence": each sequence's slots share one
    # unit (DeepSpec's Eagle3: token averaging lets long, here looping, answers dominate)
    average: Literal["token", "sequence"] = "token"


class Recipe(StrictConfig):
    drafter: str  # a registered drafter kind (draftsmith.drafters.REGISTRY)
    target: str = "smollm2-135m"
    model: dict[str, Any] = {}  # the drafter config's own fields
    init: InitConfig = InitConfig()
    data: DataConfig = DataConfig()
    features: FeaturesConfig = FeaturesConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    loss: LossConfig = LossConfig()
    notes: str = ""

    @field_validator("drafter")
    @classmethod
    def _known_drafter(cls, name: str) -> str:
        if name not in drafter_configs():
            raise ValueError(f"unknown drafter {name!r}; known: {', '.join(drafter_configs())}")
        return name

    def model_config_class(self):
        return config_class(self.drafter)


def shipped_recipes() -> list[str]:
    root = resources.files("draftsmith") / "recipes"
    names = []
    for target_dir in root.iterdir():
        if target_dir.is_dir():
            names += [f"{target_dir.name}/{f.name[:-5]}" for f in target_dir.iterdir() if f.name.endswith(".yaml")]
    return sorted(names)


def recipe_path(name: str) -> Path:
    """A shipped recipe name (`smollm2-135m/dspark`) or a path to a YAML file."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise InputError(f"recipe file {name!r} not found")
        return path
    shipped = resources.files("draftsmith") / "recipes" / f"{name}.yaml"
    if not shipped.is_file():
        raise InputError(f"unknown recipe {name!r}; shipped recipes: {', '.join(shipped_recipes())}")
    return Path(str(shipped))


def load_recipe(name: str, overrides: list[str] = ()) -> Recipe:
    path = recipe_path(name)
    recipe = load_config(Recipe, path, overrides)
    fields = recipe.model_config_class().model_fields
    unknown = sorted(set(recipe.model) - set(fields))
    if unknown:
        raise InputError(f"{path}: unknown key(s) model.{', model.'.join(unknown)} for drafter "
                         f"{recipe.drafter}; valid keys: {', '.join(sorted(fields))}")
    return recipe

