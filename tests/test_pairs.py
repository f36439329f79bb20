"""A user's image-caption pairs, `csv:FILE` / `jsonl:FILE` (fmjax.data.pairs)."""

import csv
import json
import os
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image, UnidentifiedImageError

from fmjax.data import pairs, sources
from fmjax.errors import FormatError


def _save(path, pixels, mode):
    os.makedirs(path.parent, exist_ok=True)
    Image.fromarray(pixels, mode).save(path)
    return pixels


def _write(path, kind, rows, header=None):
    """rows: dicts -> a CSV file (header: the first row's keys) or JSON lines."""
    header = header or list(rows[0])
    with open(path, "w", newline="") as f:
        if kind == "csv":
            writer = csv.DictWriter(f, header)
            writer.writeheader()
            writer.writerows(rows)
        else:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return f"{kind}:{path}"


@pytest.fixture
def images(tmp_path):
    """Images of several sizes and modes: {name: (path, pixels written)}."""
    rng = np.random.default_rng(0)
    gradient = np.linspace(0, 255, 16 * 32 * 3).reshape(16, 32, 3).astype(np.uint8)
    specs = {
        "rgb": ("data/imgs/a.png", "RGB", rng.integers(0, 256, (30, 40, 3), np.uint8)),
        "grey": ("data/imgs/b.png", "L", rng.integers(0, 256, (24, 20), np.uint8)),
        "jpeg": ("data/imgs/c.jpg", "RGB", gradient),
        "rgba": (
            "elsewhere/d.png",
            "RGBA",
            rng.integers(0, 256, (12, 10, 4), np.uint8),
        ),
    }
    return {
        key: (path, _save(tmp_path / path, pixels, mode))
        for key, (path, mode, pixels) in specs.items()
    }


def _rows(tmp_path, image="image", caption="caption"):
    """Relative, './'-prefixed and absolute paths; images a and b have two rows."""
    return [
        {image: "imgs/b.png", caption: "a grey square"},
        {image: "imgs/a.png", caption: "a noisy picture"},
        {image: "imgs/b.png", caption: "  still grey  "},
        {image: str(tmp_path / "elsewhere/d.png"), caption: "a dog, with alpha"},
        {image: "./imgs/a.png", caption: "more noise"},
        {image: "imgs/c.jpg", caption: "a gradient"},
    ]


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_records_group_captions_per_image_in_order_of_first_row(tmp_path, images, kind):
    name = _write(tmp_path / f"data/pairs.{kind}", kind, _rows(tmp_path))
    sources.check_dataset(name)
    source = sources.load_source(name, "train")
    assert len(source) == 4
    records = [source[i] for i in range(4)]
    assert [r["captions"] for r in records] == [
        ["a grey square", "still grey"],
        ["a noisy picture", "more noise"],
        ["a dog, with alpha"],
        ["a gradient"],
    ]
    grey, rgb, rgba, jpeg = (r["image"] for r in records)
    assert all(r["image"].dtype == np.uint8 for r in records)
    np.testing.assert_array_equal(grey, images["grey"][1][..., None])  # [H, W, 1]
    np.testing.assert_array_equal(rgb, images["rgb"][1])
    np.testing.assert_array_equal(rgba, images["rgba"][1][..., :3])  # alpha dropped
    assert jpeg.shape == (16, 32, 3)  # lossy: close to the pixels written
    assert np.abs(jpeg.astype(int) - images["jpeg"][1]).mean() < 3

    info = sources.dataset_info(name)
    assert sorted(info.features) == ["captions", "image"]
    assert isinstance(info.features["captions"], tfds.features.Sequence)
    assert isinstance(info.features["captions"].feature, tfds.features.Text)
    assert info.splits == ("train",)


def test_custom_column_names(tmp_path, images):
    rows = [dict(r, id=i) for i, r in enumerate(_rows(tmp_path, "file", "text"))]
    name = _write(tmp_path / "data/named.csv", "csv", rows)
    source = sources.load_source(name, "train", columns=("file", "text"))
    assert source[0]["captions"] == ["a grey square", "still grey"]
    assert sources.dataset_info(name, columns=("file", "text")).splits == ("train",)
    # The default names are looked for otherwise, and the error lists both.
    expected = (
        r"no column \['image', 'caption'\]; columns found: \['file', 'text', 'id'\]"
    )
    with pytest.raises(FormatError, match=r"named.csv line 1 \(header\): " + expected):
        sources.check_dataset(name)
    with pytest.raises(ValueError, match="two different names"):
        sources.check_dataset(name, columns=("file", "file"))


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_a_split_column_and_slices(tmp_path, images, kind):
    splits = ["train", "test", "train", "validation", "test", "train"]
    rows = [dict(r, split=s) for r, s in zip(_rows(tmp_path), splits, strict=True)]
    name = _write(tmp_path / f"data/split.{kind}", kind, rows)
    assert sorted(sources.dataset_info(name).splits) == ["test", "train", "validation"]

    def captions(split):
        return [record["captions"] for record in sources.load_source(name, split)]

    grey, gradient = ["a grey square", "still grey"], ["a gradient"]
    assert captions("train") == [grey, gradient]
    assert captions("test") == [["a noisy picture", "more noise"]]
    assert captions("validation") == [["a dog, with alpha"]]
    assert captions("train[:50%]") == [grey] and captions("train[50%:]") == [gradient]
    with pytest.raises(ValueError, match=r"Unknown split 'dev'.*\['test', 'train', "):
        sources.load_source(name, "dev")


def test_images_are_opened_only_when_read(tmp_path, images):
    (tmp_path / "data/imgs/broken.png").write_bytes(b"not a png")
    rows = [*_rows(tmp_path), {"image": "imgs/broken.png", "caption": "broken"}]
    name = _write(tmp_path / "data/pairs.csv", "csv", rows)
    sources.check_dataset(name)
    source = sources.load_source(name, "train")
    assert source[0]["captions"] == ["a grey square", "still grey"]
    with pytest.raises(UnidentifiedImageError):
        source[4]


def test_an_edited_file_is_scanned_again(tmp_path, images):
    path = tmp_path / "data/pairs.jsonl"
    name = _write(path, "jsonl", _rows(tmp_path)[:2])
    assert len(sources.load_source(name, "train")) == 2
    _write(path, "jsonl", _rows(tmp_path))
    assert len(sources.load_source(name, "train")) == 4


def test_other_names_are_not_user_datasets():
    assert pairs.user_dataset("fashion_mnist") is None
    assert pairs.user_dataset("glue/sst2:2.0.0") is None


def _bad_csv(tmp_path, text):
    path = tmp_path / "data/bad.csv"
    path.write_text(text)
    return f"csv:{path}", re.escape(str(path))


@pytest.mark.parametrize(
    "text, error, message",
    [
        ("image,caption\nimgs/a.png,a\nimgs/b.png,\n", FormatError, "line 3: empty"),
        ("image,caption\nimgs/a.png,  \n", FormatError, "line 2: empty caption"),
        ("image,caption\n,a cat\n", FormatError, "line 2: empty image path"),
        ("image,caption\n", FormatError, ": no rows; expected a header row"),
        ("", FormatError, ": no rows"),
        ("image,caption\nimgs/a.png,a, b\n", FormatError, "line 2: 3 fields, the"),
        ("image,caption\nimgs/a.png\n", FormatError, "line 2: 1 fields, the header"),
        ("img,caption\nimgs/a.png,a\n", FormatError, r"line 1 \(header\): no col"),
        (
            "image,caption,split\nimgs/a.png,a,train\nimgs/a.png,b,test\n",
            FormatError,
            "line 3: image .*a.png in split 'test', but line 2 put it in 'train'",
        ),
        (
            "image,caption,split\nimgs/a.png,a,my split\n",
            FormatError,
            "line 2: split 'my split' in column 'split'",
        ),
    ],
)
def test_errors_name_the_file_and_line(tmp_path, images, text, error, message):
    name, path = _bad_csv(tmp_path, text)
    with pytest.raises(error, match=path + " ?" + message):
        sources.check_dataset(name)


def test_missing_files_are_named(tmp_path, images):
    name, path = _bad_csv(tmp_path, "image,caption\nimgs/a.png,a\nimgs/zz.png,b\n")
    resolved = re.escape(str(tmp_path / "data/imgs/zz.png"))
    with pytest.raises(
        FileNotFoundError,
        match=f"{path} line 3: image 'imgs/zz.png' not found: no file {resolved}",
    ):
        sources.check_dataset(name)
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(FileNotFoundError, match=f"no such file {missing}"):
        sources.dataset_info(f"jsonl:{missing}")


def test_jsonl_errors_name_the_line(tmp_path, images):
    path = tmp_path / "data/bad.jsonl"
    lines = ['{"image": "imgs/a.png", "caption": "a"}', "", '{"image": "imgs/b.png"}']
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(
        FormatError,
        match=r"bad.jsonl line 3: no column \['caption'\]; columns found: \['image'\]",
    ):
        sources.check_dataset(f"jsonl:{path}")
    path.write_text('{"image": "imgs/a.png", "caption": ["a", "b"]}\n')
    with pytest.raises(FormatError, match=r"line 1: column 'caption' holds \['a'"):
        sources.check_dataset(f"jsonl:{path}")
    path.write_text('{"image": "imgs/a.png", "caption": "a"}\n{"image": \n')
    with pytest.raises(FormatError, match="line 2: not JSON"):
        sources.check_dataset(f"jsonl:{path}")
    path.write_text("\n\n")
    with pytest.raises(FormatError, match="no rows; expected a JSON line"):
        sources.check_dataset(f"jsonl:{path}")
    name = _write(path, "jsonl", _rows(tmp_path))
    with pytest.raises(ValueError, match=r"Unknown split 'test'.*\['train'\]"):
        sources.load_source(name, "test")
