"""Exports load without marginsearch's classes and give the trained model's embeddings."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from marginsearch.trainers.backbones import EmbeddingModel, build_backbone
from marginsearch.trainers.export import export_model, load_torchscript
from marginsearch.trainers.images import Preprocess


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = EmbeddingModel(build_backbone("tiny", 16, (32, 32))).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return m


def test_torchscript_round_trip_in_a_fresh_interpreter(model, tmp_path):
    path = export_model(model, tmp_path / "m.pt", "torchscript", Preprocess(32, 32), extra={"spec": {"s": 64}})
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        expected = model(x)
    code = (f"import torch, json; m = torch.jit.load({str(path)!r}); x = torch.load({str(tmp_path / 'x.pt')!r}); "
            f"e = m(x); torch.save(e, {str(tmp_path / 'e.pt')!r})")
    # a fresh interpreter that never imports marginsearch: the export stands alone
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    got = torch.load(tmp_path / "e.pt")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(5))
    _, meta = load_torchscript(path)
    assert meta["input"]["normalisation"] == "x / 127.5 - 1" and meta["output"]["shape"] == ["batch", 16]
    assert meta["spec"] == {"s": 64}


def test_onnx_export_runs_in_the_onnx_reference_evaluator(model, tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    path = export_model(model, tmp_path / "m.onnx", "onnx")  # the model's own size: its backbone's, stretched
    proto = onnx.load(str(path))
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["marginsearch.json"])
    assert meta["output"]["l2_normalised"] and meta["input"]["shape"] == ["batch", 3, 32, 32]
    assert meta["preprocess"] == Preprocess(32, 32).to_dict()
    x = torch.rand(3, 3, 32, 32) * 2 - 1          # batch 3: the batch axis is dynamic
    (got,) = ReferenceEvaluator(proto).run(None, {"images": x.numpy()})
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_unknown_format_is_refused(model, tmp_path):
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        export_model(model, tmp_path / "m.x", "tflite")
