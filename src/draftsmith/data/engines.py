"""Local engines that `data regenerate --engine` starts for the user.

`llama-cpp`: a `llama-server` built from the pinned llama.cpp source (see
`draftsmith.engines.llama_cpp`), bound to 127.0.0.1, one slot unless `--slots N`, stopped on every
exit path (a kill -9 of draftsmith included: the server gets SIGKILL from the kernel).
A GGUF target is served as is; an HF dir is converted once to f16 GGUF with the converter of the
same llama.cpp source.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from draftsmith.engines import llama_cpp
from draftsmith.targets.resolve import resolve_target
from draftsmith.utils.io import InputError
from draftsmith.utils.paths import cache_root

log = logging.getLogger(__name__)


def target_gguf(target: str) -> Path:
    """A GGUF file llama-server can load for `target`."""
    source = resolve_target(target)
    if source.kind == "gguf":
        return source.gguf_path
    if source.kind == "hf_dir":
        out = cache_root() / "gguf" / f"{Path(source.path).name}-f16.gguf"
        if not out.is_file():
            log.info("converting %s to GGUF (f16) with llama.cpp's converter", source.path)
            llama_cpp.convert_hf_to_gguf(source.path, out, outtype="f16")
        return out
    raise InputError(f"target {target!r}: --engine llama-cpp needs a local GGUF file or HF dir "
                     "(hub ids are not downloaded here)")


@contextlib.contextmanager
def start_engine(args) -> Iterator[str]:
    """Start the engine named by `args.engine` for `args.target`; yield its base URL."""
    if args.engine != "llama-cpp":
        raise InputError(f"unknown engine {args.engine!r} (known: llama-cpp)")
    if not args.target:
        raise InputError("--engine llama-cpp needs --target (an alias, a .gguf file or an HF dir)")
    model = target_gguf(args.target)
    ctx = getattr(args, "ctx_size", None) or 4096
    with llama_cpp.LlamaServer(model, slots=args.slots, ctx_size=ctx * args.slots,
                               seed=getattr(args, "seed", None)) as server:
        log.info("llama-server for %s at %s (%d slot(s))", args.target, server.base_url, args.slots)
        yield server.base_url
