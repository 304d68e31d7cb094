"""insightface MXNet RecordIO datasets (`train.rec` + `train.idx`) read and written without MXNet.

Container (dmlc-core recordio): chunks of uint32 magic 0xced7230a, uint32 lrec (cflag = lrec >> 29,
length = lrec & (2^29 − 1)), data, zero padding to 4 bytes; a record whose data holds the magic
4-byte aligned is split there into cflag 1/2/3 parts, the magic re-inserted when joining. Each record
is an image record (mxnet recordio.py): struct 'IfQQ' (flag, label, id, id2), then `flag` float32
labels when flag > 0, then the encoded image. The `.idx` is text `key<TAB>byte offset`.
"""
from __future__ import annotations

import io
import math
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .errors import DataError
from .folder import decode_image

__all__ = ["MAGIC", "RecordDataset", "write_record_file"]

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_CHUNK_HEAD = struct.Struct("<II")
_IMAGE_HEAD = struct.Struct("<IfQQ")
_LENGTH_MASK = (1 << 29) - 1
_FIRST_CFLAGS, _NEXT_CFLAGS, _LAST_CFLAGS = (0, 1), (2, 3), (0, 3)


def _read_record(f: BinaryIO, offset: int, file_size: int, where: str) -> tuple[bytes, int]:
    """One logical record starting at byte `offset` (parts joined) and the offset just past it."""
    parts: list[bytes] = []
    pos = offset
    while True:
        f.seek(pos)
        head = f.read(_CHUNK_HEAD.size)
        if len(head) < _CHUNK_HEAD.size:
            raise DataError(f"{where}: truncated record, chunk header at byte offset {pos} runs past the end "
                            f"({file_size} bytes)")
        magic, lrec = _CHUNK_HEAD.unpack(head)
        if magic != MAGIC:
            raise DataError(f"{where}: bad magic 0x{magic:08x} at byte offset {pos} (expected 0x{MAGIC:08x})")
        cflag, length = lrec >> 29, lrec & _LENGTH_MASK
        if cflag not in (_NEXT_CFLAGS if parts else _FIRST_CFLAGS):
            raise DataError(f"{where}: unexpected continuation flag {cflag} at byte offset {pos}")
        data = f.read(length)
        if len(data) < length:
            raise DataError(f"{where}: truncated record, {length} data bytes at byte offset {pos + 8} "
                            f"run past the end ({file_size} bytes)")
        parts.append(data)
        pos += _CHUNK_HEAD.size + ((length + 3) & ~3)
        if cflag in _LAST_CFLAGS:
            return _MAGIC_BYTES.join(parts), pos


def _unpack_image_record(record: bytes, where: str) -> tuple[int, tuple[float, ...], bytes]:
    """(flag, labels, encoded image): labels is the `flag` float32 labels when flag > 0, else (header label,)."""
    if len(record) < _IMAGE_HEAD.size:
        raise DataError(f"{where}: record of {len(record)} bytes is shorter than the 24-byte image header")
    flag, label, _, _ = _IMAGE_HEAD.unpack_from(record)
    if flag == 0:
        return flag, (label,), record[_IMAGE_HEAD.size:]
    end = _IMAGE_HEAD.size + 4 * flag
    if len(record) < end:
        raise DataError(f"{where}: header announces {flag} labels but the record has {len(record)} bytes")
    return flag, struct.unpack_from(f"<{flag}f", record, _IMAGE_HEAD.size), record[end:]


def _read_index(idx_path: Path, rec_path: Path, file_size: int) -> dict[int, int]:
    """`.idx` lines `key<TAB>offset` → {key: offset}, in file order."""
    offsets: dict[int, int] = {}
    for number, line in enumerate(idx_path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            key, offset = int(fields[0]), int(fields[1])
            if len(fields) != 2 or offset < 0:
                raise ValueError(line)
        except (ValueError, IndexError):
            raise DataError(f"{idx_path}: line {number} is not 'key<TAB>offset': {line!r}") from None
        if offset + _CHUNK_HEAD.size > file_size:
            raise DataError(f"{idx_path}: key {key} has offset {offset}, past the end of {rec_path} "
                            f"({file_size} bytes)")
        offsets[key] = offset
    return offsets


def _scan_index(rec_path: Path, file_size: int) -> dict[int, int]:
    """Without a `.idx`: records in file order are keys 0, 1, ... (reads the whole file)."""
    offsets: dict[int, int] = {}
    with open(rec_path, "rb") as f:
        pos = 0
        while pos < file_size:
            offsets[len(offsets)] = pos
            _, pos = _read_record(f, pos, file_size, f"{rec_path} record {len(offsets) - 1}")
    return offsets


def _read_num_classes(property_path: Path) -> int | None:
    """`property` file `num_classes,height,width` → num_classes (None when there is no such file)."""
    if not property_path.is_file():
        return None
    text = property_path.read_text().strip()
    try:
        return int(text.split(",")[0])
    except ValueError:
        raise DataError(f"{property_path}: expected 'num_classes,height,width', got {text!r}") from None


class RecordDataset(Dataset):
    """insightface `.rec`/`.idx` images: (HWC uint8 RGB array, int label), or (transform(PIL image), label).

    Layouts: record 0 with flag > 0 and label [first identity record, end] → images are keys
    1 .. label[0] − 1 and num_classes = end − label[0]; otherwise every key of the `.idx` is an image
    and num_classes comes from the `property` file beside the `.rec` (None without one). Without a
    `.idx` the `.rec` is scanned once. A multi-label image record's label is its first label.
    """

    def __init__(self, path: str | Path, transform: Callable[[Image.Image], Any] | None = None) -> None:
        self.path = Path(path)
        self.transform = transform
        if not self.path.is_file():
            raise DataError(f"{self.path}: no such RecordIO file")
        self._size = self.path.stat().st_size
        idx_path = self.path.with_suffix(".idx")
        offsets = (_read_index(idx_path, self.path, self._size) if idx_path.is_file()
                   else _scan_index(self.path, self._size))
        # key → byte offset as two sorted arrays, not a dict of Python ints: a forked loader worker that reads them
        # copies no refcounted objects (~150 bytes an image in every process otherwise)
        order = sorted(offsets)
        self._index_keys = np.array(order, dtype=np.int64)
        self._index_offsets = np.array([offsets[k] for k in order], dtype=np.int64)
        self.num_classes: int | None = _read_num_classes(self.path.parent / "property")
        self.keys: np.ndarray = np.array(list(offsets), dtype=np.int64)  # image keys, in .idx order
        self._file: BinaryIO | None = None
        self._file_pid: int | None = None
        self._labels: np.ndarray | None = None
        if 0 in offsets:
            flag, labels, _ = _unpack_image_record(self._record(0), f"{self.path} key 0")
            if flag > 0:
                self._use_header(labels)

    def _use_header(self, labels: tuple[float, ...]) -> None:
        if len(labels) < 2 or not 1 <= labels[0] <= labels[1] <= 2 ** 53:
            raise DataError(f"{self.path} key 0: header record needs labels [first identity record, end], got {labels}")
        first_identity, end = int(labels[0]), int(labels[1])
        present = np.isin(np.arange(1, first_identity), self._index_keys)
        missing = None if present.all() else int(np.flatnonzero(~present)[0]) + 1
        if missing is not None:
            raise DataError(f"{self.path}: header record says images are keys 1..{first_identity - 1} "
                            f"but key {missing} is not in the index")
        self.keys = np.arange(1, first_identity, dtype=np.int64)
        self.num_classes = end - first_identity

    def _record(self, key: int) -> bytes:
        """One record's bytes, through this process's own open file (a DataLoader worker opens its own)."""
        return _read_record(self._open(), self._offset(key), self._size, f"{self.path} key {key}")[0]

    def _offset(self, key: int) -> int:
        """The byte offset of record `key` (from the index arrays)."""
        return int(self._index_offsets[np.searchsorted(self._index_keys, key)])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_file": None, "_file_pid": None}  # an open file does not travel to a worker

    def __del__(self) -> None:
        if getattr(self, "_file", None) is not None:
            self._file.close()

    def _open(self) -> BinaryIO:
        """This process's own open file (a DataLoader worker opens its own on first use)."""
        if self._file is None or self._file_pid != os.getpid():
            self._file, self._file_pid = open(self.path, "rb"), os.getpid()  # noqa: SIM115 (kept open for reads)
        return self._file

    @property
    def labels(self) -> np.ndarray:
        """Every image's identity label (int64), read from the records' first 36 bytes (no image is decoded)."""
        if self._labels is None:
            self._labels = np.array([self._header_label(int(key)) for key in self.keys], dtype=np.int64)
        return self._labels

    def _header_label(self, key: int) -> int:
        where = f"{self.path} key {key}"
        f = self._open()
        f.seek(self._offset(key))
        head = f.read(_CHUNK_HEAD.size + _IMAGE_HEAD.size + 4)
        magic, lrec = _CHUNK_HEAD.unpack_from(head) if len(head) >= _CHUNK_HEAD.size else (0, 0)
        if magic != MAGIC or lrec >> 29 != 0 or len(head) < 36 or (lrec & _LENGTH_MASK) < _IMAGE_HEAD.size + 4:
            label = _unpack_image_record(self._record(key), where)[1][0]  # a split or short record: read it whole
        else:
            flag, label, _, _ = _IMAGE_HEAD.unpack_from(head, _CHUNK_HEAD.size)
            if flag > 0:
                label = struct.unpack_from("<f", head, _CHUNK_HEAD.size + _IMAGE_HEAD.size)[0]
        return _identity(label, self.num_classes, where)

    @property
    def classes(self) -> list[str]:
        """Identity names: the labels as decimal strings."""
        return [str(c) for c in range(int(self.num_classes if self.num_classes is not None
                                          else self.labels.max(initial=-1) + 1))]

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        key = int(self.keys[index])
        where = f"{self.path} key {key}"
        _, labels, encoded = _unpack_image_record(self._record(key), where)
        label = _identity(labels[0], self.num_classes, where)
        image = decode_image(encoded, where)
        return (self.transform(image) if self.transform is not None else np.asarray(image)), label


def _identity(value: float, num_classes: int | None, where: str) -> int:
    """A record's float label as an identity index, refused unless it is a whole number in [0, num_classes)."""
    if not math.isfinite(value) or value != int(value) or value < 0:
        raise DataError(f"{where}: label {value!r} is not an identity index (a whole number ≥ 0)")
    if num_classes is not None and value >= num_classes:
        raise DataError(f"{where}: label {int(value)} is outside the {num_classes} identities the file declares")
    return int(value)


def _chunks(payload: bytes) -> bytes:
    """A record's bytes as dmlc chunks: split where the magic sits 4-byte aligned, pad the last part."""
    cuts: list[int] = []
    i = payload.find(_MAGIC_BYTES)
    while i != -1:
        if i % 4 == 0:
            cuts.append(i)
        i = payload.find(_MAGIC_BYTES, i + (4 if i % 4 == 0 else 1))
    starts, ends = [0] + [c + 4 for c in cuts], cuts + [len(payload)]
    flags = [0] if not cuts else [1] + [2] * (len(cuts) - 1) + [3]
    out = bytearray()
    for flag, start, end in zip(flags, starts, ends):
        out += _CHUNK_HEAD.pack(MAGIC, (flag << 29) | (end - start)) + payload[start:end]
    out += bytes(-len(out) % 4)
    return bytes(out)


def _encode(image: bytes | np.ndarray, where: str) -> bytes:
    """Encoded image bytes: arrays become PNG, bytes are kept as they are."""
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise DataError(f"{where}: expected encoded bytes or an HWC uint8 RGB array, got {array.dtype} {array.shape}")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _record_bytes(key: int, labels: tuple[float, ...], scalar: float, data: bytes) -> bytes:
    """An image record as chunks: header (flag = number of labels), the labels, the encoded image."""
    head = _IMAGE_HEAD.pack(len(labels), scalar, key, 0) + struct.pack(f"<{len(labels)}f", *labels)
    return _chunks(head + data)


def write_record_file(rec_path: str | Path, items: Iterable[tuple[bytes | np.ndarray, int]],
                      header: bool = True) -> int:
    """Write `rec_path`, its `.idx` and a `property` file (`num_classes,H,W`) beside it; returns the image count.

    Arrays are stored as PNG, bytes (JPEG/PNG) as given. header=True: insightface's layout with record 0
    and one identity record per label, so labels must be 0..K−1 with each label's images consecutive;
    header=False: images are keys 0.. with scalar labels. Files appear only once all items are written.
    """
    rec_path = Path(rec_path)
    tmp_rec, tmp_idx = rec_path.with_suffix(".rec.tmp"), rec_path.with_suffix(".idx.tmp")
    runs: dict[int, list[int]] = {}  # label → [first key, end key)
    offsets: dict[int, int] = {}
    previous, first_image, first_key = None, None, int(header)
    written = False
    try:
        with open(tmp_rec, "wb") as rec:
            # record 0 (flag 2, two positive float counts: never the magic) is 40 bytes, written last
            rec.write(bytes(len(_record_bytes(0, (1.0, 2.0), 0.0, b""))) if header else b"")
            for key, (image, label) in enumerate(items, start=first_key):
                label = int(label)
                if header and label != previous and label in runs:
                    raise DataError(f"{rec_path}: key {key}: images of label {label} are not consecutive")
                data = _encode(image, f"{rec_path} key {key}")
                first_image = data if first_image is None else first_image
                runs.setdefault(label, [key, key])[1] = key + 1
                previous, offsets[key] = label, rec.tell()
                rec.write(_record_bytes(key, (), float(label), data))
            count = len(offsets)
            if header:
                if sorted(runs) != list(range(len(runs))):
                    raise DataError(f"{rec_path}: header layout needs labels 0..K-1, got {len(runs)} labels "
                                    f"up to {max(runs, default=-1)}")
                first_identity = first_key + count
                for label in range(len(runs)):
                    offsets[first_identity + label] = rec.tell()
                    rec.write(_record_bytes(first_identity + label, tuple(map(float, runs[label])), 0.0, b""))
                rec.seek(0)
                offsets[0] = 0
                rec.write(_record_bytes(0, (float(first_identity), float(first_identity + len(runs))), 0.0, b""))
        tmp_idx.write_text("".join(f"{key}\t{offsets[key]}\n" for key in sorted(offsets)))
        height, width = (decode_image(first_image, f"{rec_path} key {first_key}").size[::-1]
                         if first_image is not None else (0, 0))
        written = True
    finally:
        if not written:
            tmp_rec.unlink(missing_ok=True)
            tmp_idx.unlink(missing_ok=True)
    os.replace(tmp_rec, rec_path)
    os.replace(tmp_idx, rec_path.with_suffix(".idx"))
    (rec_path.parent / "property").write_text(f"{max(runs, default=-1) + 1},{height},{width}\n")
    return count
