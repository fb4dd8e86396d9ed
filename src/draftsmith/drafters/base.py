"""The drafter contract: everything draftsmith needs to train, decode and export one drafter.

A `DrafterSpec` bundles, for one drafter kind:

- `config`: its typed config class (`models.base.DraftConfig`), which builds the model
  (`config.build()`), writes its engine-facing config.json keys and reads them back;
- `objective`: its training hooks (a `train.objectives.BlockObjective` subclass), with
  `loss_weights` (None: the objective's own default) and `anchored` (the batches carry drawn
  anchors, or the objective supervises every position itself);
- `proposer`: its decoding hooks (a `decoding.proposers.Proposer` subclass, built with `for_draft`);
- `formats`: the export format adapters that take its config class (`export.formats_for`).

The stages never import this package: the CLI (and quickstart, tests, benches) looks a spec up
and hands each stage the piece it needs (`train(..., objective=spec.build_objective)`); the
stages below reach the rest through the classes themselves (the config class registry in
`models.base`, `Proposer.drives`, the adapters' `takes`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from draftsmith.models.base import DraftConfig
from draftsmith.decoding.proposers import Proposer
from draftsmith.train.objectives import BlockObjective, LossWeights, ObjectiveConfig, TargetHead


@dataclass(frozen=True)
class DrafterSpec:
    config: type[DraftConfig]
    objective: type[BlockObjective]
    proposer: type[Proposer]
    summary: str  # one line: what the drafter is
    loss_weights: LossWeights | None = None  # None: the objective's default_loss_weights

    @property
    def name(self) -> str:
        return self.config.drafter

    @property
    def anchored(self) -> bool:
        """Whether training batches carry drawn anchors (else every position is supervised)."""
        return self.objective.anchored

    @property
    def default_loss_weights(self) -> LossWeights:
        return self.loss_weights or self.objective.default_loss_weights

    def build(self, config: DraftConfig) -> nn.Module:
        return config.build()

    def build_objective(self, model: nn.Module, target_head: TargetHead | None,
                        config: ObjectiveConfig | None = None) -> BlockObjective:
        """This drafter's objective (an `nn.Module` owning `model`): the train loop's factory."""
        return self.objective(model, target_head, config, self.loss_weights)

    def make_proposer(self, model: nn.Module, num_tokens: int = 7, n_max: int | None = None) -> Proposer:
        return self.proposer.for_draft(model, num_tokens, n_max)

    @property
    def formats(self) -> dict:
        """--format -> export adapter, for every format this drafter exports as."""
        from draftsmith.export import formats_for

        return formats_for(self.config)
