"""Does DDP's gradient all-reduce overlap the backward? A 2-process check of the loop's own step.

    .venv/bin/python -m torch.distributed.run --standalone --nproc_per_node=2 bench/ddp_overlap.py \
        [--recipe smollm2-135m/dspark] [--bucket-mb 25] [--data FILE]

Builds the run with the loop's `build_trainer` (DDP around the objective under torchrun), registers a
comm hook on its DDP that stamps when each gradient bucket's all-reduce is launched and when it
completes, and times each micro-batch's backward through the step's `lap` hook. It prints, for the
last step, every bucket's launch and completion relative to the end of the backward that synced
(negative = during the backward), and how many launches came from the micro-batches under
`no_sync()` (must be 0).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from draftsmith.drafters import objective_for
from draftsmith.train import loop
from draftsmith.train.parallel import init_distributed, shutdown
from draftsmith.train.recipe import load_recipe
from draftsmith.train.setup import build_setup


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="smollm2-135m/dspark")
    p.add_argument("--data", default="../shared/data/sharegpt-smollm2-regen.jsonl")
    p.add_argument("--bucket-mb", type=float, default=None, help="DDP bucket_cap_mb (default: DDP's 25)")
    p.add_argument("--steps", type=int, default=2)
    a = p.parse_args()
    recipe = load_recipe(a.recipe, ["data.limit=64", "train.threads=1", "train.micro_batch=2",
                                    "train.global_batch=8", "features.mode=cache"])
    info = init_distributed()
    torch.set_num_threads(1)
    s = build_setup(recipe, a.data, info, progress=False)
    trainer = loop.build_trainer(recipe, s, info, objective_for(recipe.drafter), a.steps, prefetch=False)
    if a.bucket_mb is not None:  # re-wrap with the asked bucket size
        from draftsmith.train.parallel import wrap_ddp

        trainer.ddp = wrap_ddp(trainer.objective, a.bucket_mb)
    events: list[tuple[str, float, int]] = []

    def hook(state, bucket):
        events.append(("launch", time.perf_counter(), bucket.buffer().numel()))
        fut = default_hooks.allreduce_hook(None, bucket)

        def done(f):
            events.append(("done", time.perf_counter(), bucket.buffer().numel()))
            return f.value()

        return fut.then(done)

    trainer.ddp.register_comm_hook(None, hook)
    for step in range(a.steps):
        events.clear()
        laps: list[tuple[str, float]] = []
        trainer.train_step(step, lap=lambda phase: laps.append((phase, time.perf_counter())))
    report(info.rank, laps, events)
    shutdown()
    return 0


def report(rank: int, laps, events) -> None:
    """Bucket launches/completions relative to the synced backward's end (last step)."""
    ends = [t for ph, t in laps if ph == "backward"]
    starts = [t for ph, t in laps if ph == "draft_fwd_loss"]
    b0, b1 = starts[-1], ends[-1]  # the last micro-batch's backward: the one that syncs
    early = sum(1 for kind, t, _ in events if kind == "launch" and t < b0)
    lines = [f"rank {rank}: {len(ends)} micro-batches; synced backward {1e3 * (b1 - b0):.1f} ms; "
             f"launches during no_sync micro-batches: {early}"]
    for kind, t, n in events:
        lines.append(f"  {kind:6} bucket of {n:>9} grads at {1e3 * (t - b1):+8.1f} ms from the backward's end")
    for r in range(dist.get_world_size()):
        if r == rank:
            print("\n".join(lines), flush=True)
        dist.barrier()


if __name__ == "__main__":
    raise SystemExit(main())
