"""DFlash: the DSpark backbone without Markov and confidence heads (DeepSpec's definition).

Not a separate model: `DFlashConfig` is a `DSparkConfig` preset (markov_rank 0, no confidence
head) and builds the same `DSparkModel` classes. Trained with CE only.

`slot_semantics` records which block layout a DFlash draft computes (`SLOT_SEMANTICS`); what
the rest of draftsmith reads is the resulting `label_offset` / `deepspec_slots`:
- "deepspec" (default): slot 0 is the anchor and slot k predicts position anchor + k + 1
  (what llama.cpp's `draft-dspark` serves);
- "zlab": z-lab's original DFlash (block 16 by default), mask slot k predicts position
  anchor + k. The network is the same; only the labels, the export layout (z-lab's
  `DFlashDraftModel` config) and llama.cpp's serving mode (`draft-dflash`) differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from draftsmith.models.dspark import DEEPSPEC_LABEL_OFFSET, DSparkConfig, DSparkModel, build_dspark

ZLAB_ARCHITECTURE = "DFlashDraftModel"


@dataclass(frozen=True)
class SlotLayout:
    label_offset: int  # slot k predicts input position anchor + k + label_offset
    default_block_size: int | None = None  # None: DSpark's default


SLOT_SEMANTICS = {"deepspec": SlotLayout(DEEPSPEC_LABEL_OFFSET), "zlab": SlotLayout(0, 16)}


class DFlashConfig(DSparkConfig):
    """DSpark config preset without heads, plus the slot-semantics flag."""

    drafter: ClassVar[str] = "dflash"
    has_heads: ClassVar[bool] = False

    markov_rank: int = Field(0, ge=0)
    enable_confidence_head: bool = False
    confidence_head_with_markov: bool = False
    slot_semantics: Literal["deepspec", "zlab"] = "deepspec"

    @model_validator(mode="after")
    def _no_heads(self):
        if self.markov_rank != 0:
            raise ValueError("markov_rank: DFlash has no Markov head (use the dspark drafter)")
        if self.enable_confidence_head:
            raise ValueError("enable_confidence_head: DFlash has no confidence head "
                             "(use the dspark drafter)")
        return self

    @classmethod
    def from_target(cls, target_config, **overrides):
        """As `DSparkConfig.from_target`; a slot layout's own block size is the default (z-lab: 16)."""
        layout = SLOT_SEMANTICS.get(overrides.get("slot_semantics"))
        if layout is not None and layout.default_block_size is not None:
            overrides.setdefault("block_size", layout.default_block_size)
        return super().from_target(target_config, **overrides)

    @property
    def label_offset(self) -> int:
        return SLOT_SEMANTICS[self.slot_semantics].label_offset

    def engine_config(self) -> dict:
        """DeepSpec's keys; a block with other slots than DeepSpec's computes another function,
        so it is never labelled as DeepSpec's: z-lab's architecture and nested keys instead."""
        out = super().engine_config()
        if not self.deepspec_slots:
            out["architectures"] = [ZLAB_ARCHITECTURE]
            out["dflash_config"] = {"mask_token_id": self.mask_token_id,
                                    "target_layer_ids": list(self.target_layer_ids)}
        return out


def build_dflash(config: DFlashConfig) -> DSparkModel:
    """The DSpark backbone for this config (Gemma subclass for Gemma targets)."""
    return build_dspark(config)
