"""Resume only the run that was started: same recipe (up to the keys a user may change on a
resume) and the same data, checked before any heavy work.

`RUN/recipe.json` records the recipe the run trains with (exports read it too); `RUN/data.json`
records a sha256 of the rendered training and held-out samples (ids, token ids, loss
masks). A rerun of `train --out RUN` with other inputs is an error that says what differs.
"""

from __future__ import annotations

import json
from pathlib import Path

from draftsmith.data.templates import samples_sha256
from draftsmith.train.dataset import TrainData
from draftsmith.train.recipe import Recipe
from draftsmith.utils.io import InputError, atomic_write_json

RECIPE_FILE = "recipe.json"
DATA_FILE = "data.json"
DATA_FORMAT = 1
# keys a resume may change: how long to run, how often to log / evaluate / save, threads, where
# the cache lives (its content is checked by the cache itself), where the held-out file lives
# (its content is in the data fingerprint)
RESUMABLE_KEYS = {
    "train.max_steps", "train.time_budget_min", "train.eval_every", "train.log_every",
    "train.checkpoint_every", "train.keep_checkpoints", "train.threads", "train.prefetch", "train.target_metrics_every",
    "features.cache_dir", "data.heldout", "notes",
}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):  # an empty section adds no key
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def recipe_differences(old: dict, new: dict) -> list[str]:
    """`key: old -> new` for every key that differs and a resume may not change."""
    # a key the old recipe lacks (a run from before the key existed) holds its default
    defaults = _flatten(Recipe(drafter=new["drafter"]).model_dump(mode="json"))
    a, b = {**defaults, **_flatten(old)}, _flatten(new)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in RESUMABLE_KEYS or a.get(key) == b.get(key):
            continue
        diffs.append(f"{key}: {a.get(key, '(unset)')!r} -> {b.get(key, '(unset)')!r}")
    return diffs


def data_record(data: TrainData, data_path: str) -> dict:
    return {"format": DATA_FORMAT, "data": str(data_path), "train_records": len(data.train),
            "heldout_records": len(data.heldout), "train": samples_sha256(data.train),
            "heldout": samples_sha256(data.heldout)}


def _fix(run: Path) -> str:
    return (f"rerun with the run's original inputs, pass --no-resume to start {run} over, or "
            f"choose another --out")


def _recorded(run: Path, name: str) -> dict | None:
    """RUN/name as JSON, None when the run has none (InputError when unreadable)."""
    path = run / name
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: unreadable ({e}); {_fix(run)}") from None


def check_recipe(run: Path, recipe: Recipe) -> None:
    """Before anything heavy: the recipe of an existing run must match `recipe`."""
    old = _recorded(run, RECIPE_FILE)
    if old is None:
        return
    diffs = recipe_differences(old, recipe.model_dump(mode="json"))
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; … {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise InputError(f"--out {run}: this run was started with another recipe ({shown}); {_fix(run)}")


def check_data(run: Path, record: dict) -> None:
    """After rendering the data: its fingerprint must match the one the run started with."""
    old = _recorded(run, DATA_FILE)
    if old is None:
        return
    diffs = [f"{k}: {old.get(k)!r} -> {record[k]!r}"
             for k in ("train_records", "heldout_records", "train", "heldout") if old.get(k) != record[k]]
    if diffs:
        raise InputError(f"--out {run}: this run was started with other data ({old.get('data')}; now "
                         f"{record['data']}): {'; '.join(diffs)}; {_fix(run)}")


def write_inputs(run: Path, recipe: Recipe, record: dict) -> None:
    atomic_write_json(run / RECIPE_FILE, recipe.model_dump(mode="json"))
    atomic_write_json(run / DATA_FILE, record)
