"""Metrics to WORKDIR/metrics.jsonl (one JSON object per log step) and TensorBoard."""

from __future__ import annotations

import json
import math

import jax

from fmjax import storage


class MetricsWriter:
    """Writes on process 0 only; other processes get a writer that does nothing."""

    def __init__(self, workdir: str, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = storage.join(workdir, "metrics.jsonl")
        self._tb = None
        # tensorboardX writes local files only; remote runs log metrics.jsonl.
        if self.enabled and tensorboard and not storage.is_remote(workdir):
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(storage.join(workdir, "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drops records past `step`: a resumed run rewrites them identically."""
        if not (self.enabled and storage.exists(self.path)):
            return
        lines = storage.read_text(self.path).splitlines()
        kept = [line for line in lines if line and json.loads(line)["step"] <= step]
        storage.write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, step: int, split: str, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "split": split}
        record.update({k: _clean(v) for k, v in metrics.items()})
        storage.append_line(self.path, json.dumps(record))
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(f"{split}/{key}", float(value), int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _clean(value):
    value = float(value)
    return value if math.isfinite(value) else str(value)


def read_metrics(workdir: str) -> list[dict]:
    text = storage.read_text(storage.join(workdir, "metrics.jsonl"))
    return [json.loads(line) for line in text.splitlines() if line.strip()]
