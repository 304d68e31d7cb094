"""Streamed training data: workers change nothing, each worker reads through its own file, errors stay one line."""
from __future__ import annotations

import io
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from torch.utils.data import DataLoader, Dataset

from marginsearch.losses import named
from marginsearch.trainers.budget import Budget, budget_from
from marginsearch.trainers.data import DataError, RecordDataset, write_record_file
from marginsearch.trainers.data import recordio as recordio_module
from marginsearch.trainers.sources import training_data
from marginsearch.trainers.train import train

IDENTITIES, PER_IDENTITY, SIDE = 8, 6, 16
MAGIC_BYTES = struct.pack("<I", recordio_module.MAGIC)


def faces(seed: int = 0) -> list[tuple[np.ndarray, int]]:
    """IDENTITIES × PER_IDENTITY random 16×16 RGB images, identity k's green channel offset by 25·k, in label order."""
    rng = np.random.default_rng(seed)
    items = []
    for k in range(IDENTITIES):
        for _ in range(PER_IDENTITY):
            image = rng.integers(0, 56, (SIDE, SIDE, 3), dtype=np.uint8)
            image[..., 1] += np.uint8(25 * k)
            items.append((image, k))
    return items


def png(image: np.ndarray, text: str | None = None) -> bytes:
    """PNG bytes of an HWC uint8 image, with an optional tEXt chunk."""
    info = None
    if text is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text("k", text)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def with_aligned_magic(image: np.ndarray) -> bytes:
    """PNG bytes holding the RecordIO magic 4-byte aligned in the record (after its 24-byte header): a split record."""
    for pad in range(4):
        data = png(image, "x" * pad + MAGIC_BYTES.decode("latin-1"))
        if data.find(MAGIC_BYTES) % 4 == 0:
            return data
    raise AssertionError("no padding puts the magic on a 4-byte boundary")


def write_folder(root: Path, items: list[tuple[np.ndarray, int]]) -> Path:
    """root/id<k>/<j>.png for every item."""
    for j, (image, k) in enumerate(items):
        folder = root / f"id{k}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{j:03d}.png").write_bytes(png(image))
    return root


def write_source(tmp_path: Path, kind: str) -> str:
    """The faces as a `recordio:` or `imagefolder:` training source."""
    if kind == "recordio":
        write_record_file(tmp_path / "train.rec", faces())
        return f"recordio:{tmp_path / 'train.rec'}"
    return f"imagefolder:{write_folder(tmp_path / 'faces', faces())}"


def budget(workers: int) -> Budget:
    """Two epochs of the tiny backbone on 16×16 images, batches of 8, `workers` loader processes."""
    return budget_from("proxy", epochs=2, identities=0, batch_size=8, backbone="tiny", embedding_size=16,
                       eval_pairs=50, image_size=SIDE, workers=workers)


@pytest.mark.parametrize("kind", ["recordio", "imagefolder"])
def test_workers_do_not_change_the_weights(tmp_path, kind):
    data = training_data(write_source(tmp_path, kind))
    assert data.num_classes == IDENTITIES - 2 and not isinstance(data.images, torch.Tensor)  # streamed
    results = [train(named("cosface"), data, budget(workers)) for workers in (0, 2)]
    assert [r.status for r in results] == ["complete", "complete"]
    single, parallel = (r.model.state_dict() for r in results)
    assert single.keys() == parallel.keys()
    torch.testing.assert_close(parallel, single, rtol=0, atol=0)
    torch.testing.assert_close(results[1].head.state_dict(), results[0].head.state_dict(), rtol=0, atol=0)
    assert results[0].history[-1].train_loss == results[1].history[-1].train_loss
    one_epoch = train(named("cosface"), data, budget_from(budget(0), epochs=1)).model.state_dict()
    assert any(not torch.equal(one_epoch[k], single[k]) for k in single)  # the second epoch's steps moved them


class _WhoRead(Dataset):
    """Items of a RecordDataset with the reading process's pid and the pid its open file belongs to."""

    def __init__(self, base: RecordDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[Any, int, int, int | None]:
        image, label = self.base[i]
        return image, label, os.getpid(), self.base._file_pid


def _as_list(items: list[Any]) -> list[Any]:
    """A collate_fn that keeps the items as they are."""
    return list(items)


def test_record_dataset_pickles_without_its_file_and_each_worker_opens_its_own(tmp_path):
    write_record_file(tmp_path / "train.rec", faces())
    dataset = RecordDataset(tmp_path / "train.rec")
    expected = [dataset[i] for i in range(len(dataset))]  # read here first: this process's file is open
    assert dataset._file is not None and dataset._file_pid == os.getpid()
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone._file is None and clone._file_pid is None
    np.testing.assert_array_equal(clone[5][0], expected[5][0])
    assert clone._file is not None and clone._file is not dataset._file

    loader = DataLoader(_WhoRead(dataset), batch_size=5, shuffle=False, num_workers=2, collate_fn=_as_list)
    got = [item for batch in loader for item in batch]
    assert len(got) == len(expected) == IDENTITIES * PER_IDENTITY
    for (image, label, reader, owner), (want_image, want_label) in zip(got, expected):
        np.testing.assert_array_equal(image, want_image)
        assert label == want_label
        assert reader == owner != os.getpid()  # read through the worker's own file, not the inherited one
    assert len({reader for _, _, reader, _ in got}) == 2


@pytest.mark.parametrize("header", [True, False])
def test_labels_from_record_headers_equal_the_items_labels(tmp_path, monkeypatch, header):
    items = faces()
    if not header:  # keys 0.. with scalar labels: any order
        items = [items[i] for i in np.random.default_rng(1).permutation(len(items))]
    encoded = [(png(image), label) for image, label in items]
    encoded[7] = (with_aligned_magic(items[7][0]), items[7][1])  # a record split in two parts
    write_record_file(tmp_path / "train.rec", encoded, header=header)

    def no_decoding(data: bytes, where: str) -> Image.Image:
        raise AssertionError(f"{where}: an image was decoded to read the labels")

    dataset = RecordDataset(tmp_path / "train.rec")
    with monkeypatch.context() as patch:
        patch.setattr(recordio_module, "decode_image", no_decoding)
        labels = dataset.labels
    assert labels.dtype == np.int64
    assert labels.tolist() == [dataset[i][1] for i in range(len(dataset))] == [label for _, label in items]
    np.testing.assert_array_equal(dataset[7][0], items[7][0])
    assert dataset.num_classes == IDENTITIES


@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupt_image_in_a_training_folder_names_the_file_in_one_line(tmp_path, workers):
    root = write_folder(tmp_path / "faces", faces())
    bad = root / "id2" / "013.png"
    bad.write_bytes(bad.read_bytes()[:200])  # the header opens (so the check before training passes), pixels do not
    data = training_data(f"imagefolder:{root}")
    with pytest.raises(DataError) as caught:
        train(named("cosface"), data, budget(workers))
    message = str(caught.value)
    assert str(bad) in message and "does not decode" in message
    assert "\n" not in message and "Traceback" not in message and not message.startswith("Caught")


@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupt_validation_image_names_the_file_in_one_line_when_judged(tmp_path, workers):
    from marginsearch.trainers.backbones import EmbeddingModel, build_backbone
    from marginsearch.trainers.judge import judge
    from marginsearch.trainers.sources import evaluation_data

    root = write_folder(tmp_path / "faces", faces())
    bad = root / "id7" / "047.png"
    bad.write_bytes(bad.read_bytes()[:200])
    model = EmbeddingModel(build_backbone("tiny", 16, (SIDE, SIDE)))
    with pytest.raises(DataError) as caught:
        judge(model, evaluation_data(f"imagefolder:{root}"), pairs=20, workers=workers)
    message = str(caught.value)
    assert str(bad) in message and "\n" not in message and "Traceback" not in message


def test_folder_index_holds_no_python_objects_per_image(tmp_path):
    from marginsearch.trainers.data import ImageFolderDataset

    folder = ImageFolderDataset(write_folder(tmp_path / "faces", faces()))
    assert folder._paths.dtype.kind == "S" and folder._labels.dtype == np.int64   # arrays: no refcounts to copy
    assert folder.samples[7] == (tmp_path / "faces" / "id1" / "007.png", 1)
    dataset = RecordDataset(tmp_path / "train.rec") if write_record_file(tmp_path / "train.rec", faces()) else None
    assert dataset is not None and dataset.keys.dtype == np.int64 and dataset._index_offsets.dtype == np.int64
