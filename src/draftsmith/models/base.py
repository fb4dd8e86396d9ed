"""The model-level half of the drafter registry: one typed config class per drafter kind.

A draft config subclasses `DraftConfig` and names its kind in the `drafter` ClassVar; defining
the class registers it, so `config_class(kind)` (what config.json's `draftsmith.kind` and a
recipe's `drafter:` resolve through) needs no list of drafters. Each config class owns what
differs between drafters at this layer:

- `build()`: a freshly initialized model of this config;
- `engine_config()`: the engine-facing keys of its config.json (DeepSpec's for DSpark / DFlash,
  SGLang's EAGLE-3 dialect for EAGLE-3); `models.io` adds draftsmith's own sub-dict;
- `engine_architectures` / `claims_engine_config(data)` / `from_engine_config(data)`: which
  config.json without draftsmith's sub-dict is one of its kind, and the typed config it holds;
- `default_layer_ids(num_target_layers)`: the target layers it reads when a recipe names none.

The stage-level halves (training objective, proposer, export formats) and the registry that
bundles them with these classes are `draftsmith.drafters`; this layer cannot import them.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import model_validator
from torch import nn

from draftsmith.models.layers import DraftGeometry
from draftsmith.utils.io import InputError

CONFIGS: dict[str, type[DraftConfig]] = {}  # drafter kind -> config class, filled by subclassing


class DraftConfig(DraftGeometry):
    """Base of every drafter's config (subclasses define `target_layer_ids` and
    `draft_vocab_size` fields and the hooks below)."""

    drafter: ClassVar[str] = ""
    engine_architectures: ClassVar[tuple[str, ...]] = ()  # what `from_engine_config` reads

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs):
        super().__pydantic_init_subclass__(**kwargs)
        if "drafter" in cls.__dict__:
            CONFIGS[cls.drafter] = cls

    @classmethod
    def default_layer_ids(cls, num_target_layers: int) -> list[int]:
        raise NotImplementedError

    @model_validator(mode="before")
    @classmethod
    def _default_layer_ids(cls, data):
        if isinstance(data, dict) and data.get("target_layer_ids") is None and "num_target_layers" in data:
            data = {**data, "target_layer_ids": cls.default_layer_ids(int(data["num_target_layers"]))}
        return data

    def _check_draft_vocab(self) -> None:
        if self.draft_vocab_size is not None and self.draft_vocab_size > self.vocab_size:
            raise ValueError(f"draft_vocab_size {self.draft_vocab_size} exceeds the target "
                             f"vocabulary (vocab_size {self.vocab_size})")

    @property
    def draft_vocab(self) -> int:
        return self.draft_vocab_size or self.vocab_size

    @property
    def pruned(self) -> bool:
        return self.draft_vocab != self.vocab_size

    # -- drafter hooks

    def build(self) -> nn.Module:
        """A freshly initialized draft model of this config."""
        raise NotImplementedError

    def engine_config(self) -> dict:
        """The engine-facing keys of this draft's config.json."""
        raise NotImplementedError

    @classmethod
    def claims_engine_config(cls, data: dict) -> bool:
        """Whether `data`, a config.json without draftsmith's sub-dict, is a draft of this kind."""
        return bool(set(data.get("architectures") or []) & set(cls.engine_architectures))

    @classmethod
    def from_engine_config(cls, data: dict, where: str) -> DraftConfig:
        """The typed config of a config.json this class claims."""
        raise NotImplementedError

    def geometry_json(self) -> dict:
        """The HF config keys of the draft layers' geometry (shared by every engine config)."""
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_fraction < 1.0:
            rope = {"rope_type": "proportional", "rope_theta": self.rope_theta,
                    "partial_rotary_factor": self.rope_fraction}
        return {
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": self.hidden_act,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "tie_word_embeddings": False,
        }


def drafter_configs() -> dict[str, type[DraftConfig]]:
    """Every registered drafter kind -> its config class (the built-in model modules loaded)."""
    from draftsmith.models import dflash, dspark, eagle3  # noqa: F401  (each one registers)

    return dict(sorted(CONFIGS.items()))


def config_class(kind: str, where: str = "") -> type[DraftConfig]:
    """The config class of drafter `kind`; InputError listing the known kinds otherwise."""
    configs = drafter_configs()
    if kind not in configs:
        raise InputError(f"{where}unknown drafter kind {kind!r}; known: {', '.join(configs)}")
    return configs[kind]


def engine_config_class(data: dict, where: str) -> type[DraftConfig]:
    """The config class that claims a config.json without draftsmith's sub-dict."""
    configs = drafter_configs().values()
    claims = [c for c in configs if c.claims_engine_config(data)]
    if not claims:
        known = sorted({a for c in configs for a in c.engine_architectures})
        archs = sorted(data.get("architectures") or [])
        raise InputError(f"{where}: unknown drafter kind: no 'draftsmith.kind' and architectures "
                         f"{archs} are none of {known}")
    return claims[0]
