"""Checkpoints: `RUN/step_N/` is a loadable draft dir (config.json + model.safetensors, written by
`draftsmith.models.io.write_draft_files`) plus ONE `training_state.pt` for exact resume (optimizer,
scheduler, RNG, data position) — gathered to rank 0, not one file per rank — and
`training.json`, how the draft was trained (drafter, the loss weights in force).

`RUN/step_latest` is a symlink to the newest complete step dir, swapped atomically. A step dir is
assembled in a temporary sibling and renamed into place, so a kill never leaves a half checkpoint
that resume would pick up. `training_state.pt` holds only tensors and plain values and is read
back with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from draftsmith.models.io import write_draft_files
from draftsmith.utils.io import InputError, atomic_dir, has_marker

STATE_FILE = "training_state.pt"
TRAINING_FILE = "training.json"
LATEST = "step_latest"
STEP_RE = re.compile(r"^step_(\d+)$")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_pos": random.getstate()[2], "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
             "numpy_pos": int(np.random.get_state()[2])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, state: dict, keep: int,
                    info: dict | None = None) -> Path:
    """Write RUN/step_{step} atomically, point step_latest at it, prune old step dirs. An existing
    step dir is replaced only when it is a checkpoint (holds training_state.pt) or empty. `info`
    (how the draft was trained: step, loss weights) goes to step_N/training.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"step_{step}"
    with atomic_dir(final, marker=STATE_FILE) as staged:
        write_draft_files(model, staged)
        torch.save(state, staged / STATE_FILE)
        if info is not None:
            (staged / TRAINING_FILE).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        for f in staged.iterdir():
            f.chmod(0o644)
    link_tmp = run_dir / f".{LATEST}.tmp"
    if link_tmp.is_symlink() or link_tmp.exists():
        link_tmp.unlink()
    link_tmp.symlink_to(final.name)
    os.replace(link_tmp, run_dir / LATEST)
    _prune(run_dir, keep)
    return final


def _prune(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (step dirs holding a training state: ours)."""
    steps = sorted((int(m.group(1)), p) for p in run_dir.iterdir()
                   if (m := STEP_RE.match(p.name)) and p.is_dir() and has_marker(p, STATE_FILE))
    for _, path in steps[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest step dir that holds a training state, or None."""
    link = run_dir / LATEST
    if link.exists() and (link.resolve() / STATE_FILE).is_file():
        return link.resolve()
    steps = sorted((int(m.group(1)), p) for p in run_dir.iterdir()
                   if (m := STEP_RE.match(p.name)) and (p / STATE_FILE).is_file()) if run_dir.is_dir() else []
    return steps[-1][1] if steps else None


def load_state(step_dir: Path) -> dict:
    path = step_dir / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as e:
        raise InputError(f"{path}: cannot read the training state ({e})") from None
