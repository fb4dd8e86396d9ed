"""The drafter registry: name -> `DrafterSpec` (drafters/base.py), one module per drafter.

Adding a drafter: a module here with its `SPEC` and one entry below (its model and config in
`models/`; its objective, proposer and format adapters where they are reused or new). The
registry is the wiring layer (it may import every stage); the stages never import it.
"""

from __future__ import annotations

from torch import nn

from draftsmith.drafters import dflash, dspark, eagle3
from draftsmith.drafters.base import DrafterSpec
from draftsmith.train.objectives import BlockObjective, ObjectiveConfig, ObjectiveFactory, TargetHead
from draftsmith.utils.io import InputError

REGISTRY: dict[str, DrafterSpec] = {s.name: s for s in (dspark.SPEC, dflash.SPEC, eagle3.SPEC)}

__all__ = ["REGISTRY", "DrafterSpec", "build_objective", "get", "objective_for", "train"]


def get(name: str) -> DrafterSpec:
    """The spec of drafter `name`; InputError listing the known drafters otherwise."""
    if name not in REGISTRY:
        raise InputError(f"unknown drafter {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def objective_for(name: str) -> ObjectiveFactory:
    """The objective factory `train(..., objective=...)` takes, for drafter `name`."""
    return get(name).build_objective


def build_objective(model: nn.Module, target_head: TargetHead | None,
                    config: ObjectiveConfig | None = None) -> BlockObjective:
    """The objective of the model's drafter (`model.config.drafter`): a module that owns `model`."""
    return get(model.config.drafter).build_objective(model, target_head, config)


def train(recipe, data: str, out, **kwargs):
    """`train.loop.train` handed the recipe's drafter's objective (what the CLI wires)."""
    from draftsmith.train.loop import train as train_loop

    return train_loop(recipe, data, out, objective=objective_for(recipe.drafter), **kwargs)
