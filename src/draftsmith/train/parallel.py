"""Process groups for `torchrun`: DDP with gloo on CPU / nccl on GPU, or FSDP2 (`fully_shard`).

Launched plainly, everything here is a no-op on one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the torchrun process group (if launched by torchrun) and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return DistInfo(rank, world, local, device)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place on a copy); identity on one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shard_objective(objective: nn.Module, info: DistInfo) -> list[nn.Module]:
    """FSDP2: shard each draft decoder layer (`draft.layers`, or Eagle3's `midlayer`) with
    `fully_shard`, then the objective itself (the root: the draft's other trainable parameters,
    fc, norms and heads, which the objective's forward uses), gradients reduce-scattered as SUMS
    (the loss is already normalized over the global batch). Returns the sharded modules."""
    from torch.distributed.fsdp import fully_shard

    draft = objective.draft
    layers = list(getattr(draft, "layers", None) or [draft.midlayer])
    frozen = {p for p in objective.parameters() if not p.requires_grad}  # target copies: stay replicated
    for module in [*layers, objective]:
        fully_shard(module, ignored_params=frozen if module is objective else None)
        module.set_gradient_divide_factor(1.0)  # sums, not means
        module.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (gloo has no PREMUL_SUM)
    return layers + [objective]


def wrap_ddp(objective: nn.Module, bucket_cap_mb: float | None = None) -> nn.Module:
    """`DistributedDataParallel(objective)`: gradients all-reduced in buckets by hooks that fire
    during backward (overlapping it), as MEANS over the ranks (the caller scales the loss by W).
    Buffers are constants (vocabulary maps): synced once at construction, not at every forward."""
    from torch.nn.parallel import DistributedDataParallel

    kw = {} if bucket_cap_mb is None else {"bucket_cap_mb": bucket_cap_mb}
    return DistributedDataParallel(objective, forward_sync_buffers=False,
                                   find_unused_parameters=bool(getattr(objective, "may_skip_params", False)), **kw)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when `flag` is True on any rank (one tiny all-reduce; plain value on one process)."""
    return bool(all_reduce_sum(torch.tensor(float(flag), device=device)) > 0)


def is_sharded(t: torch.Tensor) -> bool:
    return hasattr(t, "placements")  # a DTensor


def grad_norm_and_clip(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Total L2 norm of the gradients (replicated and FSDP2-sharded alike), then clip to max_norm.
    Stays on the device (no host sync): returns the norm as a float64 0-d tensor."""
    local, shard = None, None
    for p in params:
        if p.grad is None:
            continue
        g = p.grad.to_local() if is_sharded(p.grad) else p.grad
        sq = g.double().pow(2).sum()
        if is_sharded(p.grad):
            shard = sq if shard is None else shard + sq
        else:
            local = sq if local is None else local + sq
    if local is None and shard is None:
        return torch.zeros((), dtype=torch.float64)
    ref = local if local is not None else shard
    total = (ref.new_zeros(()) if local is None else local) + (
        all_reduce_sum(shard) if shard is not None else ref.new_zeros(()))
    total = total.sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)  # 1.0 (exact) when under the limit
    for p in params:
        if p.grad is not None:
            g = p.grad.to_local() if is_sharded(p.grad) else p.grad
            g.mul_(scale.to(g.dtype))
    return total


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict on every rank (collective when sharded), on CPU."""
    return {k: (v.full_tensor() if is_sharded(v) else v).detach().cpu() for k, v in model.state_dict().items()}


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
