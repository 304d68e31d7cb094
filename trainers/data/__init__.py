"""Face data readers: image folders, insightface RecordIO (.rec/.idx), verification sets (.bin, LFW pairs.txt);
`split_identities` splits a folder by identity into a training folder and an LFW-style pairs set.

The readers (and torch, Pillow) load on first use of a name below, so importing `trainers.data`
or `trainers.data.synthetic` stays cheap. Every bad file raises `DataError` with a one-line
message naming the file and, where it applies, the record key or byte offset.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["DataError", "ImageFolderDataset", "RecordDataset", "write_record_file", "to_labelled_tensor",
           "decode_image", "load_bin", "load_pairs", "check_pairs_paths", "read_bin", "read_pairs", "split_identities"]


_HOME_OF = {
    "DataError": "errors",
    "ImageFolderDataset": "folder",
    "to_labelled_tensor": "folder",
    "decode_image": "folder",
    "RecordDataset": "recordio",
    "write_record_file": "recordio",
    "load_bin": "verification",
    "load_pairs": "verification",
    "check_pairs_paths": "verification",
    "read_bin": "verification",
    "read_pairs": "verification",
    "split_identities": "split",
}


def __getattr__(name: str) -> Any:
    """Import a reader's module the first time one of its names is asked for (PEP 562)."""
    module = _HOME_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME_OF))
