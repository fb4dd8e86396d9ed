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


def shard_layers(model: nn.Module, info: DistInfo) -> list[nn.Module]:
    """FSDP2: shard each draft decoder layer (`model.layers`, or Eagle3's `midlayer`) over the
    ranks with `fully_shard`, gradients reduce-scattered as SUMS (the loss is already normalized
    over the global batch). The rest (fc, norms, heads) stays replicated and is all-reduced by
    the loop. Returns the sharded modules."""
    from torch.distributed.fsdp import fully_shard

    layers = list(getattr(model, "layers", None) or [model.midlayer])
    for layer in layers:
        fully_shard(layer)
        layer.set_gradient_divide_factor(1.0)  # sums, not means
        layer.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (gloo has no PREMUL_SUM)
    return layers


def is_sharded(t: torch.Tensor) -> bool:
    return hasattr(t, "placements")  # a DTensor


def grad_norm_and_clip(params: list[torch.Tensor], max_norm: float) -> float:
    """Total L2 norm of the gradients (replicated and FSDP2-sharded alike), then clip to max_norm."""
    local = torch.zeros((), dtype=torch.float64)
    shard = torch.zeros((), dtype=torch.float64)
    for p in params:
        if p.grad is None:
            continue
        if is_sharded(p.grad):
            shard += p.grad.to_local().double().pow(2).sum().cpu()
        else:
            local += p.grad.double().pow(2).sum().cpu()
    total = float((local + all_reduce_sum(shard)).sqrt())
    scale = max_norm / (total + 1e-6)
    if scale < 1:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)
    return total


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict on every rank (collective when sharded), on CPU."""
    return {k: (v.full_tensor() if is_sharded(v) else v).detach().cpu() for k, v in model.state_dict().items()}


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
