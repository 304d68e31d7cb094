"""Data source strings on real-format files: imagefolder, recordio, bin, pairs."""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from marginsearch.trainers.data import DataError, write_record_file
from marginsearch.trainers.judge import LabelledImages
from marginsearch.trainers.sources import PairSet, SourceError, evaluation_data, training_data

IDENTITIES, PER_IDENTITY = 6, 3


def identity_images(seed: int = 0) -> dict[int, list[np.ndarray]]:
    """Identity k → PER_IDENTITY random 8×8 RGB images whose red channel is k * 40 (so the label is visible)."""
    rng = np.random.default_rng(seed)
    out = {}
    for k in range(IDENTITIES):
        images = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(PER_IDENTITY)]
        for image in images:
            image[..., 0] = k * 40
        out[k] = images
    return out


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_folder(root: Path) -> dict[int, list[np.ndarray]]:
    images = identity_images()
    for k, group in images.items():
        (root / f"id{k:02d}").mkdir(parents=True)
        for j, image in enumerate(group):
            (root / f"id{k:02d}" / f"{j}.png").write_bytes(png(image))
    return images


def write_rec(path: Path) -> dict[int, list[np.ndarray]]:
    images = identity_images()
    write_record_file(path, [(image, k) for k, group in images.items() for image in group])
    return images


def check_training(data, images: dict[int, list[np.ndarray]]) -> None:
    # 10% of 6 identities rounds to 1, at least 2 are held out: ids 0..3 train, 4..5 validate
    # streamed: the images are decoded when an item is asked for, HWC uint8 RGB as stored
    assert data.num_classes == 4 and len(data.images) == 4 * PER_IDENTITY and data.image_size == (8, 8)
    assert data.images[0][0].dtype == np.uint8
    assert data.labels.tolist() == [k for k in range(4) for _ in range(PER_IDENTITY)]
    assert data.val.labels.tolist() == [0] * PER_IDENTITY + [1] * PER_IDENTITY
    np.testing.assert_array_equal(data.images[3][0], images[1][0])
    np.testing.assert_array_equal(data.val.images[len(data.val.images) - 1][0], images[5][2])


def test_training_from_imagefolder(tmp_path):
    images = write_folder(tmp_path / "faces")
    check_training(training_data(f"imagefolder:{tmp_path / 'faces'}"), images)


def test_training_from_recordio(tmp_path):
    images = write_rec(tmp_path / "train.rec")
    check_training(training_data(f"recordio:{tmp_path / 'train.rec'}"), images)


@pytest.mark.parametrize("kind", ["imagefolder", "recordio"])
def test_evaluation_labelled_images(tmp_path, kind):
    if kind == "imagefolder":
        write_folder(tmp_path / "faces")
    else:
        write_rec(tmp_path / "train.rec")
    target = tmp_path / ("faces" if kind == "imagefolder" else "train.rec")
    data = evaluation_data(f"{kind}:{target}")
    assert isinstance(data, LabelledImages) and len(data.images) == IDENTITIES * PER_IDENTITY
    assert data.labels.tolist() == [k for k in range(IDENTITIES) for _ in range(PER_IDENTITY)]
    red = torch.tensor([float(data.images[i][0][..., 0].mean()) for i in range(len(data.images))])
    assert torch.equal(red, data.labels.float() * 40)


def test_evaluation_from_bin(tmp_path):
    images = identity_images()
    pairs = [(images[0][0], images[0][1], True), (images[2][0], images[3][0], False)]
    bins = [png(im) for a, b, _ in pairs for im in (a, b)]
    (tmp_path / "lfw.bin").write_bytes(pickle.dumps((bins, [s for _, _, s in pairs]), protocol=2))
    data = evaluation_data(f"bin:{tmp_path / 'lfw.bin'}")
    assert isinstance(data, PairSet) and data.name == "lfw" and data.issame.tolist() == [True, False]
    assert data.images.shape == (4, 3, 8, 8) and data.images.dtype == torch.uint8
    np.testing.assert_array_equal(data.images[2].permute(1, 2, 0).numpy(), images[2][0])


def test_evaluation_from_pairs(tmp_path):
    images = write_folder(tmp_path / "lfw")
    for k in range(IDENTITIES):  # LFW names: root/name/name_%04d.jpg
        for j in range(PER_IDENTITY):
            folder = tmp_path / "lfw" / f"id{k:02d}"
            (folder / f"{j}.png").rename(folder / f"id{k:02d}_{j + 1:04d}.png")
    (tmp_path / "pairs.txt").write_text("1 1\nid01 1 3\nid02 2 id05 1\n")
    data = evaluation_data(f"pairs:{tmp_path / 'pairs.txt'}@{tmp_path / 'lfw'}")
    assert isinstance(data, PairSet) and data.name == "pairs" and data.issame.tolist() == [True, False]
    expected = [images[1][0], images[1][2], images[2][1], images[5][0]]
    np.testing.assert_array_equal(data.images.permute(0, 2, 3, 1).numpy(), np.stack(expected))


@pytest.mark.parametrize("make_source, error, message", [
    (lambda tmp: training_data(f"imagefolder:{tmp / 'nowhere'}"), SourceError, "imagefolder: .*nowhere does not exist"),
    (lambda tmp: training_data(f"recordio:{tmp / 'missing.rec'}"), SourceError, "missing.rec does not exist"),
    (lambda tmp: evaluation_data(f"bin:{tmp / 'missing.bin'}"), SourceError, "missing.bin does not exist"),
    (lambda tmp: evaluation_data(f"pairs:{tmp / 'pairs.txt'}@{tmp}"), DataError, "pairs.txt: no such pairs file"),
    (lambda tmp: evaluation_data(f"pairs:{tmp / 'pairs.txt'}"), SourceError, "needs an image root"),
    (lambda tmp: training_data(f"imagefolder:{tmp}"), DataError, "no identity sub-folders"),
    (lambda tmp: training_data(f"bin:{tmp / 'x.bin'}"), SourceError, "cannot be trained on"),
])
def test_missing_or_wrong_sources(tmp_path, make_source, error, message):
    with pytest.raises(error, match=message):
        make_source(tmp_path)
