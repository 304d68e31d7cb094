"""Export a trained embedding model as a plain artefact: TorchScript or ONNX, loadable without marginsearch.

The exported module maps float images [B, 3, H, W] in [−1, 1] (uint8 / 127.5 − 1, RGB, the
insightface normalisation) to L2-normalised embeddings [B, D]; cosine scores are dot products.
Every model file (bundle, TorchScript, ONNX, the MLflow model) carries a small JSON description:
the input shape, the `Preprocess` that prepared the training images (key "preprocess", as
`Preprocess.to_dict` writes it), the embedding size and the loss spec that trained it; each loader
sets that `Preprocess` on the module it returns (`model.preprocess`), so images of any size are
prepared as in training. Files from before it (an int `input_size` or a square input shape) load as
a square stretched to that size.
"""
from __future__ import annotations

import io
import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from marginsearch.losses.errors import MarginsearchError

from .images import Preprocess

__all__ = ["ExportError", "FORMATS", "export_model", "load_torchscript", "describe", "recorded_preprocess",
           "own_preprocess", "save_bundle", "load_model"]

FORMATS = ("torchscript", "onnx")


class ExportError(MarginsearchError):
    """A model file or export request that cannot be used: missing, of another kind, an unknown format."""
META_FILE = "marginsearch.json"


def describe(model: nn.Module, preprocess: Preprocess, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The description stored with a model: how to prepare and feed its images and what it returns."""
    height, width = preprocess.size
    with torch.no_grad():
        dim = _in_eval_mode(model)(torch.zeros(2, 3, height, width)).shape[1]
    return {"input": {"shape": ["batch", 3, height, width], "dtype": "float32", "channels": "RGB",
                      "normalisation": "x / 127.5 - 1"},
            "preprocess": preprocess.to_dict(),
            "output": {"shape": ["batch", int(dim)], "l2_normalised": True},
            **(dict(extra) if extra else {})}


def recorded_preprocess(meta: Mapping[str, Any], where: str = "model") -> Preprocess:
    """The `Preprocess` a description records: its "preprocess", else a square stretched to its input shape or
    `input_size` (older files)."""
    try:
        if isinstance(meta.get("preprocess"), Mapping):
            return Preprocess.from_dict(meta["preprocess"])
        shape = meta.get("input", {}).get("shape") if isinstance(meta.get("input"), Mapping) else None
        if isinstance(shape, (list, tuple)) and len(shape) == 4:
            return Preprocess(int(shape[2]), int(shape[3]))
        if meta.get("input_size") is not None:
            size = int(meta["input_size"])
            return Preprocess(size, size)
    except (KeyError, TypeError, ValueError) as exc:
        raise ExportError(f"{where}: its recorded preprocess is unusable ({str(exc).splitlines()[0]})") from None
    raise ExportError(f"{where}: records no preprocess, input shape or input size")


def _in_eval_mode(model: nn.Module) -> nn.Module:
    """`model.eval()`; a torch.export program (an MLflow pt2 model) refuses the call and is in eval mode already."""
    try:
        return model.eval()
    except NotImplementedError:
        return model


def export_model(model: nn.Module, path: str | Path, fmt: str = "torchscript", preprocess: Preprocess | None = None,
                 extra: Mapping[str, Any] | None = None) -> Path:
    """Write `model` (images → normalised embeddings) to `path` as TorchScript (.pt) or ONNX (.onnx).

    `preprocess`: how its images are prepared (default: the model's own, `judge.model_preprocess`); recorded in the
    file's description and setting the example's H×W.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    preprocess = preprocess or own_preprocess(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = _in_eval_mode(model.cpu()).to(memory_format=torch.contiguous_format)
    meta = describe(model, preprocess, extra)
    example = torch.zeros(2, 3, *preprocess.size)
    if fmt == "torchscript":  # deprecated in torch 2.10+ in favour of torch.export, still what deployments load
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            traced = torch.jit.trace(model, example)
            torch.jit.save(traced, str(path), _extra_files={META_FILE: json.dumps(meta)})
        return path
    try:
        import onnx
    except ImportError:
        raise ExportError("ONNX export needs the onnx package: pip install 'marginsearch[export]'") from None
    buf = io.BytesIO()
    with warnings.catch_warnings():  # torch 2.9+ flags the TorchScript-based exporter as legacy; it needs no onnxscript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (example,), buf, dynamo=False, input_names=["images"], output_names=["embeddings"],
                          dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}}, opset_version=17)
    proto = onnx.load_from_string(buf.getvalue())
    onnx.helper.set_model_props(proto, {META_FILE: json.dumps(meta)})
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def own_preprocess(model: nn.Module) -> Preprocess:
    """The model's recorded `Preprocess`, else its backbone's input size stretched; ExportError if it has neither."""
    from .judge import model_preprocess

    try:
        return model_preprocess(model)
    except ValueError:
        raise ExportError("the model records no preprocess or input size: pass preprocess=Preprocess(H, W)") from None


def load_torchscript(path: str | Path) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """A TorchScript export and its description; the recorded `Preprocess` is set as `module.preprocess`."""
    files = {META_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    try:
        meta = json.loads(files[META_FILE] or "{}")
    except json.JSONDecodeError:
        raise ExportError(f"{path}: its {META_FILE} is not JSON") from None
    if not isinstance(meta, dict):
        raise ExportError(f"{path}: its {META_FILE} is not a JSON object")
    if meta:  # a TorchScript file from elsewhere has no description: the judge then uses the images' own size
        preprocess = recorded_preprocess(meta, str(path))
        module.preprocess = preprocess
        meta.setdefault("preprocess", preprocess.to_dict())
    return module, meta


def save_bundle(path: str | Path, model: nn.Module, backbone: str, embedding_size: int,
                preprocess: Preprocess | None = None, extra: Mapping[str, Any] | None = None) -> Path:
    """A trained model as a plain bundle: backbone name, sizes, preprocess (default: the model's own) and weights
    (tensors and JSON types only)."""
    preprocess = preprocess or own_preprocess(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": "marginsearch-model/1", "backbone": backbone, "embedding_size": embedding_size,
             "preprocess": preprocess.to_dict(), "input_shape": ["batch", 3, *preprocess.size],
             "state_dict": model.state_dict(), "extra": json.dumps(dict(extra or {}))}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A model saved by `save_bundle` or `export_model(..., "torchscript")`, in eval mode with its `preprocess` set, and
    its description."""
    from .backbones import EmbeddingModel, build_backbone

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"model {path} does not exist")
    if _is_torchscript(path):
        module, meta = load_torchscript(path)
        return module.eval(), meta
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ExportError(f"{path}: neither a marginsearch model bundle nor a TorchScript export "
                          f"({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != "marginsearch-model/1":
        raise ExportError(f"{path}: not a marginsearch model bundle")
    preprocess = recorded_preprocess(state, str(path))  # an older bundle: its int input_size, a stretched square
    try:
        model = EmbeddingModel(build_backbone(state["backbone"], int(state["embedding_size"]), preprocess.size))
        model.load_state_dict(state["state_dict"])
        extra = json.loads(state["extra"])
        if not isinstance(extra, dict):
            raise TypeError(f"extra is {type(extra).__name__}, not an object")
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        lines = str(exc).strip().splitlines()  # load_state_dict: a heading, then one line per mismatch
        detail = lines[-1].strip() if lines else type(exc).__name__
        raise ExportError(f"{path}: the bundle's weights do not fit its description ({detail})") from None
    model.preprocess = preprocess
    meta = {"backbone": state["backbone"], "embedding_size": state["embedding_size"],
            "input": {"shape": ["batch", 3, *preprocess.size]}, "preprocess": preprocess.to_dict(), **extra}
    return model.eval(), meta


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive is a zip holding code/ and constants.pkl."""
    import zipfile
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") for n in z.namelist())
