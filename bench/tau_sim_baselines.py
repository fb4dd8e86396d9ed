"""Reference lines for a training curve: the held-out τ_sim of predictors that need no training,
scored exactly like `eval/tau_sim` (DESIGN §3.2: teacher-forced, T = 1, c*_k = 1 − ½‖p_d − p_t‖₁,
τ_sim = 1 + Σ_k Π_{j≤k} c*_j over the same anchors the trainer's evaluation draws).

    .venv/bin/python bench/tau_sim_baselines.py [--recipe smollm2-135m/dspark] [--data FILE] [--draft RUN/step_N]

Rows (p_d for slot k, which predicts the token at anchor + k + 1, previous token teacher-forced):
- `unigram`: the label frequencies of the training responses (draft vocabulary);
- `bigram`: P(next | previous token) from the training responses, smoothed towards the unigram
  (what `init.markov: bigram` starts DSpark's Markov head from, at full rank);
- `ngram-copy`: prompt lookup — the most recent earlier occurrence of the last 3 tokens in the
  same sequence proposes its continuation (one-hot; c* = p_t(proposal)), nothing when absent;
- `feature-copy-N` (N = 1, 2): the most recent earlier position j < anchor whose last N tokens equal
  the anchor's; slot k proposes the target's own distribution at j + k (p_t[j + k], read from the
  context the draft is given: only while j + k < anchor), nothing without a match. What a draft
  that finds the match by attention and reads that row's target state could propose: the value of
  learning to copy, where `ngram-copy` is what copying the tokens alone gives;
- `argmax oracle`: one-hot on the target's own argmax (c* = max p_t): the best deterministic
  proposer, an upper bound for greedy-style drafts;
- `--draft`: a trained draft, and the same draft with its target-feature context zeroed (how much
  of its τ_sim comes from the features).
"""

from __future__ import annotations

import argparse
import copy
from collections import Counter, defaultdict

import torch


def meter(block: int):
    from draftsmith.train.objectives import TauSimMeter

    return TauSimMeter(block)


def add_block(tau, cs: list[float]) -> None:
    """One block whose first len(cs) slots are supervised."""
    c = torch.zeros(1, tau.block_size, dtype=torch.float64)
    c[0, : len(cs)] = torch.tensor(cs, dtype=torch.float64)
    valid = torch.arange(tau.block_size)[None] < len(cs)
    tau.add_blocks(c, valid, torch.zeros_like(valid))


def last_match(ids: list[int], a: int, n: int) -> int | None:
    """The most recent j < a with ids[j - n + 1 .. j] == ids[a - n + 1 .. a], or None."""
    key = ids[a - n + 1: a + 1]
    for j in range(a - 1, n - 2, -1):
        if ids[j - n + 1: j + 1] == key:
            return j
    return None


def count_tables(samples, vocab: int):
    """Unigram [V] and bigram (prev -> Counter of next) of the training labels."""
    from draftsmith.train.init import bigram_pairs

    prev, nxt = bigram_pairs(samples, vocab, None)
    uni = torch.bincount(nxt, minlength=vocab).double()
    big: dict[int, Counter] = defaultdict(Counter)
    pairs, counts = torch.unique(torch.stack([prev, nxt], 1), dim=0, return_counts=True)
    for (p, n), c in zip(pairs.tolist(), counts.tolist()):
        big[p][n] = c
    return uni / uni.sum(), big


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="smollm2-135m/dspark")
    p.add_argument("--data", default="../shared/data/sharegpt-smollm2-regen.jsonl")
    p.add_argument("--draft", default=None, help="a trained draft dir to score alongside")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from draftsmith.decoding import NGramProposer
    from draftsmith.train import loop
    from draftsmith.train.anchors import sample_anchors
    from draftsmith.drafters import build_objective
    from draftsmith.train.objectives import ObjectiveConfig
    from draftsmith.train.parallel import init_distributed
    from draftsmith.train.recipe import load_recipe
    from draftsmith.train.setup import build_setup

    recipe = load_recipe(args.recipe)
    info = init_distributed()
    s = build_setup(recipe, args.data, info, init_from=args.draft, progress=False)
    block = s.model.config.block_size
    V = s.model.config.vocab_size
    uni, big = count_tables(s.data.train, V)
    held = s.features(s.data.heldout)
    ngram = NGramProposer(num_tokens=block, max_ngram=3, min_ngram=3)
    copies = (1, 2)
    names = ("unigram", "bigram", "ngram-copy", *(f"feature-copy-{n}" for n in copies), "argmax oracle")
    rows = {name: meter(block) for name in names}
    with torch.no_grad():
        for f in held:
            ids = f.input_ids.tolist()
            p_t = torch.softmax(s.target.logits(f.hidden).double(), -1)  # [S, V]: p_t[t] = next after t
            for a in sample_anchors(f.loss_mask, loop._num_anchors(s.model), recipe.train.seed, loop.EVAL_EPOCH, f.id).tolist():
                slots = [k for k in range(block) if a + k + 1 < len(ids) and f.loss_mask[a + k + 1]]
                slots = slots[: next((i for i, k in enumerate(slots) if k != i), len(slots))]
                if not slots:
                    continue
                prop = ngram.lookup(ids[: a + 1])
                match = {n: last_match(ids, a, n) for n in copies}
                cs = {n: [] for n in rows}
                for k in slots:
                    pt = p_t[a + k]
                    cs["unigram"].append(float(torch.minimum(pt, uni).sum()))
                    cnt = big.get(ids[a + k])
                    q = uni.clone()
                    if cnt:
                        q = q * 0.1
                        tot = sum(cnt.values())
                        for tok, c in cnt.items():
                            q[tok] += 0.9 * c / tot
                    cs["bigram"].append(float(torch.minimum(pt, q).sum()))
                    cs["ngram-copy"].append(float(pt[prop[k]]) if k < len(prop) else 0.0)
                    for n, j in match.items():
                        seen = j is not None and j + k < a
                        cs[f"feature-copy-{n}"].append(float(torch.minimum(pt, p_t[j + k]).sum()) if seen else 0.0)
                    cs["argmax oracle"].append(float(pt.max()))
                for n in rows:
                    add_block(rows[n], cs[n])
    results = {n: {"tau_sim": m.value(), "c_star": m.per_position()["c_star"]} for n, m in rows.items()}
    if args.draft:
        obj = build_objective(s.model, s.target.logits, ObjectiveConfig(chunk_size=recipe.train.loss_chunk))
        s.model.eval()
        ev = loop.evaluate(s, recipe, obj, info, held)
        results[f"draft {args.draft}"] = {"tau_sim": ev["eval/tau_sim"], "c_star": ev["eval/c_star"]}
        blind = [copy.copy(f) for f in held]
        for f in blind:
            f.features = torch.zeros_like(f.features)
        ev = loop.evaluate(s, recipe, obj, info, blind)
        results["draft, context zeroed"] = {"tau_sim": ev["eval/tau_sim"], "c_star": ev["eval/c_star"]}
    print(f"held-out: {len(held)} sequences of {args.data}, recipe {args.recipe} (block {block})")
    print("| predictor | τ_sim | c* per slot |\n|---|---|---|")
    for n, r in results.items():
        print(f"| {n} | {r['tau_sim']:.3f} | {', '.join(f'{c:.3f}' for c in r['c_star'])} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
