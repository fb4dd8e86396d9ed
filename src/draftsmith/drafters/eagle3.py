"""EAGLE-3: one fused-feature decoder layer chained token by token (models.eagle3).

Trained with the TTT unroll over every position (Σ_s 0.8^s·soft-CE, the objective's default),
decoded as a chain of `num_tokens`, exported in the SGLang, vLLM and speculators dialects, GGUF
and draftsmith's own dir.
"""

from draftsmith.drafters.base import DrafterSpec
from draftsmith.models.eagle3 import Eagle3Config
from draftsmith.decoding.proposers import Eagle3Proposer
from draftsmith.train.objectives import Eagle3Objective

SPEC = DrafterSpec(
    config=Eagle3Config,
    objective=Eagle3Objective,
    proposer=Eagle3Proposer,
    summary="one fused-feature decoder layer chained token by token (EAGLE-3)",
)
