"""DSpark: a parallel block drafter with a Markov head and a confidence head (models.dspark).

Trained on drawn anchors with 0.1·CE + 0.9·L1 + 1.0·BCE (the objective's default), decoded one
γ-slot block per round, exported as DeepSpec's layout (deepspec, sglang, vllm), GGUF and
draftsmith's own dir.
"""

from draftsmith.drafters.base import DrafterSpec
from draftsmith.models.dspark import DSparkConfig
from draftsmith.decoding.proposers import DSparkProposer
from draftsmith.train.objectives import DSparkObjective

SPEC = DrafterSpec(
    config=DSparkConfig,
    objective=DSparkObjective,
    proposer=DSparkProposer,
    summary="parallel block drafter with a Markov head and a confidence head (DeepSpec)",
)
