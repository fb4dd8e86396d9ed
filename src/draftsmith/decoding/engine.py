"""The one decode loop: prefill, then rounds of propose -> verify -> commit.

Prefill runs the target over the left-padded prompts (capturing the proposer's feature layers)
and draws each row's first token from the last prompt position (a plain target step, not a
round). Each round then:

1. propose: the proposer drafts K tokens per row; the truncation rule (default: keep all) cuts
   row r to lengths[r] <= K after drafting.
2. verify: one target forward over [last committed token, d_1..d_K] per row (rows with shorter
   drafts are padded at the end; causal attention keeps the padding out of the real positions).
   The target distribution at input index i verifies d_{i+1}; index K gives the bonus
   (`sampling.verify_greedy` / `verify_sampled`).
3. commit: the target KV keeps the last token plus the accepted drafts of each row and rolls the
   rest back (`TargetKV.keep`); the accepted drafts and the bonus/correction token are appended
   to the row, cut at EOS or max_new_tokens; rows that finished leave the batch; the proposer
   gets the features of the newly committed positions from the same verify forward.

Rows accept different numbers of tokens: the target cache stays right-aligned (left padding, see
`decoding.kv`), every row has its own logical positions, and finished rows are dropped.

The committed tokens stay on the device (`DecodeState.tokens` [B, capacity] + `lengths`), and the
commit (EOS and length cuts included) is tensor ops. A round reads the device once: one small int
matrix (per row: committed, drafted, proposed, accepted counts, cut and finish codes, plus the
confidences when the draft has them) from which the records, the finished rows and every host
shape (cache trims, draft bounds) follow. A truncation rule other than `KeepAll` adds one read (the
verified width); with a CUDA device `_now` synchronizes for the per-phase timings.

Per round a `RoundRecord` keeps, per active row, the drafted, proposed (after truncation),
accepted and committed counts and the cut reason, with the draft and verify wall times, so that
τ (DESIGN §3.4), llama.cpp's mean length and per-position acceptance can be computed
(`summarize`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from draftsmith.decoding.kv import StaticTargetKV, TargetKV
from draftsmith.decoding.proposers import DecodeState, OracleProposer, PlainProposer, Proposal, Proposer
from draftsmith.decoding.sampling import (
    SamplingConfig,
    probabilities,
    sample,
    verify_greedy,
    verify_sampled,
)
from draftsmith.decoding.truncate import KeepAll

log = logging.getLogger(__name__)

TruncationRule = Callable[[Proposal], torch.Tensor]  # proposal -> lengths [B]


@dataclass
class RoundRecord:
    """One propose -> verify -> commit round; lists have one entry per row active in it."""

    rows: list[int]  # original prompt index
    drafted: list[int]  # tokens the proposer drafted
    proposed: list[int]  # tokens verified (after truncation)
    accepted: list[int]  # drafted tokens the target accepted
    committed: list[int]  # tokens appended to the output (accepted + bonus, after cuts)
    cut: list[str]  # "" | "eos" (the round reached EOS) | "length" (tokens dropped at the limit)
    draft_s: float  # proposer time: propose + truncation + commit of the new features
    verify_s: float  # target forward + acceptance + cache rollback + dropping finished rows
    # per row: the confidence logits of every drafted slot (before truncation), when the
    # proposer has a confidence head (DSpark); what calibration is fitted on
    confidence: list[list[float]] | None = None

    def tau_counts(self) -> list[int]:
        """Per row: accepted + 1 (bonus included); an EOS-terminated round counts only what it
        accepted (an EOS that came as the bonus is not counted)."""
        out = []
        for a, c, cut in zip(self.accepted, self.committed, self.cut):
            bonus_kept = c == a + 1
            out.append(c - 1 if cut == "eos" and bonus_kept else c)
        return out


def summarize(rounds: list[RoundRecord]) -> dict:
    """τ, llama.cpp's mean length, per-position survival / conditional acceptance, timings."""
    acc = [a for r in rounds for a in r.accepted]
    prop = [p for r in rounds for p in r.proposed]
    taus = [t for r in rounds for t in r.tau_counts()]
    nonempty = [a for a, p in zip(acc, prop) if p > 0]
    K = max(prop, default=0)
    survival, conditional = [], []
    for k in range(1, K + 1):
        verified = [a for a, p in zip(acc, prop) if p >= k]
        reached = sum(a >= k - 1 for a in verified)
        survival.append(sum(a >= k for a in verified) / len(verified))
        conditional.append(sum(a >= k for a in verified) / reached if reached else float("nan"))
    return {
        "row_rounds": len(taus),
        "tau": sum(taus) / len(taus) if taus else float("nan"),
        "tau_llama_cpp": 1 + sum(nonempty) / len(nonempty) if nonempty else float("nan"),
        "empty_rounds": len(prop) - len(nonempty),
        "survival": survival,  # P[accepted >= k | k verified]
        "conditional_acceptance": conditional,  # P[accepted >= k | accepted >= k-1, k verified]
        "draft_s": sum(r.draft_s for r in rounds),
        "verify_s": sum(r.verify_s for r in rounds),
    }


@dataclass
class Generation:
    """Result of `SpecEngine.generate`: per prompt, the generated ids (first = the prefill
    token; EOS included when hit) and why it stopped ("eos" | "length")."""

    outputs: list[list[int]]
    finish: list[str]
    rounds: list[RoundRecord] = field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: float = 0.0

    def summary(self) -> dict:
        tokens = sum(len(o) for o in self.outputs)
        seconds = self.prefill_s + self.decode_s
        return {**summarize(self.rounds), "tokens": tokens, "seconds": seconds,
                "tokens_per_s": tokens / seconds if seconds else float("nan"),
                "hit_max_new_tokens": sum(f == "length" for f in self.finish) / len(self.finish)}


class SpecEngine:
    """Lossless speculative decoding of a `targets.model.TargetModel` with a `Proposer`.

    target: a TargetModel tapping exactly the proposer's `target_layer_ids` (none for
    proposers without features). sampling: temperature 0 = greedy. truncate: a rule
    proposal -> lengths [B] (`decoding.truncate`). eos_token_ids: ids that end a row. compile:
    run the target's forward through `torch.compile` (dynamic shapes) on CUDA; elsewhere a
    no-op, said in one log line. The same kernels' math, so outputs are unchanged up to the
    compiler's float reassociation (greedy ties aside). static_kv: keep the target's KV in
    fixed-capacity buffers updated in place (`decoding.kv.StaticTargetKV`: one key shape per
    forward, stable addresses for the compiler); any device, same tokens.
    """

    def __init__(self, target, proposer: Proposer, sampling: SamplingConfig | None = None,
                 truncate: TruncationRule | None = None, eos_token_ids: Iterable[int] = (),
                 pad_token_id: int = 0, compile: bool = False, static_kv: bool = False):
        if proposer.uses_features and list(target.layer_ids) != list(proposer.target_layer_ids):
            raise ValueError(f"the target taps layers {list(target.layer_ids)} but the "
                             f"{proposer.name} draft reads {proposer.target_layer_ids}: build the "
                             "TargetModel with the draft's target_layer_ids")
        self.target, self.proposer = target, proposer
        self.sampling = sampling or SamplingConfig()
        self.truncate = truncate or KeepAll()
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.pad_token_id = pad_token_id
        self.static_kv = static_kv
        self.forward = self._compiled_target() if compile else target

    def _compiled_target(self):
        if self.device.type != "cuda":
            log.info("--compile: torch.compile of the target runs on CUDA only; %s runs it eagerly",
                     self.device)
            return self.target
        log.info("--compile: the target's forward goes through torch.compile (dynamic shapes); "
                 "the first rounds of each shape compile")
        return torch.compile(self.target, dynamic=True)

    @property
    def device(self) -> torch.device:
        return next(self.target.parameters()).device

    def start(self, prompts: list[list[int]], max_new_tokens: int, seed: int = 0) -> DecodeRun:
        """Prefill and return the run, to be advanced with `step()` until `done`."""
        return DecodeRun(self, prompts, max_new_tokens, seed)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, seed: int = 0) -> Generation:
        run = self.start(prompts, max_new_tokens, seed)
        while not run.done:
            run.step()
        return run.result()


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


CUTS = ("", "eos", "length")  # cut / finish codes of the device commit: 0, 1, 2
STATIC_KV_SLACK = 32  # capacity beyond prompt + max_new_tokens: the widest verify window expected


class DecodeRun:
    """The state of one `generate` call: committed tokens (on the device), target KV, records.

    Every round brings one small int tensor back to the host (per row: drafted, proposed,
    accepted, committed counts, cut and finish codes): the records, the finished rows and the
    cache shapes all come from it."""

    def __init__(self, engine: SpecEngine, prompts: list[list[int]], max_new_tokens: int, seed: int):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.engine, self.max_new_tokens = engine, max_new_tokens
        dev = engine.device
        gen = torch.Generator(device=dev).manual_seed(seed)
        capacity = max(len(p) for p in prompts) + min(max_new_tokens, 64) + 1
        self.state = DecodeState.from_prompts(prompts, engine.sampling, gen, dev, capacity)
        self.eos = torch.tensor(sorted(engine.eos_token_ids), dtype=torch.long, device=dev)
        self.outputs: list[torch.Tensor | list[int]] = [[] for _ in prompts]
        self.finish = [""] * len(prompts)
        self.rounds: list[RoundRecord] = []
        t0 = _now(dev)
        self._prefill(prompts, max_new_tokens)
        self.prefill_s, self.decode_s = _now(dev) - t0, 0.0

    @property
    def done(self) -> bool:
        return self.state.batch_size == 0

    def _draw(self, logits: torch.Tensor) -> torch.Tensor:
        """The target's next token from logits [B, V]."""
        if self.engine.sampling.greedy:
            return logits.argmax(-1)
        return sample(probabilities(logits, self.engine.sampling), self.state.generator)

    @torch.no_grad()
    def _prefill(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        eng, dev = self.engine, self.state.device
        if eng.static_kv:  # every row's prompt, its new tokens and one verify window (grows if short)
            capacity = max(len(p) for p in prompts) + max_new_tokens + STATIC_KV_SLACK
            ids, mask, pos, self.kv = StaticTargetKV.left_pad(
                prompts, eng.pad_token_id, dev, num_layers=eng.target.config.num_hidden_layers, capacity=capacity)
        else:
            ids, mask, pos, self.kv = TargetKV.left_pad(prompts, eng.pad_token_id, dev)
        out = eng.forward(ids, attention_mask=mask, position_ids=pos, cache=self.kv.cache, use_cache=True)
        first = self._draw(eng.target.logits(out.hidden[:, -1]))  # [B, H] -> [B, V] -> [B]
        appended, _, fin = self._commit(first[:, None], torch.ones_like(first))
        _, finish = self._sync(appended, fin)
        counts = self.state.prompt_lens
        feats = None
        if eng.proposer.uses_features:
            P = ids.shape[1]
            src = (torch.arange(P, device=dev)[None, :] + self.kv.pad[:, None]).clamp(max=P - 1)  # [B, P]
            # left-padded [B, P, L·H] -> right-padded (row r's prompt positions at 0..len-1)
            feats = out.features.gather(1, src[..., None].expand(-1, -1, out.features.shape[-1]))
        eng.proposer.prefill(self.state, feats, counts)
        self._drop_finished(finish)

    def _commit(self, new: torch.Tensor, counts: torch.Tensor):
        """Append new[r, :counts[r]] to row r, cut after an EOS or at max_new_tokens, all in
        tensor ops -> (tokens appended [B], cut code [B], finish code [B]) (codes: `CUTS`)."""
        st, n = self.state, new.shape[1]
        room = self.max_new_tokens - (st.lengths - st.prompt_lens)  # [B]
        appended = torch.minimum(counts, room)
        cut = (counts > room).long() * 2
        if self.eos.numel():
            j = torch.arange(n, device=new.device)[None, :]  # [1, n]
            eos = (new[..., None] == self.eos).any(-1) & (j < appended[:, None])  # [B, n]
            first_eos = torch.where(eos, j, n).amin(dim=1)  # [B], n = none
            hit = first_eos < n
            appended = torch.where(hit, first_eos + 1, appended)
            cut = torch.where(hit, 1, cut)
        st.append(new, appended)
        full = (st.lengths - st.prompt_lens >= self.max_new_tokens).long() * 2
        return appended, cut, torch.where(cut == 1, 1, full)

    def _sync(self, *columns: torch.Tensor, extra: torch.Tensor | None = None):
        """The round's one device -> host transfer: per-row int columns [B] (and optional float
        columns extra [B, E], sent along as float64, exact for these small ints) -> one host
        list per int column (+ the extra rows); refreshes the state's host lengths."""
        B = self.state.batch_size
        both = torch.stack(columns, dim=1)  # [B, c]
        if extra is not None:
            # float32 values (what the records always held), exact in float64
            both = torch.cat([both.double(), extra.float().double()], dim=1)  # [B, c + E]
        rows = both.tolist() if B else []
        c = len(columns)
        out = [[int(r[i]) for r in rows] for i in range(c)]
        st = self.state
        st.host_lengths = [n + a for n, a in zip(st.host_lengths, out[0])]
        return out if extra is None else (*out, [r[c:] for r in rows])

    def _drop_finished(self, finish: list[int]) -> tuple[torch.Tensor | None, list[int]]:
        """Remove finished rows everywhere -> indices of the rows kept (None if all stay)."""
        st = self.state
        keep = [i for i, f in enumerate(finish) if not f]
        for i, f in enumerate(finish):
            if f:
                row, start = st.rows[i], st.prompt_lengths[i]
                self.finish[row] = CUTS[f]
                self.outputs[row] = st.tokens[i, start:st.host_lengths[i]].clone()  # no sync
        if len(keep) == st.batch_size:
            return None, keep
        idx = torch.tensor(keep, dtype=torch.long).to(st.device)
        self.kv.select(idx, keep)
        self.engine.proposer.select(idx)
        st.select(keep, idx)
        return idx, keep

    def _verify(self, logits, tokens, probs, lengths):
        if self.engine.sampling.greedy:
            return verify_greedy(logits, tokens, lengths)
        target_probs = probabilities(logits, self.engine.sampling)
        return verify_sampled(target_probs, probs, tokens, lengths, self.state.generator)

    def _truncated(self, prop: Proposal):
        """Apply the truncation rule -> (tokens [B, K], probs [B, K, V] | None, lengths [B]);
        the default KeepAll verifies the proposal's full width without asking the device."""
        if isinstance(self.engine.truncate, KeepAll):
            lengths, K = prop.lengths, prop.width
        else:
            lengths = torch.minimum(self.engine.truncate(prop), prop.lengths)  # [B]
            K = int(lengths.max()) if lengths.numel() else 0
        probs = prop.probs[:, :K] if prop.probs is not None else None
        return prop.tokens[:, :K], probs, lengths

    @torch.no_grad()
    def step(self) -> RoundRecord:
        """One propose -> verify -> commit round over the active rows."""
        eng, st, dev = self.engine, self.state, self.state.device
        t0 = _now(dev)
        prop = eng.proposer.propose(st)
        tokens, probs, lengths = self._truncated(prop)  # [B, K], [B, K, V] | None, [B]
        t1 = _now(dev)
        B, K = tokens.shape
        inputs = torch.cat([st.last_tokens()[:, None], tokens], dim=1)  # [B, 1 + K]
        mask, pos = self.kv.inputs(K + 1)
        out = eng.forward(inputs, attention_mask=mask, position_ids=pos, cache=self.kv.cache, use_cache=True)
        accepted, nxt = self._verify(eng.target.logits(out.hidden), tokens, probs, lengths)
        # accepted drafts, then the bonus / correction token at index accepted: [B, K+1]
        new = torch.cat([tokens, tokens.new_zeros(B, 1)], dim=1).scatter(1, accepted[:, None], nxt[:, None])
        appended, cut, fin = self._commit(new, accepted + 1)
        columns = self._sync(appended, prop.lengths, lengths, accepted, cut, fin, extra=prop.confidence)
        committed, drafted, proposed, acc, cuts, finish = columns[:6]
        self.kv.keep(K + 1, accepted + 1, [a + 1 for a in acc])
        conf = None
        if prop.confidence is not None:
            conf = [c[:n] for c, n in zip(columns[6], drafted)]
        record = RoundRecord(list(st.rows), drafted, proposed, acc, committed,
                             [CUTS[c] for c in cuts], 0.0, 0.0, conf)
        counts, feats = accepted + 1, out.features
        idx, _ = self._drop_finished(finish)
        if idx is not None:
            accepted, counts = accepted[idx], counts[idx]
            feats = feats[idx] if feats is not None else None
        t2 = _now(dev)
        if st.batch_size:
            eng.proposer.commit(st, accepted, feats, counts)
        t3 = _now(dev)
        record.draft_s, record.verify_s = (t1 - t0) + (t3 - t2), t2 - t1
        self.rounds.append(record)
        self.decode_s += t3 - t0
        return record

    def result(self) -> Generation:
        outputs = [o.tolist() if isinstance(o, torch.Tensor) else list(o) for o in self.outputs]
        return Generation(outputs, list(self.finish), self.rounds, self.prefill_s, self.decode_s)


def oracle_for(target, prompts: list[list[int]], max_new_tokens: int, num_tokens: int = 7,
               eos_token_ids: Iterable[int] = ()) -> OracleProposer:
    """An `OracleProposer` holding the target's own greedy continuations, computed here with
    plain decoding through the same loop."""
    plain = SpecEngine(target, PlainProposer(), eos_token_ids=eos_token_ids)
    return OracleProposer(plain.generate(prompts, max_new_tokens).outputs, num_tokens)
