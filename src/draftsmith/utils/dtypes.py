"""Compute dtypes that suit the machine: `auto` picks bf16 only where the hardware runs it natively.

On a CPU, bf16 matmuls are fast only with AMX or AVX512-BF16; elsewhere PyTorch emulates them
(measured by the filer of issue 13 on a 2-core AMD EPYC with AVX2 only, SmolLM2-135M's body on 4×256 tokens: fp32 587
tok/s, bf16 80 tok/s; on a 2-core AMD EPYC with AVX512-BF16, the body plus the head on 64 rows, one 768-token sample
per forward: fp32 623-652 tok/s, bf16 1062). On CUDA, bf16 is native from Ampere on. Storage dtypes (caches, exports)
are another matter and are never chosen here.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass

import torch

TORCH = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


@dataclass(frozen=True)
class ComputeDtype:
    name: str  # fp32 | bf16 | fp16 | fp64
    reason: str  # why it was chosen, for the log and metrics

    @property
    def torch(self) -> torch.dtype:
        return TORCH[self.name]

    def record(self) -> dict:
        return {"dtype": self.name, "reason": self.reason}


def _cpuinfo_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    """This CPU as timings should name it: model name, cores, torch's capability (e.g.
    "AMD EPYC, 2 cores, AVX2")."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}"


@functools.lru_cache(maxsize=1)
def cpu_bf16_support() -> tuple[bool, str]:
    """(native bf16 on this CPU?, what the decision rests on)."""
    cap = torch.backends.cpu.get_cpu_capability()
    probes = {"AMX": getattr(torch.cpu, "_is_amx_tile_supported", None),
              "AVX512-BF16": getattr(torch.cpu, "_is_avx512_bf16_supported", None)}
    flags = _cpuinfo_flags()
    found = [name for name, probe in probes.items() if probe is not None and probe()]
    found += [name for name, flag in (("AMX", "amx_bf16"), ("AVX512-BF16", "avx512_bf16"))
              if flag in flags and name not in found]
    if found:
        return True, f"CPU has {' and '.join(found)} (torch capability {cap})"
    return False, f"CPU has no AMX or AVX512-BF16 (torch capability {cap}): bf16 would be emulated"


def resolve(want: str, device: torch.device | str = "cpu") -> ComputeDtype:
    """`want` (auto | fp32 | bf16 | fp16 | fp64) -> the dtype to compute in, with the reason."""
    if want != "auto":
        if want not in TORCH:
            raise ValueError(f"unknown compute dtype {want!r}; choose auto, {', '.join(TORCH)}")
        return ComputeDtype(want, "set explicitly")
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return ComputeDtype("bf16", f"auto: {torch.cuda.get_device_name(device)} runs bf16 natively")
        return ComputeDtype("fp32", "auto: this GPU has no native bf16")
    if device.type != "cpu":
        return ComputeDtype("fp32", f"auto: fp32 on {device.type}")
    native, why = cpu_bf16_support()
    return ComputeDtype("bf16" if native else "fp32", f"auto: {why}")
