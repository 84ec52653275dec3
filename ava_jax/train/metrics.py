"""Metric sinks: a JSONL file (one object per write) and TensorBoard event files (tensorboardX)."""
from __future__ import annotations

import json
import os
import sys
import time


class MetricWriter:
    """Writes scalars to `<workdir>/metrics.jsonl` and `<workdir>/tb/`; a no-op without a workdir and
    on every process but process 0 (the metrics are global: one writer is enough)."""

    def __init__(self, workdir: str | None):
        import jax
        self.workdir = workdir
        self._jsonl = None
        self._tb = None
        if workdir and jax.process_index() == 0:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
            self._tb = _summary_writer_class()(os.path.join(workdir, "tb"))

    def write(self, step: int, metrics: dict[str, float], prefix: str = "") -> None:
        named = {f"{prefix}{k}": float(v) for k, v in metrics.items()}
        if self._jsonl:
            self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **named}) + "\n")
            self._jsonl.flush()
        if self._tb:
            for k, v in named.items():
                self._tb.add_scalar(k, v, int(step))

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without PyTorch.

    Imported lazily, as it pulls in protobuf. Its writer module also tries `import torch` at import
    time, only for the tensor types of its image, graph and embedding helpers (never scalars); where
    torch is installed (the test extra) that import took 1.5 of the 1.9 s the writer took to import
    here, at the start of every run. Unless torch is already loaded, it is hidden for that import
    (`sys.modules[name] = None` makes `import name` raise ImportError, which tensorboardX handles).
    """
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
