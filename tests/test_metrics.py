"""Metric sinks: the JSONL file and TensorBoard event files, written without importing PyTorch."""
import glob
import json
import os
import struct
import subprocess
import sys

import pytest

from ava_jax.train.metrics import MetricWriter, read_jsonl

# In a fresh process: the test process has usually imported torch already (parity tests).
_WRITE = """
import sys
from ava_jax.train.metrics import MetricWriter
w = MetricWriter(sys.argv[1])
w.write(3, {"loss": 1.25, "accuracy": 0.5}, prefix="train/")
w.write(7, {"loss": 0.75}, prefix="train/")
w.close()
loaded = "torch" in sys.modules
import importlib.util
print(loaded, sys.modules.get("torch", "absent") is None, importlib.util.find_spec("torch") is not None)
"""


def _events(path):
    """(tag, step, value) of every scalar in a TensorBoard event file (TFRecord framing)."""
    from tensorboardX.proto import event_pb2
    out = []
    with open(path, "rb") as f:
        while header := f.read(12):
            (n,) = struct.unpack("<Q", header[:8])
            event = event_pb2.Event.FromString(f.read(n))
            f.read(4)  # the payload's CRC
            out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return out


def test_writer_records_scalars_without_importing_torch(tmp_path):
    r = subprocess.run([sys.executable, "-c", _WRITE, str(tmp_path)], capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-2000:]
    torch_loaded, torch_left_hidden, torch_importable = r.stdout.split()
    assert torch_loaded == "False"
    assert torch_left_hidden == "False"  # the import guard is removed again
    assert torch_importable == ("True" if _has_torch() else "False")

    rows = read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
    assert [(r["step"], r["train/loss"]) for r in rows] == [(3, 1.25), (7, 0.75)]
    assert rows[0]["train/accuracy"] == 0.5
    (events_file,) = glob.glob(os.path.join(tmp_path, "tb", "events.out.tfevents.*"))
    assert sorted(_events(events_file)) == [("train/accuracy", 3, 0.5), ("train/loss", 3, 1.25),
                                            ("train/loss", 7, 0.75)]


def test_writer_after_torch_is_loaded(tmp_path):
    pytest.importorskip("torch")
    w = MetricWriter(str(tmp_path))
    w.write(1, {"x": 2.0})
    w.close()
    import torch  # noqa: F401  (still importable: nothing was hidden in this process)
    assert json.loads(open(os.path.join(tmp_path, "metrics.jsonl")).read())["x"] == 2.0


def _has_torch():
    import importlib.util
    return importlib.util.find_spec("torch") is not None
