"""`draftsmith train`: the one train loop, for every drafter, on CPU or GPU, plain or torchrun.

    for step in steps:                       # one optimizer step = one global batch
        batch = this rank's share of the step's sequences, in micro-batches
        D = Σ denominators over micro-batches and ranks   (data only: validity, weights)
        for micro-batch: loss = Σ_local w·ℓ / D ; backward  (gradients accumulate)
        all-reduce(SUM) gradients ; clip ; AdamW ; warmup+cosine LR
        log, evaluate held-out τ_sim, checkpoint

Because every micro-batch is normalized by the global denominators, the summed gradient is the
global-batch gradient exactly, whatever the number of processes or micro-batches. Data
parallelism is an explicit bucketed all-reduce of the replicated parameters' gradients (gloo on
CPU, nccl on GPU) — the objective calls the draft's heads outside `forward`, which
`DistributedDataParallel`'s hooks do not support; with `parallel: fsdp2` the draft layers are
sharded by `fully_shard` (summing reduce-scatter) and the rest is all-reduced the same way.
The sample order is a permutation keyed by (seed, epoch); anchors by (seed, epoch, sample id).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable
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
    DistInfo, all_reduce_sum, barrier, full_model_state, grad_norm_and_clip, init_distributed, shard_layers,
    shutdown,
)
from draftsmith.train.recipe import Recipe, load_recipe
from draftsmith.train.setup import Setup, build_setup
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
    if anchored:  # anchors keyed by (seed, epoch, sample id): a batch may span epochs
        draws = [sample_anchors(f.loss_mask, num_anchors, recipe.train.seed, e, f.id)
                 for f, e in zip(feats, epochs)]
        batch.anchor_pos, batch.anchor_valid = pad_anchors(draws, device=device)
    return batch


# --------------------------------------------------------------------------- optimizer


def make_optimizer(model, recipe: Recipe, total_steps: int):
    params = [p for p in model.parameters() if p.requires_grad]
    o = recipe.optim
    opt = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    warmup = max(1, round(o.warmup_ratio * total_steps)) if o.warmup_ratio > 0 else 0

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)


def all_reduce_grads(params: list[torch.Tensor]) -> None:
    """Sum the replicated parameters' gradients over ranks in one flat bucket (no-op on one
    process); FSDP2-sharded gradients are already reduce-scattered as sums."""
    grads = [p.grad for p in params if p.grad is not None and not hasattr(p.grad, "placements")]
    if not grads:
        return
    flat = all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]))
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


# --------------------------------------------------------------------------- one step


def train_step(step: int, s: Setup, recipe: Recipe, objective, params, info: DistInfo) -> dict:
    """One optimizer step's forward/backward over this rank's micro-batches; returns metrics.
    p_t is computed when a loss term needs it (DSpark L1, Eagle3 soft CE) and otherwise (DFlash)
    only every `train.target_metrics_every` steps, for the train/tau_sim and c* metrics."""
    plan = step_samples(step, len(s.data.train), recipe.train.global_batch, recipe.train.seed)
    mine = plan[info.rank::info.world]
    mb = recipe.train.micro_batch
    batches = []
    for i in range(0, len(mine), mb):
        chunk = mine[i: i + mb]
        feats = s.features([s.data.train[j] for j, _ in chunk])
        batches.append(collate(feats, [e for _, e in chunk], recipe, objective.anchored, info.device,
                               _num_anchors(s)))
    den = reduce_denominators([objective.denominators(b) for b in batches], all_reduce_sum)
    sums, tau, counts = _accumulate(objective, batches, den, backward=True,
                                    autocast=lambda: _autocast(s, info),
                                    target_metrics=step % recipe.train.target_metrics_every == 0)
    all_reduce_grads(params)
    return _step_metrics(objective, sums, den, tau, counts, len(plan))


def _accumulate(objective, batches, den, backward: bool, autocast=contextlib.nullcontext,
                target_metrics: bool = True):
    """Run the objective over micro-batches with the shared denominators `den`: summed term
    numerators, τ stats and [supervised slots, supervised blocks] (backward per micro-batch when
    training)."""
    sums, tau = {}, TauSimMeter(objective.block_size, batches[0].input_ids.device)
    tokens = torch.zeros((), device=batches[0].input_ids.device)
    blocks = torch.zeros((), device=batches[0].input_ids.device)
    for b in batches:
        with autocast():  # forward only: backward runs outside autocast
            parts: LossParts = objective(b, den, target_metrics)
        if backward:
            parts.loss.backward()
        for k, v in parts.sums.items():
            sums[k] = sums.get(k, 0) + v.detach()
        tau.add(parts)
        tokens = tokens + parts.tokens
        blocks = blocks + parts.blocks
    return sums, tau, torch.stack([tokens, blocks])


def _num_anchors(s: Setup) -> int:
    return int(getattr(s.model.config, "num_anchors", 0) or 1)


def _autocast(s: Setup, info: DistInfo):
    """bf16 autocast of the draft's forward where `train.precision` resolved to bf16."""
    return torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=s.precision.name == "bf16")


def _step_metrics(objective, sums: dict, den: dict, tau: TauSimMeter, counts, sequences: int) -> dict:
    """Global loss parts (all-reduced) of one step; counts = [supervised slots, blocks]."""
    keys = sorted(sums)
    flat = all_reduce_sum(torch.stack([sums[k].double() for k in keys] + list(counts.double())))
    tau.load_sums(all_reduce_sum(tau.sums()))
    out = {}
    loss = 0.0
    for k, v in zip(keys, flat[:-2].tolist()):
        out[k] = v / max(float(den[TERM_DENOMINATOR[k]]), 1e-12)
        loss += getattr(objective.loss_weights, k) * out[k]
    out.update(loss=loss, tokens=float(flat[-2]), sequences=sequences, blocks=float(flat[-1]))
    if float(tau.blocks):
        out.update(tau_sim=tau.value(), c_star=[round(c, 5) for c in tau.per_position()["c_star"]])
    return out


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(s: Setup, recipe: Recipe, objective, info: DistInfo, held_feats) -> dict:
    """Held-out loss parts and simulated τ (teacher-forced, T = 1), on rank 0's copy."""
    if not held_feats:
        return {}
    mb = recipe.train.micro_batch
    batches = [collate(held_feats[i: i + mb], [EVAL_EPOCH] * len(held_feats[i: i + mb]), recipe,
                       objective.anchored, info.device, _num_anchors(s)) for i in range(0, len(held_feats), mb)]
    den = reduce_denominators([objective.denominators(b) for b in batches])
    sums, tau, _ = _accumulate(objective, batches, den, backward=False)
    out = {f"eval/{k}": float(v) / max(float(den[TERM_DENOMINATOR[k]]), 1e-12) for k, v in sums.items()}
    if float(tau.blocks):
        per = tau.per_position()
        out.update({"eval/tau_sim": tau.value(), "eval/tau_greedy": tau.greedy_value(),
                    "eval/c_star": [round(c, 5) for c in per["c_star"]]})
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
    s = build_setup(recipe, data, info, cache, init_from, progress and info.is_main, check_data)
    sharded = info.world > 1 and recipe.train.parallel == "fsdp2"
    if sharded:
        shard_layers(s.model, info)
    objective = build_objective(s.model, s.target.logits, ObjectiveConfig(chunk_size=recipe.train.loss_chunk,
                                                                           recompute=recipe.train.recompute))
    params = [p for p in s.model.parameters() if p.requires_grad]
    steps = total_steps(recipe, len(s.data.train))
    opt, sched = make_optimizer(s.model, recipe, steps)
    start = _maybe_resume(run, s, opt, sched, resume, sharded)
    if start >= steps:  # nothing to do; leave the run's files as they are
        log.info("%s is already at step %d (this recipe ends at step %d): nothing to train", run, start, steps)
        shutdown()
        return ckpt.latest_checkpoint(run)
    if info.is_main:
        _announce(run, s, recipe, data_record)
    metrics = MetricsLog(run, info.is_main, resume_step=start if start else None)
    metrics.log(start, {"compute": {"target_dtype": s.target_dtype.record(), "precision": s.precision.record()}})
    # held-out evaluation runs on rank 0; with FSDP2 every rank takes part (its forwards gather)
    held_feats = s.features(s.data.heldout) if info.is_main or sharded else []
    final, stop = _loop(run, s, recipe, objective, params, opt, sched, info, start, steps, metrics,
                        held_feats, progress, started, sharded)
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


def _maybe_resume(run: Path, s: Setup, opt, sched, resume: bool, sharded: bool) -> int:
    last = ckpt.latest_checkpoint(run) if resume else None
    if last is None:
        return 0
    from draftsmith.models.io import load_draft

    full = load_draft(last).state_dict()
    state = ckpt.load_state(last)
    if sharded:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, set_model_state_dict, set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(s.model, full, options=opts)
        set_optimizer_state_dict(s.model, opt, state["optimizer"], options=opts)
    else:
        s.model.load_state_dict(full)
        opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    ckpt.set_rng_state(state["rng"])
    log.info("resuming from %s (step %d)", last, state["step"])
    return int(state["step"])


def _loop(run, s: Setup, recipe: Recipe, objective, params, opt, sched, info, start, steps, metrics,
          held_feats, progress, t0: float, sharded: bool = False) -> tuple[Path, dict]:
    """Steps `start`..`steps`; `t0` = when the command started (the time budget counts from it).
    Returns the final checkpoint and {"step", "by"}: what stopped the run (max_steps or time_budget)."""
    t_cfg = recipe.train
    final, stop = None, {"step": steps, "by": "max_steps"}
    bar = tqdm(total=steps, initial=start, desc=f"train {recipe.drafter}", unit="step",
               disable=not (progress and info.is_main), dynamic_ncols=True)
    for step in range(start, steps):
        tic = time.time()
        s.model.train()
        opt.zero_grad(set_to_none=True)
        m = train_step(step, s, recipe, objective, params, info)
        gnorm = grad_norm_and_clip(params, recipe.optim.grad_clip)
        m.update(lr=sched.get_last_lr()[0], grad_norm=float(gnorm), epoch=step * t_cfg.global_batch / len(s.data.train),
                 tokens_per_s=m["tokens"] / max(time.time() - tic, 1e-9))
        opt.step()
        sched.step()
        done = step + 1
        over = t_cfg.time_budget_min is not None and time.time() - t0 > 60 * t_cfg.time_budget_min
        last = done == steps or over
        if info.is_main and (done % t_cfg.log_every == 0 or last):
            metrics.log(done, {f"train/{k}": v for k, v in m.items()})
        if (info.is_main or sharded) and (done % t_cfg.eval_every == 0 or last):
            s.model.eval()
            ev = evaluate(s, recipe, objective, info, held_feats)
            if ev:  # an empty held-out split has nothing to log (warned at the start)
                metrics.log(done, ev)  # rank 0 only
            bar.set_postfix(loss=f"{m['loss']:.3f}", tau_sim=f"{ev.get('eval/tau_sim', 0):.2f}")
        if done % t_cfg.checkpoint_every == 0 or last:
            final = _save(run, done, s, opt, sched, info, t_cfg.keep_checkpoints, sharded)
        bar.update(1)
        if over and done < steps:
            log.warning("time budget of %g min reached at step %d of %d: stopped early (rerun the same "
                        "command to continue)", t_cfg.time_budget_min, done, steps)
            stop = {"step": done, "by": "time_budget"}
            break
    bar.close()
    return final or ckpt.latest_checkpoint(run), stop


def _save(run, step, s: Setup, opt, sched, info, keep, sharded: bool = False) -> Path | None:
    """Rank 0 writes the checkpoint; with FSDP2 every rank first takes part in the gathers."""
    model, optim_state = s.model, None
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        from draftsmith.models.io import build_draft

        full = full_model_state(s.model)
        optim_state = get_optimizer_state_dict(
            s.model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if info.is_main:
            model = build_draft(s.model.config)
            model.load_state_dict(full)
    if not info.is_main:
        barrier()
        return None
    state = {"step": step, "optimizer": optim_state if sharded else opt.state_dict(),
             "scheduler": sched.state_dict(), "rng": ckpt.rng_state(), "world_size": info.world}
    path = ckpt.save_checkpoint(run, step, model, state, keep)
    barrier()
    return path


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
