"""bench/data_speed.py: the cached RecordIO of face-like JPEGs, the memory sampler and a whole small report."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from marginsearch.trainers.data import RecordDataset

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "data_speed.py"


def _module():
    """bench/data_speed.py imported as a module (bench/ is not a package on the path)."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec = importlib.util.spec_from_file_location("data_speed", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(SCRIPT.parent))


data_speed = _module()


def test_record_file_holds_face_sized_jpegs_and_is_reused(tmp_path):
    path = data_speed.record_file(tmp_path, 120)
    dataset = RecordDataset(path)
    assert len(dataset) == 120 and dataset.num_classes == 3
    assert dataset.labels.tolist() == [0] * 50 + [1] * 50 + [2] * 20
    image, label = dataset[60]
    assert image.shape == (112, 112, 3) and image.dtype == np.uint8 and label == 1
    assert image.std() > 10  # blobs, not a flat colour
    assert 2_000 < path.stat().st_size / 120 < 8_000  # JPEG bytes per image, headers included
    before = path.stat().st_mtime_ns
    assert data_speed.record_file(tmp_path, 120) == path and path.stat().st_mtime_ns == before
    assert RecordDataset(data_speed.record_file(tmp_path, 60)).labels.tolist() == [0] * 50 + [1] * 10


def test_memory_sampler_counts_child_processes():
    sampler = data_speed.MemorySampler()
    alone = sampler.sample()
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        assert child.pid in data_speed.descendants(os.getpid()) and data_speed.descendants(child.pid) == []
        samples = (sampler.sample() for _ in range(10_000))  # the child's memory shows once it has started
        with_child = next(s for s in samples if s["workers_rss"] > 0)
    finally:
        child.communicate(b"")
    assert alone["main_rss"] > 0 and alone["total_pss"] > 0
    assert with_child["workers"] == alone["workers"] + 1
    assert with_child["total_rss"] == with_child["main_rss"] + with_child["workers_rss"]


@pytest.mark.slow
def test_small_run_writes_every_section(tmp_path):
    out = tmp_path / "bench_data.md"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--n", "1500", "--also", "1200", "--images", "256",
                           "--runs", "1", "--skip", "threads", "--workdir", str(tmp_path / "work"), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    for heading in ("## Decoding", "## Memory while training on the streamed file"):
        assert heading in text
    assert "## Training speed" not in text
    raw = json.loads(re.search(r"<!-- raw: (.*) -->", text).group(1))
    assert [m["images"] for m in raw["memory"]] == [1500, 1200]
    assert all(m["status"] == "complete" and m["val_images"] == 1000 for m in raw["memory"])
    assert all(m["processes"] >= 2 and m["peak_total_pss"] > 0 for m in raw["memory"])  # the workers were seen
    assert len(raw["decoding"]) == 6 and all(v[0] > 0 for v in raw["decoding"].values())
