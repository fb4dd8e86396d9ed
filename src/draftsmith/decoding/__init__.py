"""Lossless speculative decoding: one propose -> verify -> commit loop (`engine`), the sampling
transforms and acceptance rules (`sampling`), KV caches for ragged batches (`kv`), the proposers
each algorithm plugs in (`proposers`) and truncation rules (`truncate`)."""

from draftsmith.decoding.engine import (
    DecodeRun,
    Generation,
    RoundRecord,
    SpecEngine,
    oracle_for,
    summarize,
)
from draftsmith.decoding.proposers import (
    DecodeState,
    DSparkProposer,
    Eagle3Proposer,
    NGramProposer,
    OracleProposer,
    PlainProposer,
    Proposal,
    Proposer,
    capped_tokens,
    proposer_for,
)
from draftsmith.decoding.sampling import SamplingConfig
from draftsmith.decoding.truncate import FixedLength, KeepAll, PMinRule, PrefixScheduler, SurvivalRule

__all__ = [
    "DecodeRun", "DecodeState", "DSparkProposer", "Eagle3Proposer", "FixedLength", "Generation",
    "KeepAll", "NGramProposer", "OracleProposer", "PMinRule", "PlainProposer", "PrefixScheduler",
    "Proposal", "Proposer", "RoundRecord", "SamplingConfig", "SpecEngine", "SurvivalRule",
    "capped_tokens", "oracle_for", "proposer_for", "summarize",
]
