"""Data-format readers: RecordIO (.rec/.idx), verification .bin, LFW pairs.txt, image folders."""
from __future__ import annotations

import io
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from marginsearch.trainers.data import (
    DataError,
    ImageFolderDataset,
    RecordDataset,
    load_bin,
    load_pairs,
    to_labelled_tensor,
    write_record_file,
)

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)


def rand_images(n: int, seed: int = 0, size: tuple[int, int] = (8, 6)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)]


def encode(image: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


# --- hand-built RecordIO, independent of the module under test ---------------------------------------

def chunk(cflag: int, data: bytes) -> bytes:
    """One dmlc chunk: magic, lrec = cflag << 29 | length, data, zero padding to 4 bytes."""
    return struct.pack("<II", MAGIC, (cflag << 29) | len(data)) + data + b"\0" * (-len(data) % 4)


def image_record(key: int, label: float | list[float], image: bytes) -> bytes:
    """mxnet IRHeader 'IfQQ' (flag, label, id, id2), labels when flag > 0, then the image."""
    if isinstance(label, list):
        return struct.pack("<IfQQ", len(label), 0.0, key, 0) + struct.pack(f"<{len(label)}f", *label) + image
    return struct.pack("<IfQQ", 0, label, key, 0) + image


def write_hand_rec(tmp: Path, records: dict[int, bytes]) -> Path:
    """records: key → already-chunked bytes; writes .rec and .idx (key<TAB>offset)."""
    rec, lines, offset = tmp / "hand.rec", [], 0
    with open(rec, "wb") as f:
        for key, data in records.items():
            lines.append(f"{key}\t{offset}\n")
            f.write(data)
            offset += len(data)
    (tmp / "hand.idx").write_text("".join(lines))
    return rec


def test_reader_on_hand_built_file_with_header_and_split_records(tmp_path):
    images, labels = rand_images(4), [0, 0, 1, 1]
    magic_float = struct.unpack("<f", MAGIC_BYTES)[0]
    records = {0: chunk(0, image_record(0, [5.0, 7.0], b""))}
    records[1] = chunk(0, image_record(1, 0.0, encode(images[0])))
    # key 2: labels [0, magic]: the magic sits at payload offset 28 (aligned) → parts cflag 1, 3
    payload = image_record(2, [0.0, magic_float], encode(images[1]))
    assert payload.index(MAGIC_BYTES) == 28
    records[2] = chunk(1, payload[:28]) + chunk(3, payload[32:])
    # key 3: labels [1, magic, magic] → cflag 1 (28 bytes), 2 (empty), 3 (rest)
    payload = image_record(3, [1.0, magic_float, magic_float], encode(images[2]))
    records[3] = chunk(1, payload[:28]) + chunk(2, b"") + chunk(3, payload[36:])
    records[4] = chunk(0, image_record(4, [1.0, 2.0], encode(images[3])))  # multi-label image: first counts
    records[5] = chunk(0, image_record(5, [1.0, 3.0], b""))  # identity records: [img_start, img_end)
    records[6] = chunk(0, image_record(6, [3.0, 5.0], b""))
    ds = RecordDataset(write_hand_rec(tmp_path, records))
    assert len(ds) == 4 and ds.num_classes == 2
    for i in range(4):
        image, label = ds[i]
        assert label == labels[i] and image.dtype == np.uint8
        np.testing.assert_array_equal(image, images[i])


def test_reader_on_hand_built_file_without_header(tmp_path):
    images = rand_images(3, seed=1)
    records = {k: chunk(0, image_record(k, float(lab), encode(images[k]))) for k, lab in zip((0, 1, 2), (4, 0, 4))}
    (tmp_path / "property").write_text("5,8,6\n")
    ds = RecordDataset(write_hand_rec(tmp_path, records))
    assert len(ds) == 3 and ds.num_classes == 5
    assert [ds[i][1] for i in range(3)] == [4, 0, 4]
    np.testing.assert_array_equal(ds[2][0], images[2])


@pytest.mark.parametrize("header", [True, False])
def test_writer_round_trip_png_exact(tmp_path, header):
    images, labels = rand_images(7, seed=2), [0, 0, 0, 1, 2, 2, 2]
    assert write_record_file(tmp_path / "t.rec", zip(images, labels), header=header) == 7
    ds = RecordDataset(tmp_path / "t.rec")
    assert len(ds) == 7 and ds.num_classes == 3
    assert [ds[i][1] for i in range(7)] == labels
    for i in range(7):
        np.testing.assert_array_equal(ds[i][0], images[i])
    assert (tmp_path / "property").read_text().strip() == "3,8,6"
    # the first image record is exactly a hand-built chunk at the offset the .idx gives
    first = int(header)
    offsets = dict(map(int, line.split("\t")) for line in (tmp_path / "t.idx").read_text().splitlines())
    expected = chunk(0, image_record(first, 0.0, encode(images[0])))
    assert (tmp_path / "t.rec").read_bytes()[offsets[first]:offsets[first] + len(expected)] == expected
    if header:
        head = chunk(0, image_record(0, [8.0, 11.0], b""))  # images 1..7, identities 8..10
        assert (tmp_path / "t.rec").read_bytes()[:len(head)] == head and offsets[0] == 0
        identity_1 = chunk(0, image_record(9, [4.0, 5.0], b""))
        assert (tmp_path / "t.rec").read_bytes()[offsets[9]:offsets[9] + 40] == identity_1


def test_writer_splits_where_magic_is_aligned_and_reader_joins(tmp_path):
    image = rand_images(1, seed=3)[0]
    png = encode(image)
    pad = -(24 + len(png)) % 4
    data = png + b"\0" * pad + MAGIC_BYTES + b"tail" + MAGIC_BYTES[:3]  # decoders ignore bytes after the end marker
    write_record_file(tmp_path / "s.rec", [(data, 0)], header=False)
    payload = image_record(0, 0.0, data)
    cut = 24 + len(png) + pad
    assert (tmp_path / "s.rec").read_bytes() == chunk(1, payload[:cut]) + chunk(3, payload[cut + 4:])
    got, label = RecordDataset(tmp_path / "s.rec")[0]
    np.testing.assert_array_equal(got, image)
    assert label == 0


def test_jpeg_round_trip_within_tolerance_and_transform_gets_pil(tmp_path):
    images = [np.full((16, 16, 3), (200, 40, 90), np.uint8), np.full((16, 16, 3), (10, 220, 30), np.uint8)]
    write_record_file(tmp_path / "j.rec", [(encode(im, "JPEG"), k) for k, im in enumerate(images)])
    ds = RecordDataset(tmp_path / "j.rec")
    for i, im in enumerate(images):
        assert np.abs(ds[i][0].astype(int) - im).max() <= 8
    seen = RecordDataset(tmp_path / "j.rec", transform=lambda pil: (pil.mode, pil.size))[1]
    assert seen == (("RGB", (16, 16)), 1)


def test_missing_idx_scans_the_rec(tmp_path):
    images = rand_images(3, seed=4)
    write_record_file(tmp_path / "n.rec", zip(images, [0, 1, 1]))
    (tmp_path / "n.idx").unlink()
    ds = RecordDataset(tmp_path / "n.rec")
    assert [ds[i][1] for i in range(3)] == [0, 1, 1] and ds.num_classes == 2
    np.testing.assert_array_equal(ds[2][0], images[2])


def test_writer_refuses_scattered_labels_and_leaves_no_file(tmp_path):
    with pytest.raises(DataError, match="key 3: images of label 0 are not consecutive"):
        write_record_file(tmp_path / "b.rec", zip(rand_images(3), [0, 1, 0]))
    assert not list(tmp_path.iterdir())


def _good_rec(tmp: Path) -> Path:
    write_record_file(tmp / "g.rec", zip(rand_images(2, seed=5), [0, 1]), header=False)
    return tmp / "g.rec"


def test_truncated_rec(tmp_path):
    rec = _good_rec(tmp_path)
    data = rec.read_bytes()
    rec.write_bytes(data[:-30])
    ds = RecordDataset(rec)
    with pytest.raises(DataError, match=r"g\.rec key 1: truncated record, \d+ data bytes at byte offset \d+"):
        ds[1]


def test_bad_magic(tmp_path):
    rec = _good_rec(tmp_path)
    offset = int((tmp_path / "g.idx").read_text().splitlines()[1].split("\t")[1])
    data = bytearray(rec.read_bytes())
    data[offset:offset + 4] = b"JUNK"
    rec.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"g\.rec key 1: bad magic 0x4b4e554a at byte offset {offset}"):
        RecordDataset(rec)[1]


def test_idx_offset_past_end(tmp_path):
    rec = _good_rec(tmp_path)
    (tmp_path / "g.idx").write_text(f"0\t0\n1\t{rec.stat().st_size}\n")
    with pytest.raises(DataError, match=rf"g\.idx: key 1 has offset {rec.stat().st_size}, past the end of .*g\.rec"):
        RecordDataset(rec)


@pytest.mark.parametrize("line", ["1 x", "1", "1\t2\t3", "1\t-4"])
def test_idx_line_malformed(tmp_path, line):
    rec = _good_rec(tmp_path)
    (tmp_path / "g.idx").write_text(f"0\t0\n{line}\n")
    with pytest.raises(DataError, match=r"g\.idx: line 2 is not 'key<TAB>offset'"):
        RecordDataset(rec)


def test_header_record_naming_missing_keys(tmp_path):
    image = encode(rand_images(1)[0])
    records = {0: chunk(0, image_record(0, [5.0, 6.0], b""))}
    records.update({k: chunk(0, image_record(k, 0.0, image)) for k in (1, 2)})
    with pytest.raises(DataError, match=r"hand\.rec: header record says images are keys 1\.\.4 but key 3 is not in"):
        RecordDataset(write_hand_rec(tmp_path, records))


def test_record_image_does_not_decode(tmp_path):
    rec = write_hand_rec(tmp_path, {0: chunk(0, image_record(0, 1.0, b"\xff\xd8\xff not a jpeg"))})
    with pytest.raises(DataError, match=r"hand\.rec key 0: image does not decode"):
        RecordDataset(rec)[0]


# --- verification .bin ------------------------------------------------------------------------------------

def py2_pickle(bins: list[bytes], issame: list[bool]) -> bytes:
    """A Python-2 style pickle: protocol 2, JPEGs as BINSTRING (py2 str), booleans as NEWTRUE/NEWFALSE."""
    out = b"\x80\x02(](" + b"".join(b"T" + struct.pack("<I", len(b)) + b for b in bins) + b"e]("
    return out + b"".join(b"\x88" if s else b"\x89" for s in issame) + b"et."


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL, "py2"])
def test_load_bin_round_trip(tmp_path, protocol):
    images, issame = rand_images(6, seed=6), [True, False, True]
    bins = [encode(im) for im in images]
    blob = py2_pickle(bins, issame) if protocol == "py2" else pickle.dumps((bins, issame), protocol=protocol)
    (tmp_path / "lfw.bin").write_bytes(blob)
    got, same = load_bin(tmp_path / "lfw.bin")
    assert got.shape == (6, 8, 6, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.stack(images))
    assert same.dtype == bool and same.tolist() == issame


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_load_bin_numpy_issame_and_uint8_bins(tmp_path, protocol):
    images = rand_images(4, seed=7)
    for bins, issame in (([encode(im) for im in images], np.array([False, True])),
                         ([np.frombuffer(encode(im), np.uint8) for im in images], [np.bool_(False), np.bool_(True)])):
        (tmp_path / "n.bin").write_bytes(pickle.dumps((bins, issame), protocol=protocol))
        got, same = load_bin(tmp_path / "n.bin")
        np.testing.assert_array_equal(got, np.stack(images))
        assert same.tolist() == [False, True]


class _RunsCommand:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


class _CallsEval:
    def __reduce__(self):
        return eval, ("1 + 1",)


def test_load_bin_refuses_code_and_never_runs_it(tmp_path):
    target = tmp_path / "pwned"
    (tmp_path / "evil.bin").write_bytes(pickle.dumps(([_RunsCommand(target)], [True])))
    with pytest.raises(DataError, match=r"evil\.bin: refused to unpickle global (posix|nt|os)\.system"):
        load_bin(tmp_path / "evil.bin")
    assert not target.exists()
    (tmp_path / "eval.bin").write_bytes(pickle.dumps((_CallsEval(), [])))
    with pytest.raises(DataError, match=r"refused to unpickle global builtins\.eval"):
        load_bin(tmp_path / "eval.bin")


def test_load_bin_not_a_pickle(tmp_path):
    (tmp_path / "text.bin").write_bytes(b"hello, this is not a pickle")
    with pytest.raises(DataError, match=r"text\.bin: not a pickle"):
        load_bin(tmp_path / "text.bin")


@pytest.mark.parametrize("obj, message", [
    ({"bins": []}, "expected a pickled \\(bins, issame_list\\) pair, got dict"),
    (([b"a"] * 3, [True]), "3 images for 1 pairs, expected 2"),
    (([b"a"] * 2, [1]), r"issame_list\[0\] is a int, expected a boolean"),
    ((["text", "text"], [True]), r"bins\[0\] is a str, expected encoded image bytes"),
    ((b"ab", [True]), "bins is a bytes, expected a list"),
])
def test_load_bin_wrong_structure(tmp_path, obj, message):
    (tmp_path / "w.bin").write_bytes(pickle.dumps(obj))
    with pytest.raises(DataError, match=r"w\.bin: " + message):
        load_bin(tmp_path / "w.bin")


def test_load_bin_image_does_not_decode(tmp_path):
    (tmp_path / "d.bin").write_bytes(pickle.dumps(([encode(rand_images(1)[0]), b"garbage"], [True])))
    with pytest.raises(DataError, match=r"d\.bin image 1: image does not decode"):
        load_bin(tmp_path / "d.bin")


# --- LFW pairs.txt ----------------------------------------------------------------------------------------

def lfw_tree(root: Path) -> dict[tuple[str, int], np.ndarray]:
    people = {("Ann_A", 1): 0, ("Ann_A", 2): 1, ("Bob_B", 1): 2, ("Bob_B", 3): 3, ("Cy_C", 1): 4}
    images = dict(zip(people, rand_images(5, seed=8)))
    for (name, number), image in images.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        suffix = "png" if name == "Bob_B" else "jpg"
        data = encode(image, "PNG")  # PNG bytes inside a .jpg name too: Pillow sniffs the content
        (root / name / f"{name}_{number:04d}.{suffix}").write_bytes(data)
    return images


def test_load_pairs(tmp_path):
    images = lfw_tree(tmp_path / "lfw")
    text = "1 2\nAnn_A 1 2\nBob_B 1 3\nAnn_A 2 Cy_C 1\nBob_B 3 Ann_A 1\n"
    (tmp_path / "pairs.txt").write_text(text)
    got, same = load_pairs(tmp_path / "pairs.txt", tmp_path / "lfw")
    order = [("Ann_A", 1), ("Ann_A", 2), ("Bob_B", 1), ("Bob_B", 3), ("Ann_A", 2), ("Cy_C", 1), ("Bob_B", 3),
             ("Ann_A", 1)]
    np.testing.assert_array_equal(got, np.stack([images[k] for k in order]))
    assert same.tolist() == [True, True, False, False]


def test_load_pairs_names_with_a_dot(tmp_path):
    images = rand_images(3, seed=10)
    for (name, number), image in zip((("J.Smith", 1), ("J.Smith", 2), ("K.Lee", 1)), images):
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / f"{name}_{number:04d}.png").write_bytes(encode(image, "PNG"))
    (tmp_path / "pairs.txt").write_text("1 1\nJ.Smith 1 2\nJ.Smith 2 K.Lee 1\n")
    got, same = load_pairs(tmp_path / "pairs.txt", tmp_path)
    np.testing.assert_array_equal(got, np.stack([images[0], images[1], images[1], images[2]]))
    assert same.tolist() == [True, False]


@pytest.mark.parametrize("text, message", [
    ("1 1\nAnn_A 1 2\nAnn_A 1 x 2 3\n", r"pairs\.txt line 3: expected 'name i j' or 'name1 i name2 j'"),
    ("1 1\nAnn_A 1\n", r"pairs\.txt line 2: expected 'name i j'"),
    ("ten pairs\n", r"pairs\.txt line 1: expected 'folds pairs_per_fold' or 'pairs'"),
    ("2 1\nAnn_A 1 2\nAnn_A 2 Cy_C 1\n",
     r"pairs\.txt: header promises 2 folds x 1 same \+ 1 different pairs = 4, found 2"),
    ("1 1\nAnn_A 1 7\nAnn_A 2 Cy_C 1\n",
     r"pairs\.txt line 2: image .*Ann_A_0007\.jpg \(or \.jpeg, \.png, .*\) not found"),
])
def test_load_pairs_errors(tmp_path, text, message):
    lfw_tree(tmp_path / "lfw")
    (tmp_path / "pairs.txt").write_text(text)
    with pytest.raises(DataError, match=message):
        load_pairs(tmp_path / "pairs.txt", tmp_path / "lfw")


# --- image folders ----------------------------------------------------------------------------------------

def test_image_folder_labels_suffixes_and_pixels(tmp_path):
    images = rand_images(4, seed=9)
    for name, fname, image in (("bob", "a.PNG", images[0]), ("bob", "b.bmp", images[1]),
                               ("alice", "x.Png", images[2]), ("carl", "z.png", images[3])):
        (tmp_path / name).mkdir(exist_ok=True)
        Image.fromarray(image).save(tmp_path / name / fname, format="BMP" if fname.endswith("bmp") else "PNG")
    (tmp_path / "bob" / "notes.txt").write_text("not an image")
    (tmp_path / "README").write_text("a file at the root is not an identity")
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == ["alice", "bob", "carl"] and ds.num_classes == 3 and len(ds) == 4
    assert [ds[i][1] for i in range(4)] == [0, 1, 1, 2]
    for i, expected in enumerate([images[2], images[0], images[1], images[3]]):
        np.testing.assert_array_equal(ds[i][0], expected)
    jpg = tmp_path / "dave"
    jpg.mkdir()
    Image.fromarray(images[0]).save(jpg / "q.JPEG", format="JPEG", quality=95)
    assert ImageFolderDataset(tmp_path).num_classes == 4


def test_to_labelled_tensor_resizes_to_first_image_or_size(tmp_path):
    big, small = rand_images(1, seed=10, size=(8, 6))[0], rand_images(1, seed=11, size=(4, 3))[0]
    for name, image in (("a", big), ("b", small)):
        (tmp_path / name).mkdir()
        Image.fromarray(image).save(tmp_path / name / "0.png")
    images, labels = to_labelled_tensor(ImageFolderDataset(tmp_path))
    assert images.shape == (2, 3, 8, 6) and images.dtype == torch.uint8 and labels.tolist() == [0, 1]
    assert labels.dtype == torch.int64
    np.testing.assert_array_equal(images[0].permute(1, 2, 0).numpy(), big)
    reference = np.asarray(Image.fromarray(small).resize((6, 8), Image.BILINEAR))
    np.testing.assert_array_equal(images[1].permute(1, 2, 0).numpy(), reference)
    images, _ = to_labelled_tensor(ImageFolderDataset(tmp_path), size=(5, 7))
    assert images.shape == (2, 3, 5, 7)


@pytest.mark.parametrize("layout, message", [
    ({}, r"no identity sub-folders"),
    ({"file.png": None}, r"no identity sub-folders"),
    ({"alice/": None}, r"alice: identity folder holds no"),
])
def test_image_folder_errors(tmp_path, layout, message):
    for name in layout:
        if name.endswith("/"):
            (tmp_path / name).mkdir()
        else:
            (tmp_path / name).write_bytes(encode(rand_images(1)[0]))
    with pytest.raises(DataError, match=message):
        ImageFolderDataset(tmp_path)


def test_image_folder_corrupt_jpeg_names_the_file(tmp_path):
    (tmp_path / "alice").mkdir()
    (tmp_path / "alice" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(DataError, match=r"alice/broken\.jpg: image does not decode"):
        ImageFolderDataset(tmp_path)[0]


def test_package_import_is_light_and_synthetic_still_imports():
    code = ("import sys, marginsearch.trainers.data as d; "
            "assert 'torch' not in sys.modules and 'PIL' not in sys.modules;"
            "assert issubclass(d.DataError, ValueError); import marginsearch.trainers.data.synthetic; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert out.stdout.strip() == "ok", out.stderr
