"""llama.cpp's --spec-draft-n-max in draftsmith's own engine: a DSpark/DFlash draft runs a block
of n_max slots (z-lab slots: n_max + 1, slot 0 dropped), not a full block cut after drafting.

Greedy output stays the target's own (float64), n_max = the draft's limit replays the full
block bit for bit, the shorter block's slot-0 logits differ from the full block's (the negative
control: a cut after drafting would leave them equal), no round drafts more than n_max, and an
n_max outside 1..limit is an InputError."""

import pytest
import torch
from test_decoding import NEW, PROMPTS, dflash_draft, dspark_draft, eagle3_draft, engine, hf_greedy, target

from draftsmith.decoding import DSparkProposer, NGramProposer, SamplingConfig, capped_tokens, proposer_for
from draftsmith.utils.io import InputError

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCK = 4  # dspark_draft's block size: 4 DeepSpec slots, 4 proposals


def confident_dspark(hf):
    """A DSpark draft (Markov head, block 4) with a non-trivial confidence head."""
    draft = dspark_draft(hf, seed=1)
    with torch.no_grad():
        draft.confidence_head.proj.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    return draft


def zlab_dflash(hf):
    return dflash_draft(hf, seed=3, slot_semantics="zlab", block_size=BLOCK + 1)  # 4 proposals


def drafted(out) -> list[int]:
    return [d for r in out.rounds for d in r.drafted]


def rounds_of(out) -> list[tuple]:
    return [(r.rows, r.drafted, r.proposed, r.accepted, r.committed, r.cut, r.confidence) for r in out.rounds]


@pytest.mark.parametrize("make", [confident_dspark, zlab_dflash], ids=["dspark", "dflash-zlab"])
@pytest.mark.parametrize("n_max", [1, 2, BLOCK])
def test_greedy_with_n_max_equals_target_greedy(make, n_max):
    hf = target()
    refs = hf_greedy(hf, PROMPTS)
    out = engine(hf, DSparkProposer(make(hf), n_max=n_max)).generate(PROMPTS, NEW)
    assert out.outputs == refs
    assert drafted(out) and all(d == n_max for d in drafted(out))  # never more than n_max
    assert all(p <= n_max for r in out.rounds for p in r.proposed)
    assert sum(a for r in out.rounds for a in r.accepted) > 0  # the accept path ran


def test_n_max_on_a_gemma_draft():
    hf = target("gemma")
    refs = hf_greedy(hf, PROMPTS)
    out = engine(hf, DSparkProposer(dspark_draft(hf, seed=1), n_max=2)).generate(PROMPTS, NEW)
    assert out.outputs == refs and all(d == 2 for d in drafted(out))


@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(temperature=0.8)], ids=["greedy", "T0.8"])
@pytest.mark.parametrize("make", [confident_dspark, zlab_dflash], ids=["dspark", "dflash-zlab"])
def test_n_max_at_the_limit_replays_the_full_block(make, sampling):
    hf = target()
    draft = make(hf)
    full = engine(hf, DSparkProposer(draft), sampling=sampling).generate(PROMPTS, NEW, seed=5)
    same = engine(hf, DSparkProposer(draft, n_max=BLOCK), sampling=sampling).generate(PROMPTS, NEW, seed=5)
    assert same.outputs == full.outputs and rounds_of(same) == rounds_of(full)
    assert all(d == BLOCK for d in drafted(full))


def slot0_gaps(draft, hf, n_max) -> list[float]:
    """Per round: max |slot-0 logits of the n_max block - those of the full block| (same cache)."""
    gaps, run_block = [], draft.propose

    def spy(cache, anchor_token, anchor_pos, sampler=None, num_slots=None):
        short = run_block(cache, anchor_token, anchor_pos, sampler, num_slots)
        full = run_block(cache, anchor_token, anchor_pos, None)
        assert short.logits.shape[1] == (num_slots or BLOCK) and full.logits.shape[1] == BLOCK
        gaps.append(float((short.logits[:, 0] - full.logits[:, 0]).abs().max()))
        return short

    draft.propose = spy
    out = engine(hf, DSparkProposer(draft, n_max=n_max)).generate(PROMPTS, NEW)
    assert out.outputs == hf_greedy(hf, PROMPTS)  # the spy's extra block changed nothing
    return gaps


def test_a_shorter_block_changes_slot_0_not_a_cut_after_drafting():
    hf = target()
    assert max(slot0_gaps(confident_dspark(hf), hf, 2)) > 1e-6  # bidirectional: a new function
    assert max(slot0_gaps(confident_dspark(hf), hf, BLOCK)) == 0.0  # the same block: identical


def test_model_propose_runs_num_slots():
    hf = target()
    draft = confident_dspark(hf)
    cache = draft.new_cache()
    draft.append_context(cache, torch.randn(2, 5, draft.fc.in_features, dtype=torch.float64,
                                            generator=torch.Generator().manual_seed(0)))
    anchor = torch.tensor([3, 7])
    for n in (1, 3, BLOCK, None):
        prop = draft.propose(cache, anchor, 5, num_slots=n)
        k = n or BLOCK
        assert prop.tokens.shape == (2, k) and prop.logits.shape[:2] == (2, k)
        assert prop.hidden.shape[:2] == (2, k) and prop.confidence_logits.shape == (2, k)
    for bad in (0, BLOCK + 1):
        with pytest.raises(ValueError, match=f"num_slots {bad} must lie in 1..{BLOCK}"):
            draft.propose(cache, anchor, 5, num_slots=bad)


def test_n_max_caps_eagle3_and_ngram():
    hf = target()
    refs = hf_greedy(hf, PROMPTS)
    eagle3 = proposer_for(eagle3_draft(hf), 4, n_max=2)
    assert eagle3.num_tokens == 2 and proposer_for(eagle3_draft(hf), 4, n_max=9).num_tokens == 4
    out = engine(hf, eagle3).generate(PROMPTS, NEW)
    assert out.outputs == refs and drafted(out) and max(drafted(out)) <= 2
    out = engine(hf, NGramProposer(num_tokens=capped_tokens(4, 1))).generate(PROMPTS, NEW)
    assert out.outputs == refs and max(drafted(out)) <= 1
    assert capped_tokens(4, None) == 4


def test_n_max_outside_the_limit_is_an_input_error():
    hf = target()
    dspark, zlab = confident_dspark(hf), zlab_dflash(hf)
    for make, n_max, limit in [(lambda n: DSparkProposer(dspark, n_max=n), BLOCK + 1, BLOCK),
                               (lambda n: DSparkProposer(zlab, n_max=n), BLOCK + 1, BLOCK),
                               (lambda n: proposer_for(dspark, 7, n_max=n), 9, BLOCK)]:
        with pytest.raises(InputError, match=fr"^n_max {n_max} must lie in 1\.\.{limit} \("):
            make(n_max)
        with pytest.raises(InputError, match=fr"^n_max 0 must lie in 1\.\.{limit}"):
            make(0)
    with pytest.raises(InputError, match="z-lab slots"):
        DSparkProposer(zlab, n_max=BLOCK + 1)
    with pytest.raises(InputError, match=r"^n_max 0 must be >= 1$"):
        proposer_for(eagle3_draft(hf), 4, n_max=0)
    assert DSparkProposer(dspark).num_slots is None and DSparkProposer(zlab, n_max=2).num_slots == 3
