"""Export a trained embedding model as a plain artefact: TorchScript or ONNX, loadable without marginsearch.

The exported module maps float images [B, 3, H, W] in [−1, 1] (uint8 / 127.5 − 1, RGB, the
insightface normalisation) to L2-normalised embeddings [B, D]; cosine scores are dot products.
Both formats carry a small JSON description (input size, normalisation, embedding size, and the
loss spec that trained it) so a user knows how to feed them.
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

__all__ = ["ExportError", "FORMATS", "export_model", "load_torchscript", "describe", "save_bundle", "load_model"]

FORMATS = ("torchscript", "onnx")


class ExportError(MarginsearchError):
    """A model file or export request that cannot be used: missing, of another kind, an unknown format."""
META_FILE = "marginsearch.json"


def describe(model: nn.Module, input_size: int, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The description stored with an export: how to feed the model and what it returns."""
    with torch.no_grad():
        dim = _in_eval_mode(model)(torch.zeros(2, 3, input_size, input_size)).shape[1]
    return {"input": {"shape": ["batch", 3, input_size, input_size], "dtype": "float32", "channels": "RGB",
                      "normalisation": "x / 127.5 - 1"},
            "output": {"shape": ["batch", int(dim)], "l2_normalised": True},
            **(dict(extra) if extra else {})}


def _in_eval_mode(model: nn.Module) -> nn.Module:
    """`model.eval()`; a torch.export program (an MLflow pt2 model) refuses the call and is in eval mode already."""
    try:
        return model.eval()
    except NotImplementedError:
        return model


def export_model(model: nn.Module, path: str | Path, fmt: str = "torchscript", input_size: int = 32,
                 extra: Mapping[str, Any] | None = None) -> Path:
    """Write `model` (images → normalised embeddings) to `path` as TorchScript (.pt) or ONNX (.onnx)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = _in_eval_mode(model.cpu()).to(memory_format=torch.contiguous_format)
    meta = describe(model, input_size, extra)
    example = torch.zeros(2, 3, input_size, input_size)
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


def load_torchscript(path: str | Path) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """A TorchScript export and its description."""
    files = {META_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    return module, json.loads(files[META_FILE] or "{}")


def save_bundle(path: str | Path, model: nn.Module, backbone: str, embedding_size: int, input_size: int,
                extra: Mapping[str, Any] | None = None) -> Path:
    """A trained model as a plain bundle: backbone name, sizes and weights (tensors and JSON types only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": "marginsearch-model/1", "backbone": backbone, "embedding_size": embedding_size,
             "input_size": input_size, "state_dict": model.state_dict(), "extra": json.dumps(dict(extra or {}))}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A model saved by `save_bundle` or `export_model(..., "torchscript")`, in eval mode, and its description."""
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
    try:
        size = int(state["input_size"])
        model = EmbeddingModel(build_backbone(state["backbone"], int(state["embedding_size"]), (size, size)))
        model.load_state_dict(state["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        lines = str(exc).strip().splitlines()  # load_state_dict: a heading, then one line per mismatch
        detail = lines[-1].strip() if lines else type(exc).__name__
        raise ExportError(f"{path}: the bundle's weights do not fit its description ({detail})") from None
    meta = {"backbone": state["backbone"], "embedding_size": state["embedding_size"], "input_size": size,
            **json.loads(state["extra"])}
    return model.eval(), meta


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive is a zip holding code/ and constants.pkl."""
    import zipfile
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") for n in z.namelist())

