"""Real data as users bring it: any image mode and shape, one preprocessing, identity selection, validation splits."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from marginsearch.losses import named
from marginsearch.trainers.budget import budget_from
from marginsearch.trainers.data import ImageFolderDataset
from marginsearch.trainers.images import Preprocess, to_rgb
from marginsearch.trainers.judge import judge, model_preprocess
from marginsearch.trainers.sources import SourceError, Split, evaluation_data, training_data
from marginsearch.trainers.train import few_steps, train


def test_to_rgb_grey_copies_the_channel():
    grey = Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4))
    rgb = np.asarray(to_rgb(grey))
    assert rgb.shape == (3, 4, 3) and (rgb == np.arange(12).reshape(3, 4, 1)).all()


def test_to_rgb_scales_16_bit_to_8_bit():
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)   # 257 = 1/255 of the 16-bit range
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    assert np.asarray(to_rgb(image))[0, :, 0].tolist() == [0, 1, 128, 255]


def test_to_rgb_drops_alpha_and_converts_cmyk_and_palette():
    rgba = Image.fromarray(np.full((2, 2, 4), (10, 20, 30, 0), dtype=np.uint8))
    assert np.asarray(to_rgb(rgba))[0, 0].tolist() == [10, 20, 30]           # transparent pixel kept, alpha gone
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))                        # pure red in CMYK
    assert np.asarray(to_rgb(cmyk))[0, 0].tolist() == [255, 0, 0]
    palette = Image.new("RGB", (2, 2), (0, 128, 255)).convert("P")
    assert to_rgb(palette).mode == "RGB" and np.asarray(to_rgb(palette)).shape == (2, 2, 3)


def test_preprocess_resize_and_crop_give_height_by_width():
    batch = torch.arange(2 * 3 * 40 * 20, dtype=torch.float32).reshape(2, 3, 40, 20).remainder(256).to(torch.uint8)
    assert Preprocess(16, 12).fit_uint8(batch).shape == (2, 3, 16, 12)
    cut = Preprocess(10, 10, "crop").fit_uint8(batch)                         # 40×20 scaled to 20×10, centre 10×10
    assert cut.shape == (2, 3, 10, 10)
    scaled = torch.nn.functional.interpolate(batch.float(), size=(20, 10), mode="bilinear", antialias=True)
    assert torch.equal(cut, scaled[..., 5:15, :].round().clamp(0, 255).to(torch.uint8))
    assert Preprocess(40, 20).fit_uint8(batch) is batch                       # at its size: untouched


def test_preprocess_values_and_round_trip():
    pre = Preprocess(8, 6, "crop")
    assert Preprocess.from_dict(pre.to_dict()) == pre
    x = pre.floats(torch.tensor([0, 255], dtype=torch.uint8).repeat(3, 24).reshape(1, 3, 8, 6))
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    with pytest.raises(ValueError, match="image_fit"):
        Preprocess(8, 8, "squash")


def test_preprocess_batch_reads_files_of_any_mode(tmp_path):
    Image.fromarray(np.full((30, 20), 200, dtype=np.uint8)).save(tmp_path / "a.pgm")
    Image.fromarray(np.full((10, 10, 4), 100, dtype=np.uint8)).save(tmp_path / "b.png")
    x = Preprocess(12, 8).batch([tmp_path / "a.pgm", str(tmp_path / "b.png")])
    assert x.shape == (2, 3, 12, 8) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.tensor(200 / 127.5 - 1)) and torch.allclose(x[1], torch.tensor(100 / 127.5 - 1))


def _faces(root, identities: int = 6, per: int = 5, size: tuple[int, int] = (20, 14), seed: int = 0) -> None:
    """Grey non-square .pgm faces, identity k brighter than k − 1; identity 0's first image a 16-bit PNG."""
    rng = np.random.default_rng(seed)
    for k in range(identities):
        (root / f"id{k}").mkdir(parents=True)
        for j in range(per):
            pixels = np.clip(rng.normal(30 * k + 20, 10, size), 0, 255).astype(np.uint8)
            if k == 0 and j == 0:
                Image.fromarray(pixels.astype(np.uint16) * 257).save(root / f"id{k}" / f"{j}.png")  # I;16
            else:
                Image.fromarray(pixels).save(root / f"id{k}" / f"{j}.pgm")


def test_training_on_grey_non_square_images_keeps_their_shape(tmp_path):
    _faces(tmp_path / "faces")
    data = training_data(f"imagefolder:{tmp_path / 'faces'}", split=Split(val_fraction=0.34))
    assert data.image_size == (20, 14) and data.num_classes == 4
    budget = budget_from("proxy", epochs=1, batch_size=4, embedding_size=8, eval_pairs=20, reward_metric="auc",
                         workers=0)
    result = train(named("cosface"), data, budget)
    assert result.status == "complete" and model_preprocess(result.model) == Preprocess(20, 14)
    assert result.model.backbone.input_size == (20, 14)
    metrics = judge(result.model, evaluation_data(f"imagefolder:{tmp_path / 'faces'}"), pairs=20)
    assert 0.0 <= metrics["auc"] <= 1.0


def test_image_size_and_crop_from_the_budget(tmp_path):
    _faces(tmp_path / "faces")
    data = training_data(f"imagefolder:{tmp_path / 'faces'}")
    budget = budget_from("proxy", image_size=[12, 10], image_fit="crop")
    assert data.preprocess(budget) == Preprocess(12, 10, "crop")
    assert data.preprocess(budget_from("proxy", image_size=16)) == Preprocess(16, 16)


def test_validation_split_choices(tmp_path):
    _faces(tmp_path / "faces")
    source = f"imagefolder:{tmp_path / 'faces'}"
    default = training_data(source)                        # 10 % of 6 rounds to 1: at least 2 are held out
    assert default.num_classes == 4 and len(default.val.labels) == 10
    chosen = training_data(source, split=Split(val_identities=("id0", "id3")))
    assert chosen.num_classes == 4 and len(chosen.val.labels) == 10
    assert {int(chosen.val.images[i][0].mean()) // 30 for i in range(10)} == {0, 3}   # brightness names the identity
    (tmp_path / "ids.txt").write_text("# a comment\nid1\nid2\n\nid4\nid5\n")
    subset = training_data(source, split=Split(identities=str(tmp_path / "ids.txt"), val_fraction=0.5))
    assert subset.num_classes == 2 and len(subset.labels) == 10 and len(subset.val.labels) == 10
    (tmp_path / "val").mkdir()
    _faces(tmp_path / "val" / "faces", identities=3, seed=1)
    separate = training_data(source, split=Split(val=f"imagefolder:{tmp_path / 'val' / 'faces'}"))
    assert separate.num_classes == 6 and len(separate.val.labels) == 15


@pytest.mark.parametrize("split, message", [
    (Split(identities=("id0", "nobody")), "data.identities: 1 identity not in"),
    (Split(identities=("id0", "id1", "id2"), val_identities=("id4",)), "id4 is not among data.identities"),
    (Split(identities=("id0", "id1")), "2 identities are too few to hold 2 out"),
    (Split(val="bin:/nowhere.bin"), "/nowhere.bin does not exist"),
])
def test_bad_splits_are_refused_by_name(tmp_path, split, message):
    _faces(tmp_path / "faces")
    with pytest.raises(SourceError, match=message):
        training_data(f"imagefolder:{tmp_path / 'faces'}", split=split)


def test_a_split_on_synthetic_data_is_refused():
    with pytest.raises(SourceError, match="apply to imagefolder: and recordio: sources"):
        training_data("synthetic:tiny", split=Split(val_fraction=0.2))


def test_few_steps_per_epoch_are_said():
    assert few_steps(300, budget_from("proxy", batch_size=128)) is not None
    assert "2 step(s) per epoch" in few_steps(300, budget_from("proxy", batch_size=128))
    assert few_steps(1280, budget_from("proxy", batch_size=128)) is None


def test_folder_reads_pgm_and_other_pillow_formats(tmp_path):
    for k, suffix in enumerate((".pgm", ".tif", ".webp", ".bmp")):
        (tmp_path / f"id{k}").mkdir()
        Image.fromarray(np.full((6, 4, 3), 40 * k, dtype=np.uint8)).save(tmp_path / f"id{k}" / f"0{suffix}")
    folder = ImageFolderDataset(tmp_path)
    assert len(folder) == 4 and all(folder[i][0].shape == (6, 4, 3) for i in range(4))
