"""The confidence-head calibration stored with a draft checkpoint (`DRAFT/calibration.json`).

Sequential Temperature Scaling (DESIGN §3.5) gives one temperature per draft position; slot k's
calibrated per-step acceptance is σ(c_k / T_k) and the calibrated survival of the first k slots
is Π_{i≤k} σ(c_i / T_i). The temperatures are only valid at the decoding temperature they were
fitted at (c* is a T = 1 quantity, acceptance is not), so the file records it and readers refuse
a mismatch unless told otherwise.

    {"format": "draftsmith-calibration", "version": 1, "decoding_temperature": 0.0,
     "sts_temperatures": [T_1, ..., T_γ], "rounds": N, "metrics": {...}, "fitted_on": {...}}

Fitting lives in `draftsmith.eval.calibration`; this module only reads and writes the file, so
eval, spec, export and serve can use it without importing each other.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from draftsmith.utils.io import InputError, atomic_write_json

CALIBRATION_FILE = "calibration.json"
CALIBRATION_FORMAT = "draftsmith-calibration"
CALIBRATION_VERSION = 1


@dataclass
class Calibration:
    decoding_temperature: float
    sts_temperatures: list[float]
    rounds: int = 0  # held-out row-rounds it was fitted on
    metrics: dict = field(default_factory=dict)  # per-position ECE/AUROC/Brier before and after
    fitted_on: dict = field(default_factory=dict)  # datasets, target, sampling, ...

    def to_json(self) -> dict:
        return {"format": CALIBRATION_FORMAT, "version": CALIBRATION_VERSION,
                "decoding_temperature": self.decoding_temperature,
                "sts_temperatures": list(self.sts_temperatures), "rounds": self.rounds,
                "metrics": self.metrics, "fitted_on": self.fitted_on}

    def temperatures_for(self, temperature: float, where: str = "") -> list[float]:
        """The STS temperatures, checked against the decoding temperature they will be used at."""
        if not math.isclose(temperature, self.decoding_temperature, abs_tol=1e-6):
            raise InputError(f"{where or CALIBRATION_FILE}: fitted at decoding temperature "
                             f"{self.decoding_temperature:g}, used at {temperature:g}; refit with "
                             f"`draftsmith calibrate --temperature {temperature:g}`")
        return list(self.sts_temperatures)


def save_calibration(draft_dir: str | os.PathLike, calibration: Calibration) -> Path:
    """Write `calibration.json` into the draft dir (atomic)."""
    path = Path(draft_dir) / CALIBRATION_FILE
    atomic_write_json(path, calibration.to_json())
    return path


def load_calibration(draft_dir: str | os.PathLike) -> Calibration | None:
    """The draft's calibration, None when it has none; a malformed file raises InputError
    naming the file and the field."""
    path = Path(draft_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT:
        raise InputError(f"{path}: field 'format' must be {CALIBRATION_FORMAT!r}")
    if data.get("version") != CALIBRATION_VERSION:
        raise InputError(f"{path}: field 'version' is {data.get('version')!r}; this draftsmith "
                         f"reads version {CALIBRATION_VERSION}")
    temps = data.get("sts_temperatures")
    if (not isinstance(temps, list) or not temps
            or not all(isinstance(t, (int, float)) and t > 0 and math.isfinite(t) for t in temps)):
        raise InputError(f"{path}: field 'sts_temperatures' must be a non-empty list of positive numbers")
    t = data.get("decoding_temperature")
    if not isinstance(t, (int, float)) or t < 0:
        raise InputError(f"{path}: field 'decoding_temperature' must be a number >= 0")
    return Calibration(float(t), [float(x) for x in temps], int(data.get("rounds", 0)),
                       dict(data.get("metrics", {})), dict(data.get("fitted_on", {})))
