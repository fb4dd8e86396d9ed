"""`draftsmith train`: the one train loop, for every drafter, on CPU or GPU, plain or torchrun.

    for step in steps:                       # one optimizer step = one global batch
        batch = this rank's share of the step's sequences, in micro-batches
                (on GPUs made one step ahead on a background thread: `Prefetcher`)
        D = Σ denominators over micro-batches and ranks   (data only: validity, weights)
        for micro-batch: loss = Σ_local w·ℓ / D ; backward  (gradients accumulate)
        gradients summed over ranks (DDP buckets during the last micro-batch's backward, or
        FSDP2 reduce-scatter) ; clip ; AdamW ; warmup+cosine LR
        on log steps only: reduce the metrics ; evaluate held-out τ_sim ; checkpoint

Because every micro-batch is normalized by the global denominators, the summed gradient is the
global-batch gradient exactly, whatever the number of processes or micro-batches. The objective
is an `nn.Module` that owns the draft, so data parallelism is `DistributedDataParallel(objective)`
(gloo on CPU, nccl on GPU; `no_sync()` on all but the last micro-batch, the loss scaled by W
since DDP averages) or, with `parallel: fsdp2`, `fully_shard` of the draft layers and of the
objective (summing reduce-scatter). The state of a run is one `Trainer` (`build_trainer`, which
the benches use too). The sample order is a permutation keyed by (seed, epoch); anchors by
(seed, epoch, sample id).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from draftsmith.train import checkpoint as ckpt
from draftsmith.train import resume as run_inputs
from draftsmith.train.dataset import epoch_order
from draftsmith.train.metrics import MetricsLog
from draftsmith.train.objectives import (
    TERM_DENOMINATOR, LossParts, ObjectiveConfig, ObjectiveFactory, TauSimMeter, TrainBatch,
    reduce_denominators,
)
from draftsmith.train.anchors import pad_anchors, sample_anchors
from draftsmith.train.parallel import (
    DistInfo, all_reduce_sum, any_rank, barrier, full_model_state, grad_norm_and_clip, init_distributed,
    shard_objective, shutdown, wrap_ddp,
)
from draftsmith.train.prefetch import Prefetcher
from draftsmith.train.recipe import Recipe, load_recipe
from draftsmith.train.samples import STORE_DIR
from draftsmith.train.setup import Setup, build_setup, param_groups
from draftsmith.utils.io import InputError, check_output_dir

log = logging.getLogger(__name__)
EVAL_EPOCH = -1  # anchors of held-out blocks are keyed by this "epoch": fixed across evals


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", required=True, help="shipped recipe (e.g. smollm2-135m/dspark) or YAML path")
    p.add_argument("--data", required=True, help="conversations JSONL with the target's answers")
    p.add_argument("--out", required=True, help="run dir: step_N/ checkpoints, metrics.jsonl, tensorboard/")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set train.max_steps=100 (repeatable)")
    p.add_argument("--cache", default=None, help="feature cache dir (built if missing); default: "
                                                 "the recipe's features.mode")
    p.add_argument("--heldout", default=None, help="held-out conversations JSONL (default: id-hash split)")
    p.add_argument("--init-from", default=None, help="start from a draft dir (e.g. a DeepSpec checkpoint)")
    p.add_argument("--no-resume", action="store_true", help="start over even if RUN/step_latest exists")
    p.add_argument("--no-progress", action="store_true")


# --------------------------------------------------------------------------- batches


def step_samples(step: int, n: int, global_batch: int, seed: int) -> list[tuple[int, int]]:
    """(sample index, epoch) of the sequences of optimizer step `step` (epochs run back to back)."""
    out = []
    for q in range(step * global_batch, (step + 1) * global_batch):
        epoch = q // n
        out.append((_epoch_order(n, seed, epoch)[q % n], epoch))
    return out


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    return tuple(epoch_order(n, seed, epoch))  # one permutation per epoch, not one per sequence


def collate(feats, epochs: list[int], recipe: Recipe, anchored: bool, device, num_anchors: int = 512) -> TrainBatch:
    """Right-pad one micro-batch of SampleFeatures into a TrainBatch (+ keyed anchors when the
    objective is `anchored`; the others supervise every position)."""
    B, S = len(feats), max(len(f) for f in feats)
    LH, H = feats[0].features.shape[-1], feats[0].hidden.shape[-1]
    ids = torch.zeros(B, S, dtype=torch.int64)
    mask = torch.zeros(B, S, dtype=torch.uint8)
    x = torch.zeros(B, S, LH, dtype=feats[0].features.dtype)
    h = torch.zeros(B, S, H, dtype=feats[0].hidden.dtype)
    for b, f in enumerate(feats):
        n = len(f)
        ids[b, :n], mask[b, :n], x[b, :n], h[b, :n] = f.input_ids, f.loss_mask, f.features, f.hidden
    batch = TrainBatch(ids.to(device), mask.to(device), x.to(device), h.to(device))
    if feats[0].topk_ids is not None:  # a top-k cache: p_t's top k at the supervised positions
        k = feats[0].topk_ids.shape[-1]
        tid, tp = torch.zeros(B, S, k, dtype=torch.int64), torch.zeros(B, S, k, dtype=torch.float32)
        for b, f in enumerate(feats):
            tid[b, :len(f)], tp[b, :len(f)] = f.topk_ids, f.topk_probs
        batch.target_topk_ids, batch.target_topk_probs = tid.to(device), tp.to(device)
    if anchored:  # anchors keyed by (seed, epoch, sample id): a batch may span epochs
        draws = [sample_anchors(f.loss_mask, num_anchors, recipe.train.seed, e, f.id)
                 for f, e in zip(feats, epochs)]
        batch.anchor_pos, batch.anchor_valid = pad_anchors(draws, device=device)
    return batch


# --------------------------------------------------------------------------- optimizer


def make_optimizer(model, recipe: Recipe, total_steps: int):
    o = recipe.optim
    opt = torch.optim.AdamW(param_groups(model, o.lr, o.lr_scale), lr=o.lr, betas=o.betas,
                            weight_decay=o.weight_decay)
    warmup = max(1, round(o.warmup_ratio * total_steps)) if o.warmup_ratio > 0 else 0

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)


# --------------------------------------------------------------------------- step metrics


@dataclass
class StepSums:
    """One optimizer step's metrics as this rank's device tensors (nothing reduced, no host sync):
    term numerators, τ stats, [supervised slots, supervised blocks], the global denominators."""

    sums: dict
    tau: TauSimMeter
    counts: torch.Tensor
    den: dict
    sequences: int
    lr: float = 0.0
    grad_norm: torch.Tensor | None = None


def _add_parts(acc: StepSums, parts: LossParts) -> None:
    for k, v in parts.sums.items():
        acc.sums[k] = acc.sums.get(k, 0) + v.detach()
    acc.tau.add(parts)
    acc.counts = acc.counts + torch.stack([parts.tokens, parts.blocks]).to(acc.counts.dtype)


def _empty_sums(objective, den: dict, device, sequences: int) -> StepSums:
    return StepSums({}, TauSimMeter(objective.block_size, device),
                    torch.zeros(2, dtype=torch.float64, device=device), den, sequences)


def _accumulate(objective, batches, den) -> StepSums:
    """The objective over micro-batches with the shared denominators `den`, without backward."""
    acc = _empty_sums(objective, den, batches[0].input_ids.device, 0)
    for b in batches:
        _add_parts(acc, objective(b, den))
    return acc


def _num_anchors(model) -> int:
    return int(getattr(model.config, "num_anchors", 0) or 1)


def _step_metrics(objective, acc: StepSums) -> dict:
    """Global loss parts (all-reduced: a collective) of one step."""
    keys = sorted(acc.sums)
    flat = all_reduce_sum(torch.cat([torch.stack([acc.sums[k].double() for k in keys]) if keys
                                     else acc.counts.new_zeros(0), acc.counts.double()]))
    tau = TauSimMeter(acc.tau.block_size, acc.counts.device)
    tau.load_sums(all_reduce_sum(acc.tau.sums()))
    out = _per_term(dict(zip(keys, flat[:-2].tolist())), acc.den)
    loss = sum((getattr(objective.loss_weights, k) * v for k, v in out.items()), 0.0)
    out.update(loss=loss, tokens=float(flat[-2]), sequences=acc.sequences, blocks=float(flat[-1]))
    if float(tau.blocks):
        out.update(tau_sim=tau.value(), c_star=[round(c, 5) for c in tau.per_position()["c_star"]])
    return out


def _per_term(sums: dict, den: dict) -> dict:
    """Each loss term's summed numerator over its global denominator."""
    return {k: float(v) / max(float(den[TERM_DENOMINATOR[k]]), 1e-12) for k, v in sums.items()}


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(s: Setup, recipe: Recipe, objective, info: DistInfo, held_feats) -> dict:
    """Held-out loss parts and simulated τ (teacher-forced, T = 1), on rank 0's copy."""
    if not held_feats:
        return {}
    mb = recipe.train.micro_batch
    batches = [collate(held_feats[i: i + mb], [EVAL_EPOCH] * len(held_feats[i: i + mb]), recipe,
                       objective.anchored, info.device, _num_anchors(s.model)) for i in range(0, len(held_feats), mb)]
    den = reduce_denominators([objective.denominators(b) for b in batches])
    acc = _accumulate(objective, batches, den)
    sums, tau = acc.sums, acc.tau
    out = {f"eval/{k}": v for k, v in _per_term(sums, den).items()}
    if float(tau.blocks):
        per = tau.per_position()
        out.update({"eval/tau_sim": tau.value(), "eval/tau_greedy": tau.greedy_value(),
                    "eval/c_star": [round(c, 5) for c in per["c_star"]],
                    "eval/greedy_survival": [round(c, 5) for c in per["greedy_survival"]]})
    return out


# --------------------------------------------------------------------------- the loop


def total_steps(recipe: Recipe, n_train: int) -> int:
    steps = recipe.train.epochs * math.ceil(n_train / recipe.train.global_batch)
    return min(steps, recipe.train.max_steps) if recipe.train.max_steps else steps


def train(recipe: Recipe, data: str, out: str | Path, cache: str | None = None, heldout: str | None = None,
          init_from: str | None = None, resume: bool = True, progress: bool = True, *,
          objective: ObjectiveFactory) -> Path:
    """Run (or resume) a training run; returns the final checkpoint dir. `objective` builds the
    recipe's drafter's objective (`draftsmith.drafters.get(recipe.drafter).build_objective`).
    `train.threads` holds for the run only: the caller's torch thread count is restored after."""
    threads = torch.get_num_threads()
    try:
        if recipe.train.threads:
            torch.set_num_threads(recipe.train.threads)
        return _train(recipe, data, out, cache, heldout, init_from, resume, progress, objective)
    finally:
        torch.set_num_threads(threads)


def _train(recipe: Recipe, data: str, out: str | Path, cache, heldout, init_from, resume: bool,
           progress: bool, build_objective: ObjectiveFactory) -> Path:
    started = time.time()
    info = init_distributed()
    if heldout:
        recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"heldout": heldout})})
    for flag, path in (("--data", data), ("--heldout", recipe.data.heldout)):
        if path and not Path(path).is_file():  # before the target load, which takes a while
            raise InputError(f"{flag} {path}: no such file")
    run = Path(out)
    resuming = resume and ckpt.latest_checkpoint(run) is not None
    if resuming:
        run_inputs.check_recipe(run, recipe)
    data_record = {}

    def check_data(d):  # before the feature cache is built: a resume must see the same data
        data_record.update(run_inputs.data_record(d, data))
        if resuming:
            run_inputs.check_data(run, data_record)

    torch.manual_seed(recipe.train.seed)
    s = build_setup(recipe, data, info, cache, init_from, progress and info.is_main, check_data,
                    store=run / STORE_DIR, replace_store=not resuming)
    trainer = build_trainer(recipe, s, info, build_objective)
    start, steps = trainer.resume(run, resume), trainer.steps
    if start >= steps:  # nothing to do; leave the run's files as they are
        log.info("%s is already at step %d (this recipe ends at step %d): nothing to train", run, start, steps)
        shutdown()
        return ckpt.latest_checkpoint(run)
    if info.is_main:
        _announce(run, s, recipe, data_record)
    metrics = trainer.metrics = MetricsLog(run, info.is_main, resume_step=start if start else None)
    metrics.log(start, {"compute": {"target_dtype": s.target_dtype.record(), "precision": s.precision.record()},
                        "loss_weights": trainer.objective.loss_weights.model_dump(),
                        "loss_average": trainer.objective.config.average})
    # held-out evaluation runs on rank 0; with FSDP2 every rank takes part (its forwards gather)
    held_feats = s.features(s.data.heldout) if info.is_main or trainer.sharded else []
    final, stop = trainer.fit(run, start, held_feats, progress, started)
    metrics.log(stop["step"], {"stopped_by": stop["by"], "elapsed_s": round(time.time() - started, 1)})
    metrics.close()
    barrier()
    shutdown()
    return final


def _announce(run: Path, s: Setup, recipe: Recipe, data_record: dict) -> None:
    """Log what the run trains with and record its inputs (recipe.json, data.json)."""
    for line in s.data.lines:
        log.info(line)
    log.info("target computes in %s (%s); draft trains in %s (%s)", s.target_dtype.name,
             s.target_dtype.reason, s.precision.name, s.precision.reason)
    if not s.data.heldout:
        log.warning("the held-out split is empty: eval/tau_sim will not be measured (raise "
                    "data.heldout_fraction or pass --heldout FILE)")
    run_inputs.write_inputs(run, recipe, data_record)


# --------------------------------------------------------------------------- the trainer


def _no_lap(phase: str) -> None:
    pass


class Trainer:
    """The state of one run: setup (target, data, draft, features), the objective (a module that
    owns the draft) and its data-parallel wrapper, optimizer, schedule, step.

    `train_step(step)` is one optimizer step and returns its metrics as device sums; `reduce`
    turns them into logged numbers (a collective: call it on every rank, on log steps only).
    `fit` is the loop: batches made one step ahead on a background thread, evaluation and
    checkpoints. `lap(phase)`, when given, is called after each phase of a step (gpu_check)."""

    def __init__(self, recipe: Recipe, s: Setup, info: DistInfo, objective, steps: int, prefetch: bool = True):
        self.recipe, self.s, self.info, self.objective = recipe, s, info, objective
        self.sharded = info.world > 1 and recipe.train.parallel == "fsdp2"
        if self.sharded:
            shard_objective(objective, info)
        self.ddp = wrap_ddp(objective) if info.world > 1 and not self.sharded else None
        self.params = [p for p in s.model.parameters() if p.requires_grad]
        self.steps, self.prefetch, self.step = steps, prefetch, 0
        self.opt, self.sched = make_optimizer(s.model, recipe, steps)
        self.metrics: MetricsLog | None = None

    # -- one step

    def batches(self, step: int, lap: Callable[[str], None] = _no_lap) -> list[TrainBatch]:
        """This rank's micro-batches of optimizer step `step` (features, then collate)."""
        t, s = self.recipe.train, self.s
        plan = step_samples(step, len(s.data.train), t.global_batch, t.seed)
        mine = plan[self.info.rank::self.info.world]
        out = []
        for i in range(0, len(mine), t.micro_batch):
            chunk = mine[i: i + t.micro_batch]
            feats = s.features([s.data.train[j] for j, _ in chunk])
            lap("features")
            out.append(collate(feats, [e for _, e in chunk], self.recipe, self.objective.anchored,
                               self.info.device, _num_anchors(s.model)))
            lap("collate")
        return out

    def train_step(self, step: int, batches: list[TrainBatch] | None = None,
                   lap: Callable[[str], None] = _no_lap) -> StepSums:
        """Forward/backward over this rank's micro-batches, clip, AdamW, LR schedule. p_t is
        computed when a loss term needs it (DSpark L1, Eagle3 soft CE) and otherwise (DFlash)
        only every `train.target_metrics_every` steps, for the tau_sim and c* metrics."""
        t = self.recipe.train
        self.objective.train()
        self.opt.zero_grad(set_to_none=True)
        if batches is None:
            batches = self.batches(step, lap)
        den = reduce_denominators([self.objective.denominators(b) for b in batches], all_reduce_sum)
        acc = _empty_sums(self.objective, den, self.info.device, t.global_batch)
        self._micro_steps(batches, acc, step % t.target_metrics_every == 0, lap)
        acc.grad_norm = grad_norm_and_clip(self.params, self.recipe.optim.grad_clip)
        acc.lr = self.sched.get_last_lr()[0]
        self.opt.step()
        self.sched.step()
        lap("optimizer")
        self.step = step + 1
        return acc

    def _micro_steps(self, batches, acc: StepSums, target_metrics: bool, lap) -> None:
        """Gradients accumulate over micro-batches; with DDP only the last one's backward
        all-reduces (bucket by bucket, as the gradients become ready) and the loss is scaled
        by W, since DDP averages over the ranks."""
        model = self.ddp if self.ddp is not None else self.objective
        scale = self.info.world if self.ddp is not None else 1
        for i, b in enumerate(batches):
            local = self.ddp is not None and i < len(batches) - 1
            with self.ddp.no_sync() if local else contextlib.nullcontext():
                with self._autocast():  # forward only: backward runs outside autocast
                    parts: LossParts = model(b, acc.den, target_metrics)
                lap("draft_fwd_loss")
                (parts.loss * scale if scale != 1 else parts.loss).backward()
                lap("backward")
            _add_parts(acc, parts)

    def _autocast(self):
        """bf16 autocast of the draft's forward where `train.precision` resolved to bf16."""
        return torch.autocast(self.info.device.type, dtype=torch.bfloat16, enabled=self.s.precision.name == "bf16")

    def reduce(self, acc: StepSums) -> dict:
        """The logged numbers of a step (a collective: every rank calls it)."""
        m = _step_metrics(self.objective, acc)
        m.update(lr=acc.lr, grad_norm=float(acc.grad_norm) if acc.grad_norm is not None else 0.0,
                 epoch=(self.step - 1) * self.recipe.train.global_batch / len(self.s.data.train))
        return m

    def evaluate(self, held_feats) -> dict:
        self.objective.eval()
        ev = evaluate(self.s, self.recipe, self.objective, self.info, held_feats)
        if self.sharded:
            self.objective.reshard()  # the root stays gathered after a no-grad forward
        return ev

    # -- the loop

    def fit(self, run: Path, start: int, held_feats, progress: bool, t0: float) -> tuple[Path, dict]:
        """Steps `start`..`steps`; `t0` = when the command started (the time budget counts from it).
        Returns the final checkpoint and {"step", "by"}: what stopped the run (max_steps or time_budget)."""
        t_cfg, main = self.recipe.train, self.info.is_main
        final, stop, shown = None, {"step": self.steps, "by": "max_steps"}, {}
        bar = tqdm(total=self.steps, initial=start, desc=f"train {self.recipe.drafter}", unit="step",
                   disable=not (progress and main), dynamic_ncols=True)
        feed = Prefetcher(self.batches, range(start, self.steps)) if self.prefetch else None
        try:
            for step in range(start, self.steps):
                tic = time.time()
                acc = self.train_step(step, feed.get(step) if feed is not None else None)
                done, over = step + 1, self._over_budget(t0)
                last = done == self.steps or over
                if done % t_cfg.log_every == 0 or last:
                    m = self.reduce(acc)
                    m["tokens_per_s"] = m["tokens"] / max(time.time() - tic, 1e-9)
                    shown["loss"] = f"{m['loss']:.3f}"
                    if main:
                        self.metrics.log(done, {f"train/{k}": v for k, v in m.items()})
                if (main or self.sharded) and (done % t_cfg.eval_every == 0 or last):
                    ev = self.evaluate(held_feats)
                    if ev:  # an empty held-out split has nothing to log (warned at the start)
                        self.metrics.log(done, ev)  # rank 0 only
                    bar.set_postfix(**shown, tau_sim=f"{ev.get('eval/tau_sim', 0):.2f}")
                if done % t_cfg.checkpoint_every == 0 or last:
                    final = self.save(run, done)
                bar.update(1)
                if over and done < self.steps:
                    log.warning("time budget of %g min reached at step %d of %d: stopped early (rerun the same "
                                "command to continue)", t_cfg.time_budget_min, done, self.steps)
                    stop = {"step": done, "by": "time_budget"}
                    break
        finally:
            if feed is not None:
                feed.close()
            bar.close()
        return final or ckpt.latest_checkpoint(run), stop

    def _over_budget(self, t0: float) -> bool:
        """Whether the time budget is spent — on any rank, so that every rank stops at one step."""
        budget = self.recipe.train.time_budget_min
        if budget is None:
            return False
        over = time.time() - t0 > 60 * budget
        return any_rank(over, self.info.device) if self.info.world > 1 else over

    # -- checkpoints

    def resume(self, run: Path, resume: bool) -> int:
        """Load RUN's latest checkpoint (if `resume`); returns the step to start from."""
        last = ckpt.latest_checkpoint(run) if resume else None
        if last is None:
            return 0
        from draftsmith.models.io import load_draft

        full = load_draft(last).state_dict()
        state = ckpt.load_state(last)
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions, set_model_state_dict, set_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.s.model, full, options=opts)
            set_optimizer_state_dict(self.s.model, self.opt, state["optimizer"], options=opts)
        else:
            self.s.model.load_state_dict(full)
            self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        log.info("resuming from %s (step %d)", last, state["step"])
        self.step = int(state["step"])
        saved = state.get("data_position")
        if saved is not None and saved != self.data_position(self.step):
            raise InputError(f"{last}: its data position {saved} is not where this run's data and batch put "
                             f"step {self.step} ({self.data_position(self.step)}); train into a new --out")
        return self.step

    def data_position(self, step: int) -> dict:
        """Where in the shuffled data a run stands after `step` optimizer steps: the next sample
        is sample `samples_seen mod samples` of epoch `samples_seen div samples`'s permutation
        (keyed by train.seed and the epoch only)."""
        seen, n = step * self.recipe.train.global_batch, len(self.s.data.train)
        return {"samples_seen": seen, "samples": n, "epoch": seen // n, "seed": self.recipe.train.seed}

    def save(self, run: Path, step: int) -> Path | None:
        """Rank 0 writes the plain draft's checkpoint; with FSDP2 every rank first takes part
        in the gathers."""
        model, optim_state, info = self.s.model, None, self.info
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            from draftsmith.models.io import build_draft

            full = full_model_state(self.s.model)
            optim_state = get_optimizer_state_dict(
                self.s.model, self.opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if info.is_main:
                model = build_draft(self.s.model.config)
                model.load_state_dict(full)
        if not info.is_main:
            barrier()
            return None
        state = {"step": step, "optimizer": optim_state if self.sharded else self.opt.state_dict(),
                 "scheduler": self.sched.state_dict(), "rng": ckpt.rng_state(), "world_size": info.world,
                 "data_position": self.data_position(step)}
        info_json = {"step": step, "drafter": self.recipe.drafter,
                     "loss_weights": self.objective.loss_weights.model_dump(),
                     "loss_average": self.objective.config.average}
        path = ckpt.save_checkpoint(run, step, model, state, self.recipe.train.keep_checkpoints, info_json)
        barrier()
        return path


def build_trainer(recipe: Recipe, s: Setup, info: DistInfo, build_objective: ObjectiveFactory,
                  steps: int | None = None, prefetch: bool | None = None) -> Trainer:
    """The one way a training step is built (the loop, bench/train_bench.py, bench/gpu_check.py):
    the drafter's objective around `s.model`, sharded or DDP-wrapped under torchrun, AdamW and its
    schedule over `steps` (default: the recipe's). `prefetch` (default: `train.prefetch`, whose
    auto is GPUs only) makes the next step's batches on a background thread; on a CPU that thread
    takes cores from the step itself (2-core AMD EPYC, bench/train_bench.py: no gain, ~170 MiB
    more peak memory)."""
    if prefetch is None:
        prefetch = recipe.train.prefetch if recipe.train.prefetch is not None else info.device.type == "cuda"
    config = ObjectiveConfig(chunk_size=recipe.train.loss_chunk, recompute=recipe.train.recompute,
                             loss_weights=recipe.loss.weights, average=recipe.loss.average)
    objective = build_objective(s.model, s.target.logits, config)
    return Trainer(recipe, s, info, objective, total_steps(recipe, len(s.data.train)) if steps is None else steps,
                   prefetch)


def run(args, objective_for: Callable[[str], ObjectiveFactory]) -> int:
    """`draftsmith train`; `objective_for(drafter name)` is the drafter registry's lookup (the
    CLI wires it: this stage does not know the drafters)."""
    check_output_dir(args.out, "--out")
    recipe = load_recipe(args.recipe, args.set)
    final = train(recipe, args.data, args.out, cache=args.cache, heldout=args.heldout,
                  init_from=args.init_from, resume=not args.no_resume, progress=not args.no_progress,
                  objective=objective_for(recipe.drafter))
    print(f"train: final checkpoint {final}")
    end = _stopped_by(Path(args.out))
    if end.get("stopped_by") == "time_budget":
        print(f"train: stopped by the time budget at step {end['step']} (the recipe's end was not reached; "
              f"rerun the same command to continue)")
    return 0


def _stopped_by(run: Path) -> dict:
    from draftsmith.train.metrics import read_metrics

    ends = [m for m in read_metrics(run) if "stopped_by" in m] if (run / "metrics.jsonl").is_file() else []
    return ends[-1] if ends else {}
