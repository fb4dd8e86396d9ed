"""DFlash: the DSpark backbone without Markov and confidence heads (DeepSpec's definition).

Not a separate model: `DFlashConfig` is a `DSparkConfig` preset (markov_rank 0, no confidence
head) and `build_dflash` returns the same `DSparkModel` classes. Trained with CE only.

`slot_semantics` records which block layout a DFlash draft computes:
- "deepspec" (default): slot 0 is the anchor and slot k predicts position anchor + k + 1
  (what llama.cpp's `draft-dspark` serves);
- "zlab": z-lab's original DFlash (block 16 by default), mask slot k predicts position
  anchor + k. The network is the same; only the labels (and the export layout) differ.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from draftsmith.models.dspark import DSparkConfig, DSparkModel, build_dspark

ZLAB_BLOCK_SIZE = 16


class DFlashConfig(DSparkConfig):
    """DSpark config preset without heads, plus the slot-semantics flag."""

    drafter: ClassVar[str] = "dflash"

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
        """As `DSparkConfig.from_target`; z-lab slots default to z-lab's block size 16."""
        if overrides.get("slot_semantics") == "zlab":
            overrides.setdefault("block_size", ZLAB_BLOCK_SIZE)
        return super().from_target(target_config, **overrides)

    @property
    def label_offset(self) -> int:
        """Slot k predicts input position anchor + k + label_offset."""
        return 0 if self.slot_semantics == "zlab" else 1


def build_dflash(config: DFlashConfig) -> DSparkModel:
    """The DSpark backbone for this config (Gemma subclass for Gemma targets)."""
    return build_dspark(config)
