"""DFlash: DSpark's backbone without heads (models.dflash), trained with CE only.

Same objective, proposer and export formats as DSpark; a z-lab-slot DFlash (imported from
z-lab's releases) decodes one slot fewer, exports in z-lab's layout and is not trained.
"""

from draftsmith.drafters.base import DrafterSpec
from draftsmith.models.dflash import DFlashConfig
from draftsmith.decoding.proposers import DSparkProposer
from draftsmith.train.objectives import DSparkObjective, LossWeights

SPEC = DrafterSpec(
    config=DFlashConfig,
    objective=DSparkObjective,
    proposer=DSparkProposer,
    summary="DSpark's block drafter without heads (DeepSpec's DFlash; z-lab's slots imported)",
    loss_weights=LossWeights(ce=1.0),
)
