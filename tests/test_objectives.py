"""Training objectives: anchors, position weights, global normalization, chunking, pruning, τ_sim,
and the acceptance test that each drafter overfits a few target-generated sequences."""

import math
from dataclasses import fields, replace

import pytest
import torch
from tiny_targets import tiny_target

from draftsmith.models.dflash import DFlashConfig, build_dflash
from draftsmith.models.dspark import DSparkConfig, build_dspark
from draftsmith.models.eagle3 import Eagle3Config, Eagle3Model
from draftsmith.models.vocab import scatter_draft_logits
from draftsmith.drafters import build_objective
from draftsmith.targets.model import TargetModel
from draftsmith.train.anchors import (
    all_anchors,
    anchor_candidates,
    batch_anchors,
    sample_anchors,
    slot_validity,
)
from draftsmith.train.objectives import (
    DSparkObjective,
    Eagle3Objective,
    LossWeights,
    ObjectiveConfig,
    TauSimMeter,
    TrainBatch,
    position_weights,
    reduce_denominators,
    target_head_from,
)
from draftsmith.utils.io import InputError

LAYERS = [0, 1, 2]  # tiny targets have 4 layers


# --------------------------------------------------------------------------- helpers


def perturb(model, std=0.3, seed=1):
    """Non-trivial trainable weights (the N(0, 0.02) init is too close to zero to test with)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=g, dtype=p.dtype) * std
                p.copy_(1 + noise if p.ndim == 1 and p.shape[0] in (32, 8) else noise)
    return model


def dspark_model(target, kept_ids=None, **kw):
    kw = {"mask_token_id": 5, "num_hidden_layers": 1, "markov_rank": 8, "target_layer_ids": LAYERS,
          "block_size": 3, **kw}
    return build_dspark(DSparkConfig.from_target(target.config, **kw)).init_from_target(target, kept_ids)


def eagle3_model(target, kept_ids=None, **kw):
    kw = {"target_layer_ids": LAYERS, "ttt_length": 3, **kw}
    return Eagle3Model(Eagle3Config.from_target(target.config, **kw)).init_from_target(target, kept_ids)


def make_batch(target, ids, loss_mask, anchors=None):
    out = TargetModel(target, LAYERS)(ids)
    pos, valid = anchors if anchors is not None else (None, None)
    return TrainBatch(ids, loss_mask, out.features, out.hidden, pos, valid)


def sub_batch(batch, rows):
    pick = lambda t: None if t is None else t[rows]  # noqa: E731
    return TrainBatch(*(pick(getattr(batch, f.name)) for f in fields(TrainBatch)))


def full_blocks_only(objective):
    """The objective restricted to fully supervised blocks (for exact τ = γ + 1 checks)."""
    blocks_of = objective.blocks

    def blocks(batch):
        b = blocks_of(batch)
        keep = b.valid.all(-1)  # [M]
        return replace(b, **{f.name: getattr(b, f.name)[keep] for f in fields(b)})

    objective.blocks = blocks
    return objective


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def target64():
    return tiny_target("qwen3", seed=0).double()


@pytest.fixture(scope="module")
def data64(target64):
    """4 sequences of 16 tokens, prompts of different lengths, response masks, one padded row."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(6, 96, (4, 16), generator=g)
    mask = torch.zeros(4, 16, dtype=torch.uint8)
    for b, (lo, hi) in enumerate([(3, 16), (5, 14), (2, 16), (8, 12)]):
        mask[b, lo:hi] = 1
    mask[1, 9] = 0  # a hole inside a response: blocks crossing it stop there
    anchors = batch_anchors(mask, ["a", "b", "c", "d"], num_anchors=5, seed=0, epoch=0)
    return make_batch(target64, ids, mask, anchors)


# --------------------------------------------------------------------------- anchors


def test_anchor_draws_do_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(0)
    masks = [(torch.rand(n, generator=g) < 0.8).to(torch.uint8) for n in (40, 25, 60)]
    ids = ["x", "y", "z"]
    alone = [sample_anchors(m, 8, seed=7, epoch=2, sample_id=i) for m, i in zip(masks, ids)]
    padded = torch.zeros(3, 60, dtype=torch.uint8)
    for b, m in enumerate(masks):
        padded[b, : len(m)] = m
    pos, valid = batch_anchors(padded, ids, 8, seed=7, epoch=2)
    for b in range(3):
        assert pos[b][valid[b]].tolist() == alone[b].tolist()
    pos2, valid2 = batch_anchors([masks[2], masks[0]], ["z", "x"], 8, seed=7, epoch=2, pad_to=12)
    assert pos2.shape == (2, 12)
    assert pos2[0][valid2[0]].tolist() == alone[2].tolist()
    assert pos2[1][valid2[1]].tolist() == alone[0].tolist()
    for m, a in zip(masks, alone):
        cand = anchor_candidates(m)
        assert len(a) == min(8, int(cand.sum()))
        assert a.tolist() == sorted(set(a.tolist()))
        assert all(m[t] and m[t + 1] and t + 1 < len(m) for t in a.tolist())


def test_anchor_draws_change_with_epoch_and_seed_and_take_all_when_few():
    mask = torch.ones(200, dtype=torch.uint8)
    a0 = sample_anchors(mask, 16, seed=0, epoch=0, sample_id="s")
    assert a0.tolist() == sample_anchors(mask, 16, seed=0, epoch=0, sample_id="s").tolist()
    assert a0.tolist() != sample_anchors(mask, 16, seed=0, epoch=1, sample_id="s").tolist()
    assert a0.tolist() != sample_anchors(mask, 16, seed=1, epoch=0, sample_id="s").tolist()
    assert a0.tolist() != sample_anchors(mask, 16, seed=0, epoch=0, sample_id="t").tolist()
    few = torch.tensor([0, 1, 1, 0, 1, 1, 1, 0], dtype=torch.uint8)
    assert sample_anchors(few, 16, 0, 0, "s").tolist() == [1, 4, 5]


def test_slot_validity_is_cumulative_and_eagle3_blocks_start_at_candidates():
    mask = torch.tensor([[0, 1, 1, 1, 0, 1, 1, 0]])
    pos = torch.tensor([[1, 2, 5, 6]])
    v = slot_validity(mask, pos, torch.tensor([[True, True, True, False]]), block_size=3)
    assert v.int().tolist() == [[[1, 1, 0], [1, 0, 0], [1, 0, 0], [0, 0, 0]]]
    epos, evalid = all_anchors(mask)
    assert epos[0].tolist() == list(range(1, 8))
    assert evalid[0].tolist() == anchor_candidates(mask)[0, 1:].tolist()


# --------------------------------------------------------------------------- hand-computed values


@torch.no_grad()
def reference_terms(model, target, batch, gamma):
    """Loop-by-loop reference of the DSpark terms, τ_sim and greedy τ (float64)."""
    hidden = model(batch.features, batch.input_ids, batch.anchor_pos, batch.anchor_valid)
    head = target.get_output_embeddings()
    num = {"ce": 0.0, "l1": 0.0, "bce": 0.0}
    den, taus, greedy = 0.0, [], []
    for b in range(batch.input_ids.shape[0]):
        for n in range(batch.anchor_pos.shape[1]):
            if not batch.anchor_valid[b, n]:
                continue
            t, prev = int(batch.anchor_pos[b, n]), int(batch.input_ids[b, int(batch.anchor_pos[b, n])])
            surv, tau, run, alive = 1.0, 1.0, 1.0, True
            for k in range(gamma):
                lab = t + k + 1
                if lab >= batch.input_ids.shape[1] or not batch.loss_mask[b, lab]:
                    break
                label = int(batch.input_ids[b, lab])
                w = math.exp(-k / 4.0)
                logits = model.draft_logits(hidden[b, n, k][None, None], torch.tensor([[prev]]))[0, 0]
                p_d = torch.softmax(logits, -1)
                p_t = torch.softmax(head(batch.target_hidden[b, t + k]), -1)
                l1 = float((p_d - p_t).abs().sum())
                c_star = 1 - l1 / 2
                c = torch.sigmoid(model.confidence(hidden[b, n, k][None], torch.tensor([prev])))[0]
                bce = -(c_star * math.log(c) + (1 - c_star) * math.log(1 - c))
                num["ce"] += w * -math.log(float(p_d[label]))
                num["l1"] += w * l1
                num["bce"] += w * float(bce)
                den += w
                surv *= c_star
                tau += surv
                alive = alive and int(p_d.argmax()) == int(p_t.argmax())
                run += alive
                prev = label
            taus.append(tau)
            greedy.append(run)
    return {k: v / den for k, v in num.items()}, sum(taus) / len(taus), sum(greedy) / len(greedy)


def test_dspark_terms_match_a_hand_computed_example(target64):
    """γ = 3, two anchors; the second block's response ends after its second slot."""
    model = perturb(dspark_model(target64, block_size=3)).double()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(6, 96, (1, 10), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 0, 0]], dtype=torch.uint8)
    anchors = (torch.tensor([[2, 5]]), torch.tensor([[True, True]]))
    batch = make_batch(target64, ids, mask, anchors)
    parts = DSparkObjective(model, target_head_from(target64.get_output_embeddings()))(batch)
    ref, tau, greedy = reference_terms(model, target64, batch, gamma=3)
    assert int(parts.blocks) == 2 and int(parts.tokens) == 5
    assert float(parts.ce) == pytest.approx(ref["ce"], rel=1e-9)
    assert float(parts.l1) == pytest.approx(ref["l1"], rel=1e-9)
    assert float(parts.bce) == pytest.approx(ref["bce"], rel=1e-9)
    expected = 0.1 * ref["ce"] + 0.9 * ref["l1"] + ref["bce"]
    assert float(parts.loss.detach()) == pytest.approx(expected, rel=1e-9)
    assert parts.tau.value() == pytest.approx(tau, rel=1e-9)
    assert parts.tau.greedy_value() == pytest.approx(greedy, rel=1e-12)
    w = position_weights(3, 4.0)
    assert w.tolist() == pytest.approx([1.0, math.exp(-0.25), math.exp(-0.5)])
    assert float(parts.denominators["slots"]) == pytest.approx(float(2 * w[0] + 2 * w[1] + w[2]), rel=1e-6)


# --------------------------------------------------------------------------- global normalization


@pytest.mark.parametrize("drafter", ["dspark", "dflash", "eagle3"])
def test_micro_batches_with_global_denominators_equal_the_whole_batch(target64, data64, drafter):
    if drafter == "eagle3":
        model = perturb(eagle3_model(target64)).double()
    elif drafter == "dflash":
        cfg = DFlashConfig.from_target(target64.config, mask_token_id=5, num_hidden_layers=1,
                                       target_layer_ids=LAYERS, block_size=3)
        model = perturb(build_dflash(cfg).init_from_target(target64)).double()
    else:
        model = perturb(dspark_model(target64)).double()
    obj = build_objective(model, target_head_from(target64.get_output_embeddings()))
    whole = obj(data64)
    whole.loss.backward()
    ref_grads = grads(model)
    model.zero_grad()
    halves = [sub_batch(data64, [0, 3]), sub_batch(data64, [1, 2])]
    den = reduce_denominators([obj.denominators(h) for h in halves])
    total, meter = 0.0, TauSimMeter(obj.block_size)
    for h in halves:
        parts = obj(h, den)
        parts.loss.backward()
        total = total + parts.loss.detach()
        meter.add(parts)
    assert float(total) == pytest.approx(float(whole.loss.detach()), rel=1e-12)
    for name, g in grads(model).items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-10, atol=1e-12)
    assert meter.value() == pytest.approx(whole.tau.value(), rel=1e-12)
    assert float(meter.blocks) == float(whole.blocks)


@pytest.mark.parametrize("drafter", ["dspark", "eagle3"])
def test_sequence_average_is_the_mean_of_each_sequences_own_loss(target64, data64, drafter):
    """loss.average=sequence: every sequence weighs the same, however many slots it supervises;
    the token average (the control) weighs the long rows more and differs."""
    model = perturb(dspark_model(target64) if drafter == "dspark" else eagle3_model(target64)).double()
    head = target_head_from(target64.get_output_embeddings())
    per_seq = build_objective(model, head, ObjectiveConfig(average="sequence"))
    rows = [float(per_seq(sub_batch(data64, [r])).loss.detach()) for r in range(4)]
    whole = float(per_seq(data64).loss.detach())
    assert whole == pytest.approx(sum(rows) / 4, rel=1e-12)
    token = float(build_objective(model, head, ObjectiveConfig(average="token"))(data64).loss.detach())
    assert abs(token - whole) > 1e-3 * abs(whole), (token, whole)


@pytest.mark.parametrize("drafter", ["dspark", "eagle3"])
def test_chunking_and_recompute_do_not_change_loss_or_gradients(target64, data64, drafter):
    model = perturb(dspark_model(target64, markov_head_type="rnn") if drafter == "dspark"
                    else eagle3_model(target64)).double()
    head = target_head_from(target64.get_output_embeddings())
    results = []
    for chunk, recompute in [(10_000, False), (1, True), (3, False), (2, True)]:
        model.zero_grad()
        parts = build_objective(model, head, ObjectiveConfig(chunk_size=chunk, recompute=recompute))(data64)
        parts.loss.backward()
        results.append((parts, grads(model)))
    (ref, ref_g), rest = results[0], results[1:]
    for parts, g in rest:
        assert float(parts.loss.detach()) == pytest.approx(float(ref.loss.detach()), rel=1e-12)
        assert parts.tau.value() == pytest.approx(ref.tau.value(), rel=1e-12)
        for name in ref_g:
            torch.testing.assert_close(g[name], ref_g[name], rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- pruned vocabulary


def with_top_k(batch, head, k, shuffle=False):
    """The batch as a top-k cache gives it: p_t's k most likely tokens and their probabilities."""
    top = torch.softmax(head(batch.target_hidden), -1).topk(k, dim=-1)  # [B, S, k]
    ids = top.indices.roll(1, dims=-1) if shuffle else top.indices  # shuffle: a broken pairing
    return replace(batch, target_topk_ids=ids, target_topk_probs=top.values)


@pytest.mark.parametrize("pruned", [False, True], ids=["full-vocab", "pruned"])
@pytest.mark.parametrize("drafter", ["dspark", "eagle3"])
def test_top_k_p_t_matches_exact_p_t_within_the_mass_beyond_k(target64, data64, drafter, pruned):
    """Training from the top-k cache: with k = V every term equals the exact p_t's (1e-9); with
    k = 8 L1 moves by at most twice the mass beyond the top k; evaluation (no grad) ignores the
    top k. Negative control: ids paired with the wrong probabilities move the terms a million times
    past the equality's tolerance."""
    kw = {"kept_ids": torch.arange(0, 96, 2), "draft_vocab_size": 48} if pruned else {}
    model = perturb((dspark_model if drafter == "dspark" else eagle3_model)(target64, **kw)).double()
    lm_head = target_head_from(target64.get_output_embeddings())
    head = lambda h: 10 * lm_head(h)  # noqa: E731  a peaked p_t (a random target's is near uniform)
    obj = build_objective(model, head, ObjectiveConfig(
        loss_weights=LossWeights(ce=1, l1=1, soft_ce=1, kl=1, ce_argmax=1)))
    exact = obj(data64).sums
    full = obj(with_top_k(data64, head, 96)).sums
    assert set(full) == set(exact) and {"l1", "kl", "soft_ce", "ce_argmax"} <= set(full)
    for name in exact:
        torch.testing.assert_close(full[name], exact[name], rtol=1e-9, atol=1e-9, msg=name)
    blocks = obj.blocks(data64)
    n = float(obj.slot_weights().expand_as(blocks.valid)[blocks.valid].sum())  # Σ w over slots
    top8 = with_top_k(data64, head, 8)
    beyond = float((1 - top8.target_topk_probs.sum(-1))[data64.loss_mask.roll(-1, 1) > 0].max())
    moved = abs(float(obj(top8).sums["l1"] - exact["l1"]))
    assert 0 < moved <= 2 * beyond * n
    wrong = obj(with_top_k(data64, head, 96, shuffle=True)).sums
    assert max(abs(float(wrong[k] / exact[k] - 1)) for k in ("l1", "kl", "ce_argmax")) > 1e-3
    with torch.no_grad():  # evaluation: exact p_t from the hidden, whatever the batch carries
        torch.testing.assert_close(obj(top8).tau.sums(), obj(data64).tau.sums(), rtol=0, atol=0)


@pytest.mark.parametrize("drafter", ["dspark", "eagle3"])
def test_pruned_vocab_masks_labels_and_uses_the_full_vocabulary_l1(target64, data64, drafter):
    kept = torch.arange(0, 96, 2)  # even ids only: about half the labels fall outside
    build = dspark_model if drafter == "dspark" else eagle3_model
    model = perturb(build(target64, kept_ids=kept, draft_vocab_size=48)).double()
    head = target_head_from(target64.get_output_embeddings())
    cfg = ObjectiveConfig(loss_weights=LossWeights(ce=1, l1=1, soft_ce=1, kl=1, ce_argmax=1))
    obj = build_objective(model, head, cfg)
    parts = obj(data64)
    blocks = obj.blocks(data64)
    labels = blocks.label_draft
    odd = sum(1 for m in range(labels.shape[0]) for k in range(obj.block_size)
              if blocks.valid[m, k] and labels[m, k] < 0)
    assert odd > 0 and int(parts.pruned_labels) == odd
    # dense reference: draft logits scattered to the full vocabulary (-inf outside)
    with torch.no_grad():
        logits = obj.slot_logits(obj.block_hidden(data64, blocks), blocks.prev)  # [M, γ, 48]
    full = scatter_draft_logits(logits, model.d2t, 96)  # [M, γ, 96]
    p_d = torch.softmax(full, -1)
    pos = blocks.anchor[:, None] + torch.arange(obj.block_size)
    rows = blocks.rows[:, None].expand_as(pos)
    p_t = torch.softmax(head(data64.target_hidden[rows, pos.clamp(max=15)]), -1)
    w = obj.slot_weights().expand_as(blocks.valid)
    v = blocks.valid
    l1 = (p_d - p_t).abs().sum(-1)  # [M, γ]
    assert float(parts.l1) == pytest.approx(float((l1 * w)[v].sum() / w[v].sum()), rel=1e-9)
    tgt = data64.input_ids[rows, (pos + 1).clamp(max=15)]
    nll = -torch.log(p_d.gather(-1, tgt[..., None])[..., 0])  # inf outside the draft vocab
    iv = blocks.in_vocab
    assert float(parts.ce) == pytest.approx(float((nll * w)[iv].sum() / w[iv].sum()), rel=1e-9)
    q = p_t[..., kept] / p_t[..., kept].sum(-1, keepdim=True)
    soft = -(q * torch.log_softmax(logits, -1)).sum(-1)
    assert float(parts.soft_ce) == pytest.approx(float((soft * w)[iv].sum() / w[iv].sum()), rel=1e-9)
    # distillation terms: every supervised slot, whatever its text label
    kl = (q * (q.log() - torch.log_softmax(logits, -1))).sum(-1)
    assert float(parts.term("kl")) == pytest.approx(float((kl * w)[v].sum() / w[v].sum()), rel=1e-9)
    greedy = -torch.log_softmax(logits, -1).gather(-1, q.argmax(-1, keepdim=True))[..., 0]
    assert float(parts.term("ce_argmax")) == pytest.approx(float((greedy * w)[v].sum() / w[v].sum()), rel=1e-9)
    c_star = (1 - 0.5 * l1)[v]
    assert parts.tau.c_star_sum.sum().item() == pytest.approx(float(c_star.sum()), rel=1e-9)


# --------------------------------------------------------------------------- c* and τ_sim


class _TargetAsDraft:
    """Mixin: the draft hidden of slot k is the target's own hidden at anchor + k, so with the
    target's LM head the draft logits equal the target logits (up to float32 rounding: see
    L1_TOL)."""

    def block_hidden(self, batch, blocks):
        pos = blocks.anchor[:, None] + torch.arange(self.block_size)  # [M, γ]
        pos = pos.clamp(max=batch.input_ids.shape[1] - 1)
        return batch.target_hidden[blocks.rows[:, None].expand_as(pos), pos]  # [M, γ, H]


class _DSparkTargetAsDraft(_TargetAsDraft, DSparkObjective):
    pass


class _Eagle3TargetAsDraft(_TargetAsDraft, Eagle3Objective):
    pass


@pytest.mark.parametrize("drafter", ["dspark", "eagle3"])
def test_c_star_is_one_when_draft_equals_target(drafter):
    target = tiny_target("qwen3", seed=0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(6, 96, (2, 20), generator=g)
    mask = torch.ones(2, 20, dtype=torch.uint8)
    if drafter == "dspark":
        model = dspark_model(target, markov_rank=0, enable_confidence_head=False, block_size=4)
        cls = _DSparkTargetAsDraft
        batch = make_batch(target, ids, mask, batch_anchors(mask[:, :14], ["a", "b"], 6, 0, 0))
    else:
        model, cls = eagle3_model(target, ttt_length=4), _Eagle3TargetAsDraft
        batch = make_batch(target, ids, mask)

    head = target_head_from(target.get_output_embeddings())

    def run(objective_cls):
        with torch.no_grad():  # evaluation: greedy τ is counted too
            return objective_cls(model, head)(batch), full_blocks_only(objective_cls(model, head))(batch)

    parts, full = run(cls)
    assert int(parts.blocks) > 0
    assert_draft_is_the_target(parts, full, gamma=4)

    class Bf16Slip(cls):  # negative control: the draft hidden rounded through bf16 on its way
        def block_hidden(self, batch, blocks):
            return super().block_hidden(batch, blocks).to(torch.bfloat16).float()

    with pytest.raises(AssertionError):
        assert_draft_is_the_target(*run(Bf16Slip), gamma=4)


# Draft and target logits come from the same LM head and the same hidden rows, but through GEMMs
# of other shapes (the draft's [M·γ, H] block against the target's [n, H] supervised rows, which
# the threads split differently): equal up to float32 rounding, not bitwise (Eagle3 here with 2
# threads: l1 = 3e-10). 1e-5 is ~100× an l1 from 1-ulp logit differences everywhere; the
# smallest real fault tried, the draft hidden rounded through bf16, gives l1 = 1.4e-4 and
# τ_sim 7e-4 below γ + 1 (and flips greedy matches).
L1_TOL = 1e-5


def assert_draft_is_the_target(parts, full, gamma):
    """c* = 1 - l1/2 = 1 at every position, τ_sim = greedy τ = 1 + supervised slots per block
    (Eagle3 chains near the end are cut by the end of the sequence and count only their
    supervised slots), and γ + 1 over fully supervised blocks."""
    assert float(parts.l1) < L1_TOL
    assert parts.c_star == pytest.approx([1.0] * gamma, abs=L1_TOL)
    tau = 1 + float(parts.tokens) / float(parts.blocks)
    assert parts.tau.value() == pytest.approx(tau, abs=gamma * L1_TOL)
    assert parts.tau.greedy_value() == pytest.approx(tau, rel=1e-12)  # counts of argmax matches
    assert full.tau.value() == pytest.approx(gamma + 1, abs=gamma * L1_TOL)
    assert full.tau.greedy_value() == gamma + 1


def test_tau_meter_sums_reduce_like_an_all_reduce():
    a, b = TauSimMeter(3), TauSimMeter(3)
    valid = torch.tensor([[True, True, False], [True, True, True]])
    a.add_blocks(torch.tensor([[0.5, 0.5, 0.9], [1.0, 0.5, 0.5]]), valid, valid)
    b.add_blocks(torch.tensor([[0.2, 1.0, 1.0]]), valid[1:], valid[1:] & torch.tensor([True, False, True]))
    assert a.value() == pytest.approx(1 + (0.5 + 0.25 + 1.0 + 0.5 + 0.25) / 2)
    merged = TauSimMeter(3)
    merged.load_sums(a.sums() + b.sums())  # what SUM all-reduce of sums() gives
    assert float(merged.blocks) == 3
    assert merged.value() == pytest.approx(1 + (0.75 + 1.75 + 0.2 + 0.2 + 0.2) / 3)
    assert merged.greedy_value() == pytest.approx(1 + (2 + 3 + 1) / 3)
    assert merged.per_position()["c_star"] == pytest.approx([1.7 / 3, 2.0 / 3, 1.5 / 2])


def test_zlab_slots_are_not_trainable_and_missing_anchors_fail(target64, data64):
    cfg = DFlashConfig.from_target(target64.config, mask_token_id=5, num_hidden_layers=1,
                                   target_layer_ids=LAYERS, slot_semantics="zlab")
    with pytest.raises(InputError, match="z-lab"):
        build_objective(build_dflash(cfg), None)
    model = dspark_model(target64).double()
    with pytest.raises(ValueError, match="no anchors"):
        build_objective(model, None)(TrainBatch(data64.input_ids, data64.loss_mask, data64.features,
                                                data64.target_hidden))
    with pytest.raises(ValueError, match="target head"):
        build_objective(model, None)(data64)


# --------------------------------------------------------------------------- overfit (acceptance)

OVERFIT_GAMMA = 4
PROMPT, NEW = 4, 20


@pytest.fixture(scope="module")
def greedy_data(one_thread):
    """6 sequences generated greedily by a tiny Qwen3 whose LM head is scaled 1000× (peaked:
    mean target NLL of its own greedy tokens ≈ 0.02), loss mask = the generated tokens."""
    target = tiny_target("qwen3", seed=0)
    with torch.no_grad():
        target.get_output_embeddings().weight.mul_(1000.0)
    ids = torch.randint(6, 96, (6, PROMPT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for _ in range(NEW):
            ids = torch.cat([ids, target(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    mask = torch.zeros_like(ids, dtype=torch.uint8)
    mask[:, PROMPT:] = 1
    anchors = batch_anchors(mask, list(range(6)), num_anchors=64, seed=0, epoch=0)
    batch = make_batch(target, ids, mask, anchors)
    head = target_head_from(target.get_output_embeddings())
    greedy = head(batch.target_hidden[:, PROMPT - 1:-1]).argmax(-1)
    assert torch.equal(greedy, ids[:, PROMPT:])  # the labels are the target's argmax
    return target, batch, head


def train(model, objective, batch, steps=200, lr=3e-3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    for _ in range(steps):
        parts = objective(batch)
        opt.zero_grad()
        parts.loss.backward()
        opt.step()
    with torch.no_grad():
        return objective(batch), full_blocks_only(objective)(batch)


@pytest.mark.parametrize("drafter", ["dspark", "dflash", "eagle3"])
def test_each_drafter_overfits_to_zero_ce_and_greedy_tau_gamma_plus_one(greedy_data, drafter):
    target, batch, head = greedy_data
    torch.manual_seed(0)
    if drafter == "dspark":
        model = dspark_model(target, block_size=OVERFIT_GAMMA, markov_rank=16)
    elif drafter == "dflash":
        cfg = DFlashConfig.from_target(target.config, mask_token_id=5, num_hidden_layers=1,
                                       target_layer_ids=LAYERS, block_size=OVERFIT_GAMMA)
        model = build_dflash(cfg).init_from_target(target)
    else:
        model = eagle3_model(target, ttt_length=OVERFIT_GAMMA)
    objective = build_objective(model, head)
    before = objective(batch)
    parts, full = train(model, objective, batch)
    assert float(before.ce) > 10  # it did have something to learn
    assert float(parts.ce) < 0.05
    # teacher-forced greedy: every supervised slot of every block is accepted ...
    assert parts.tau.greedy_survival_sum.tolist() == parts.tau.slot_count.tolist()
    # ... so a fully supervised block's greedy τ is γ + 1, and τ_sim (T = 1) is close to it
    assert int(full.blocks) > 0
    assert full.tau.greedy_value() == OVERFIT_GAMMA + 1
    assert full.tau.value() > OVERFIT_GAMMA + 1 - 0.3
    assert min(parts.c_star) > 0.9


@pytest.mark.parametrize("drafter,term", [("dspark", "kl"), ("dspark", "ce_argmax"), ("dspark", "soft_ce"),
                                          ("eagle3", "kl"), ("eagle3", "ce_argmax")])
def test_each_loss_option_alone_overfits_the_peaked_target(greedy_data, drafter, term):
    """Each distillation term, as the only loss (loss.weights: {term: 1}), learns the target's
    greedy continuations in 300 steps: >= 97 % of supervised slots greedy-accepted, c* > 0.9 on
    every slot. (L1 alone does not: measured 63 of 114 slot-0 positions after 200 steps, the
    saturated softmax starving its gradient; DSpark's default adds 0.1 CE, tested above. At 200
    steps dspark kl / soft_ce stood at 406 of 420 slots, 96.7 %, on an Intel Xeon with AVX512
    and above 97 % on an AMD EPYC with AVX2: the float path differs by CPU, not the learning.)"""
    target, batch, head = greedy_data
    torch.manual_seed(0)
    model = (dspark_model(target, block_size=OVERFIT_GAMMA, markov_rank=16) if drafter == "dspark"
             else eagle3_model(target, ttt_length=OVERFIT_GAMMA))
    objective = build_objective(model, head, ObjectiveConfig(loss_weights=LossWeights(**{term: 1.0})))
    before = objective(batch)
    parts, _ = train(model, objective, batch, steps=300)
    assert min(before.c_star) < 0.5  # it did have something to learn
    accepted, slots = parts.tau.greedy_survival_sum.sum(), parts.tau.slot_count.sum()
    assert accepted >= 0.97 * slots, (parts.tau.greedy_survival_sum.tolist(), parts.tau.slot_count.tolist())
    assert min(parts.c_star) > 0.9, parts.c_star
