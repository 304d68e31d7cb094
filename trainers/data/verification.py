"""Verification pair sets: insightface `.bin` files (LFW, CFP-FP, AgeDB-30, CALFW, CPLFW) and LFW `pairs.txt`.

Both give (images uint8 [2N, H, W, 3] RGB, issame bool [N]) where pair i is images 2i and 2i+1.
A `.bin` is a pickle of (bins, issame_list) (insightface recognition/arcface_torch/eval/verification.py);
it is loaded with an unpickler that refuses every global a real `.bin` does not need, so a crafted
file cannot run code.
"""
from __future__ import annotations

import _codecs
import importlib
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError
from .folder import IMAGE_SUFFIXES, decode_image, read_image_file, stack_rgb

__all__ = ["load_bin", "load_pairs"]


class _Refused(pickle.UnpicklingError):
    """The pickle asks for a global outside the allow-list."""


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` limited to what pickle uses it for: latin-1 text back to bytes."""
    if not isinstance(text, str) or encoding != "latin1":
        raise _Refused(f"_codecs.encode with encoding {encoding!r}")
    return _codecs.encode(text, "latin1")


def _numpy_global(submodule: str, name: str) -> Any:
    """A numpy internal from numpy 2's `numpy._core` or numpy 1's `numpy.core`."""
    try:
        return getattr(importlib.import_module(f"numpy._core.{submodule}"), name)
    except ImportError:
        return getattr(importlib.import_module(f"numpy.core.{submodule}"), name)


# (module, name) → how to build it. Nothing else may be loaded.
_ALLOWED: dict[tuple[str, str], Any] = {
    # Python 3 pickles at protocol ≤ 2 rebuild bytes as _codecs.encode(text, "latin1"), or call bytes().
    ("_codecs", "encode"): lambda: _latin1_encode,
    ("builtins", "bytes"): lambda: bytes,
    ("__builtin__", "bytes"): lambda: bytes,
    ("builtins", "bytearray"): lambda: bytearray,
    ("__builtin__", "bytearray"): lambda: bytearray,
    # Some .bin files hold issame_list as a numpy bool array or a list of numpy.bool_ (and bins as uint8
    # arrays). These four functions only rebuild an array or scalar from a dtype, a shape and raw bytes:
    # _reconstruct(ndarray, shape, dtype) + __setstate__, scalar(dtype, raw), _frombuffer(raw, dtype, shape,
    # order) and dtype(str); the class _reconstruct instantiates itself comes through this table, so it can
    # only be ndarray. Both numpy 1 (numpy.core) and numpy 2 (numpy._core) spellings occur in files.
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    **{(f"{prefix}.{sub}", name): (lambda sub=sub, name=name: _numpy_global(sub, name))
       for prefix in ("numpy.core", "numpy._core")
       for sub, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))},
}


class _BinUnpickler(pickle.Unpickler):
    """An unpickler that builds only containers, bytes, booleans and numpy arrays/scalars."""

    def find_class(self, module: str, name: str) -> Any:
        build = _ALLOWED.get((module, name))
        if build is None:
            raise _Refused(f"global {module}.{name}")
        return build()

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused(f"persistent id {pid!r}")


def _unpickle(path: Path) -> Any:
    """The .bin's object; Python 2 pickles hold JPEGs as str, read back as bytes (encoding='bytes')."""
    with open(path, "rb") as f:
        try:
            return _BinUnpickler(f, encoding="bytes").load()
        except _Refused as exc:
            raise DataError(f"{path}: refused to unpickle {exc}: a verification .bin holds only bytes and "
                            "booleans") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
                UnicodeDecodeError, OverflowError, MemoryError) as exc:
            raise DataError(f"{path}: not a pickle of (bins, issame_list) ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())})") from None


def _encoded(item: Any) -> bytes | None:
    """An encoded image as bytes (bytes, bytearray or a 1-D uint8 array), else None."""
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
        return item.tobytes()
    return None


def _check_structure(obj: Any, path: Path) -> tuple[list[bytes], np.ndarray]:
    """(bins, issame) after checking it is (list of 2N encoded images, N booleans)."""
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise DataError(f"{path}: expected a pickled (bins, issame_list) pair, got {type(obj).__name__}"
                        + (f" of length {len(obj)}" if isinstance(obj, (tuple, list)) else ""))
    bins, issame = obj
    if not isinstance(bins, (list, tuple)):
        raise DataError(f"{path}: bins is a {type(bins).__name__}, expected a list of encoded images")
    if (isinstance(issame, np.ndarray) and (issame.dtype != np.bool_ or issame.ndim != 1)
            or not isinstance(issame, (list, tuple, np.ndarray))):
        raise DataError(f"{path}: issame_list is a {type(issame).__name__} {getattr(issame, 'dtype', '')}, "
                        "expected booleans")
    bad = next((i for i, s in enumerate(issame) if not isinstance(s, (bool, np.bool_))), None)
    if bad is not None:
        raise DataError(f"{path}: issame_list[{bad}] is a {type(issame[bad]).__name__}, expected a boolean")
    if len(bins) != 2 * len(issame):
        raise DataError(f"{path}: {len(bins)} images for {len(issame)} pairs, expected {2 * len(issame)}")
    encoded = [_encoded(b) for b in bins]
    bad = next((i for i, b in enumerate(encoded) if b is None), None)
    if bad is not None:
        raise DataError(f"{path}: bins[{bad}] is a {type(bins[bad]).__name__}, expected encoded image bytes")
    return encoded, np.asarray(issame, dtype=bool).reshape(-1)


def read_bin(path: str | Path) -> tuple[list[bytes], np.ndarray]:
    """An insightface verification `.bin` checked but not decoded → (2N encoded images, issame bool [N])."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such verification .bin file")
    bins, issame = _check_structure(_unpickle(path), path)
    if not bins:
        raise DataError(f"{path}: holds no pairs")
    return bins, issame


def load_bin(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """An insightface verification `.bin` → (images uint8 [2N, H, W, 3] RGB, issame bool [N])."""
    path = Path(path)
    bins, issame = read_bin(path)
    images = (np.asarray(decode_image(b, f"{path} image {i}")) for i, b in enumerate(bins))
    return stack_rgb(images, len(bins)), issame


def _parse_pairs_line(fields: list[str]) -> tuple[tuple[str, int], tuple[str, int], bool]:
    """`name i j` (same person) or `name1 i name2 j` (different) → the two (name, number) and issame."""
    if len(fields) == 3:
        return (fields[0], int(fields[1])), (fields[0], int(fields[2])), True
    if len(fields) == 4:
        return (fields[0], int(fields[1])), (fields[2], int(fields[3])), False
    raise ValueError(fields)


def _pair_image(root: Path, name: str, number: int, where: str) -> Path:
    """root/name/name_%04d.jpg, else the same name with another image suffix (.png, .pgm, ... `IMAGE_SUFFIXES`)."""
    stem = root / name / f"{name}_{number:04d}"
    for suffix in IMAGE_SUFFIXES:   # appended, not with_suffix: a name like J.Smith has a dot of its own
        path = stem.parent / f"{stem.name}{suffix}"
        if path.is_file():
            return path
    raise DataError(f"{where}: image {stem}.jpg (or {', '.join(IMAGE_SUFFIXES[1:])}) not found")


def check_pairs_paths(pairs_txt: str | Path, image_root: str | Path) -> tuple[Path, Path]:
    """The pairs file and its image root as paths; DataError unless the file and the folder exist."""
    pairs_txt, root = Path(pairs_txt), Path(image_root)
    if not pairs_txt.is_file():
        raise DataError(f"{pairs_txt}: no such pairs file")
    if not root.is_dir():
        raise DataError(f"{root}: image root of {pairs_txt} is not a directory")
    return pairs_txt, root


def load_pairs(pairs_txt: str | Path, image_root: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """LFW `pairs.txt` + image root → (images uint8 [2N, H, W, 3] RGB, issame bool [N]); sizes follow the first
    image."""
    files, issame = read_pairs(pairs_txt, image_root)
    images = (np.asarray(read_image_file(path)) for path in files)
    return stack_rgb(images, len(files)), issame


def read_pairs(pairs_txt: str | Path, image_root: str | Path) -> tuple[list[Path], np.ndarray]:
    """LFW `pairs.txt` + image root checked, no image read → (2N image files, issame bool [N]).

    First line `folds pairs_per_fold` (LFW: `10 300`, each fold 300 same then 300 different) or `pairs`.
    """
    pairs_txt, root = check_pairs_paths(pairs_txt, image_root)
    try:
        lines = pairs_txt.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{pairs_txt}: not a text pairs list (byte {exc.start} is not UTF-8)") from None
    header = lines[0].split() if lines else []
    if not 1 <= len(header) <= 2 or not all(h.isdigit() for h in header):
        raise DataError(f"{pairs_txt} line 1: expected 'folds pairs_per_fold' or 'pairs', got {lines[:1]}")
    folds, per_fold = (1, int(header[0])) if len(header) == 1 else (int(header[0]), int(header[1]))
    files: list[Path] = []
    issame: list[bool] = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        where = f"{pairs_txt} line {number}"
        try:
            first, second, same = _parse_pairs_line(line.split())
        except ValueError:
            raise DataError(f"{where}: expected 'name i j' or 'name1 i name2 j', got {line!r}") from None
        files += [_pair_image(root, *first, where), _pair_image(root, *second, where)]
        issame.append(same)
    if len(issame) != 2 * folds * per_fold:
        raise DataError(f"{pairs_txt}: header promises {folds} folds x {per_fold} same + {per_fold} different pairs "
                        f"= {2 * folds * per_fold}, found {len(issame)}")
    return files, np.asarray(issame, dtype=bool)
