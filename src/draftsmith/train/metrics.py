"""Training metrics: one JSON line per event in RUN/metrics.jsonl, mirrored to tensorboard."""

from __future__ import annotations

import json
import os
from pathlib import Path


class MetricsLog:
    """Append-only JSONL (+ tensorboard scalars). Only rank 0 writes.

    On resume the file is cut back to the records at or before the resumed step, so the log of a
    resumed run reads exactly like an uninterrupted one.
    """

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None = None):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.f = open(self.path, "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)
        except ImportError:  # tensorboard is a dependency; keep training if it is broken
            self.tb = None

    def _truncate_after(self, step: int) -> None:
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break  # a torn last line from a kill
            # the end marker of an earlier invocation is not part of the resumed run's log
            if record.get("step", 0) <= step and "stopped_by" not in record:
                keep.append(line)
        self.path.write_text("".join(k + "\n" for k in keep), encoding="utf-8")

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.f.write(json.dumps({"step": step, **values}) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, step)
                elif isinstance(v, list):
                    for i, x in enumerate(v):
                        if isinstance(x, (int, float)):
                            self.tb.add_scalar(f"{k}/{i}", x, step)

    def close(self) -> None:
        if self.enabled:
            self.f.close()
            if self.tb is not None:
                self.tb.close()


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
