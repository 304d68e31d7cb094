"""Every model file records its Preprocess and input shape; every loader sets it, so images of any size are prepared
as in training: bundles, TorchScript, ONNX, MLflow models (registry and runs:/ URIs) and the documented user lines."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from marginsearch.losses import named
from marginsearch.trainers.backbones import EmbeddingModel, build_backbone
from marginsearch.trainers.cli import main
from marginsearch.trainers.export import ExportError, export_model, load_model, load_torchscript, save_bundle
from marginsearch.trainers.images import Preprocess
from marginsearch.trainers.judge import embed
from marginsearch.trainers.registry import register_and_gate
from marginsearch.trainers.sources import evaluation_data
from marginsearch.trainers.tracking import (
    CampaignTracker,
    load_mlflow_model,
    log_embedding_model,
    preprocess_from_params,
)

ROOT = Path(__file__).resolve().parents[2]
TALL = Preprocess(24, 16, "crop")   # a non-square input, centre-cropped


def _model(preprocess: Preprocess | None, size: tuple[int, int], seed: int = 0) -> EmbeddingModel:
    """A tiny embedding model with non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    model = EmbeddingModel(build_backbone("tiny", 16, size), preprocess).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def _images(n: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Random uint8 images [n, 3, height, width]."""
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, height, width), dtype=np.uint8))


def _faces(root: Path, identities: int, per_identity: int, size: tuple[int, int], mode: str, seed: int) -> Path:
    """An ImageFolder root/pK/pK_000i.png of grey ('L') or RGB images of `size` (height, width), one identity's
    pattern plus noise each."""
    rng = np.random.default_rng(seed)
    height, width = size
    for person in range(identities):
        base = rng.integers(0, 256, (height, width), dtype=np.int16)
        (root / f"p{person}").mkdir(parents=True)
        for k in range(per_identity):
            pixels = np.clip(base + rng.integers(-30, 31, (height, width)), 0, 255).astype(np.uint8)
            image = Image.fromarray(pixels).convert(mode)
            image.save(root / f"p{person}" / f"p{person}_{k + 1:04d}.png")
    return root


def _one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


# ---------------------------------------------------------------------------- bundles, TorchScript, ONNX
def test_a_bundle_records_its_preprocess_and_loads_with_it(tmp_path):
    model = _model(TALL, TALL.size)
    path = save_bundle(tmp_path / "model.pt", model, "tiny", 16, extra={"spec": {"s": 64}})  # the model's own
    state = torch.load(path, weights_only=True)
    assert state["preprocess"] == TALL.to_dict() and state["input_shape"] == ["batch", 3, 24, 16]
    loaded, meta = load_model(path)
    assert loaded.preprocess == TALL and meta["preprocess"] == TALL.to_dict()
    assert meta["input"]["shape"] == ["batch", 3, 24, 16] and meta["spec"] == {"s": 64}
    images = _images(6, 40, 30, seed=1)   # another size: each model prepares them by its own preprocess
    np.testing.assert_allclose(embed(loaded, images), embed(model, images), atol=1e-6)
    square = _images(6, 24, 16, seed=2)
    with torch.no_grad():
        np.testing.assert_allclose(loaded(TALL.floats(square)).numpy(), model(TALL.floats(square)).numpy(), atol=1e-6)


def test_an_older_bundle_with_an_int_input_size_loads_as_a_stretched_square(tmp_path):
    model = _model(None, (32, 32))
    state = torch.load(save_bundle(tmp_path / "new.pt", model, "tiny", 16, Preprocess(32, 32)), weights_only=True)
    del state["preprocess"], state["input_shape"]
    torch.save({**state, "input_size": 32}, tmp_path / "old.pt")
    loaded, meta = load_model(tmp_path / "old.pt")
    assert loaded.preprocess == Preprocess(32, 32, "resize") and meta["input"]["shape"] == ["batch", 3, 32, 32]
    images = _images(4, 48, 40, seed=3)
    np.testing.assert_allclose(embed(loaded, images), embed(model, images), atol=1e-6)


def test_a_bundle_with_an_unusable_preprocess_is_one_line_and_exit_2(tmp_path, capsys):
    state = torch.load(save_bundle(tmp_path / "m.pt", _model(TALL, TALL.size), "tiny", 16), weights_only=True)
    torch.save({**state, "preprocess": {**state["preprocess"], "fit": "zoom"}}, tmp_path / "zoom.pt")
    with pytest.raises(ExportError, match="preprocess is unusable"):
        load_model(tmp_path / "zoom.pt")
    del state["preprocess"]
    torch.save(state, tmp_path / "none.pt")
    with pytest.raises(ExportError, match="records no preprocess"):
        load_model(tmp_path / "none.pt")
    err = _one_line_error(["evaluate", "--model", str(tmp_path / "zoom.pt"), "--data", "synthetic:tiny"], capsys)
    assert "zoom.pt: its recorded preprocess is unusable" in err and "zoom" in err


def test_torchscript_and_onnx_record_the_preprocess_and_torchscript_loads_with_it(tmp_path):
    model = _model(TALL, TALL.size)
    path = export_model(model, tmp_path / "m.ts", "torchscript")
    module, meta = load_torchscript(path)
    assert module.preprocess == TALL and meta["preprocess"] == TALL.to_dict()
    assert meta["input"]["shape"] == ["batch", 3, 24, 16]
    loaded, _ = load_model(path)
    assert loaded.preprocess == TALL
    images = _images(5, 31, 47, seed=4)
    np.testing.assert_allclose(embed(loaded, images), embed(model, images), atol=1e-5)

    # a TorchScript export from before "preprocess" was recorded: a square stretched to its input shape
    square = _model(None, (32, 32))
    old_meta = {"input": {"shape": ["batch", 3, 32, 32]}, "output": {"shape": ["batch", 16]}}
    torch.jit.save(torch.jit.trace(square, torch.zeros(2, 3, 32, 32)), str(tmp_path / "old.ts"),
                   _extra_files={"marginsearch.json": json.dumps(old_meta)})
    assert load_model(tmp_path / "old.ts")[0].preprocess == Preprocess(32, 32, "resize")

    onnx = pytest.importorskip("onnx")
    proto = onnx.load(str(export_model(model, tmp_path / "m.onnx", "onnx")))
    onnx_meta = json.loads({p.key: p.value for p in proto.metadata_props}["marginsearch.json"])
    assert onnx_meta["preprocess"] == TALL.to_dict() and onnx_meta["input"]["shape"] == ["batch", 3, 24, 16]
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[1:]]
    assert dims == [3, 24, 16]


# ---------------------------------------------------------------------------- MLflow models
@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A SQLite store at <root>/out/demo/mlflow.db holding a 24×16 (crop) model registered as marginsearch-demo
    (champion), and the same model as the run's plain artifacts under 'plain' with only a signature (no metadata)."""
    import mlflow.pytorch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    root = tmp_path_factory.mktemp("files")
    (root / "out" / "demo").mkdir(parents=True)
    uri = f"sqlite:///{root / 'out' / 'demo' / 'mlflow.db'}"
    tracker = CampaignTracker(uri, "model-files")
    model = _model(TALL, TALL.size, seed=5)
    parent = tracker.start_search("search", {}, {}, {})
    run_id = tracker.log_promoted(parent, "", named("arcface"), {"acc": 0.9}, model, None, "promoted")
    gate = register_and_gate(tracker.client, "marginsearch-demo", run_id, "acc", 0.9)
    assert gate.became_champion

    plain = tracker.client.create_run(tracker.experiment_id, run_name="plain").info.run_id
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, 24, 16))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 16))]))
    example = np.zeros((2, 3, 24, 16), dtype=np.float32)
    local = root / "plain"
    mlflow.pytorch.save_model(model, str(local), signature=signature, input_example=example,
                              serialization_format="pt2", pip_requirements=["torch"])
    tracker.client.log_artifacts(plain, str(local), "plain")

    square = _model(None, (32, 32), seed=6)  # no preprocess of its own: its backbone's 32×32, stretched
    square_run = tracker.client.create_run(tracker.experiment_id, run_name="square").info.run_id
    log_embedding_model(tracker.client, tracker.experiment_id, square_run, square)
    return {"root": root, "uri": uri, "tracker": tracker, "model": model, "run_id": run_id, "plain": plain,
            "square": square, "square_run": square_run}


def test_the_mlflow_model_records_the_preprocess_signature_and_example(store):
    import mlflow
    from mlflow.models import Model

    mlflow.set_tracking_uri(store["uri"])
    card = Model.load(f"runs:/{store['run_id']}/model")
    assert card.metadata["preprocess"] == TALL.to_dict()
    assert card.metadata["marginsearch"]["preprocess"] == TALL.to_dict()
    assert card.metadata["marginsearch"]["input"]["shape"] == ["batch", 3, 24, 16]
    assert card.signature.inputs.inputs[0].shape == (-1, 3, 24, 16)
    assert card.load_input_example().shape == (2, 3, 24, 16)
    params = store["tracker"].client.get_run(store["run_id"]).data.params
    assert (params["preprocess.height"], params["preprocess.width"], params["preprocess.fit"]) == ("24", "16", "crop")
    assert preprocess_from_params(params) == TALL  # what a resumed campaign's version description reads
    assert preprocess_from_params({"input_size": "32"}) is None


@pytest.mark.parametrize("which", ["models:/marginsearch-demo@champion", "runs", "plain", "square"])
def test_mlflow_loaders_set_the_preprocess_and_embed_images_of_another_size(store, which):
    uri = {"runs": f"runs:/{store['run_id']}/model", "plain": f"runs:/{store['plain']}/plain",
           "square": f"runs:/{store['square_run']}/model"}.get(which, which)
    loaded, meta = load_mlflow_model(uri, store["uri"])
    # the plain model records no preprocess, only its signature: (24, 16) stretched
    expected = {"plain": Preprocess(24, 16, "resize"), "square": Preprocess(32, 32, "resize")}.get(which, TALL)
    assert loaded.preprocess == expected and meta["preprocess"] == expected.to_dict()
    images = _images(4, 40, 40, seed=6)
    original = store["square" if which == "square" else "model"]
    np.testing.assert_allclose(embed(loaded, images), embed(original, images, expected), atol=1e-5)


def test_evaluate_takes_a_registry_model_on_images_of_another_size(store, tmp_path, capsys):
    faces = _faces(tmp_path / "faces", 4, 3, (40, 40), "RGB", seed=7)
    Image.open(faces / "p0" / "p0_0001.png").convert("L").resize((30, 50)).save(faces / "p0" / "p0_0004.png")
    for model in ("models:/marginsearch-demo@champion", f"runs:/{store['square_run']}/model"):
        capsys.readouterr()
        assert main(["evaluate", "--model", model, "--tracking-uri", store["uri"],
                     "--data", f"imagefolder:{faces}", "--pairs", "10"]) == 0
        metrics = json.loads(capsys.readouterr().out)["metrics"]
        assert 0.0 <= metrics["auc"] <= 1.0 and "tar@far=1e-2" in metrics


def test_the_documented_lines_embed_a_users_image_files_with_the_champion(store):
    """The python block of docs/training.md's "Using a trained model" section, run as written in a fresh interpreter
    whose working directory holds out/demo/mlflow.db, a.jpg and b.png."""
    text = (ROOT / "docs" / "training.md").read_text()
    section = text[text.index("## Using a trained model"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "Preprocess.from_dict(" in code and "models:/marginsearch-demo@champion" in code
    root = store["root"]
    Image.fromarray(np.random.default_rng(8).integers(0, 256, (50, 40, 3), dtype=np.uint8)).save(root / "a.jpg")
    Image.fromarray(np.random.default_rng(9).integers(0, 256, (30, 30), dtype=np.uint8)).save(root / "b.png")
    inherited = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    script = code + "\nimport numpy\nnumpy.save('embeddings.npy', embeddings)\n"
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300,
                          env={**inherited, "MLFLOW_DISABLE_TELEMETRY": "true"})
    assert done.returncode == 0, done.stderr[-2000:]
    got = np.load(root / "embeddings.npy")
    with torch.no_grad():
        expected = store["model"](TALL.batch([root / "a.jpg", root / "b.png"])).numpy()
    assert got.shape == (2, 16)
    np.testing.assert_allclose(got, expected, atol=1e-5)


# ---------------------------------------------------------------------------- train on grey non-square images
def test_train_on_grey_non_square_images_then_evaluate_and_export(tmp_path, capsys):
    faces = _faces(tmp_path / "faces", 10, 6, (20, 14), "L", seed=10)
    sixteen = (np.asarray(Image.open(faces / "p3" / "p3_0002.png"), dtype=np.uint16) * 257)
    (faces / "p3" / "p3_0002.png").unlink()
    Image.fromarray(sixteen).save(faces / "p3" / "p3_0002.png")  # 16-bit grey
    assert Image.open(faces / "p3" / "p3_0002.png").mode in ("I;16", "I")
    out = tmp_path / "run"
    assert main(["train", "--loss", "arcface", "--data", f"imagefolder:{faces}", "--val-fraction", "0.2",
                 "--budget-set", "epochs=1", "--budget-set", "batch_size=16", "--budget-set", "eval_pairs=100",
                 "--budget-set", "workers=0", "--out", str(out), "--quiet"]) == 0
    state = torch.load(out / "model.pt", weights_only=True)
    assert (state["preprocess"]["height"], state["preprocess"]["width"]) == (20, 14)
    assert state["input_shape"] == ["batch", 3, 20, 14]

    pairs = ["10"] + [f"p{i} 1 2" for i in range(10)] + [f"p{i} 1 p{(i + 1) % 10} 3" for i in range(10)]
    (tmp_path / "pairs.txt").write_text("\n".join(pairs) + "\n")
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out / "model.pt"),
                 "--data", f"pairs:{tmp_path / 'pairs.txt'}@{faces}"]) == 0
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["auc"] <= 1.0

    assert main(["export", "--model", str(out / "model.pt"), "--format", "torchscript",
                 "--out", str(tmp_path / "m.ts")]) == 0
    bundle, _ = load_model(out / "model.pt")
    script, meta = load_model(tmp_path / "m.ts")
    assert bundle.preprocess == script.preprocess == Preprocess(20, 14)
    assert meta["input"]["shape"] == ["batch", 3, 20, 14]
    data = evaluation_data(f"imagefolder:{faces}")
    np.testing.assert_allclose(embed(script, data.images), embed(bundle, data.images), atol=1e-5)
