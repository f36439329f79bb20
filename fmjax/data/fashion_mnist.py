"""Fashion-MNIST as a TFDS builder, from Debian's dataset-fashion-mnist
package (the IDX files of Zalando's release); registered with TFDS by
importing `fmjax.data.sources`, which lists it among the shipped builders."""

from __future__ import annotations

import os
import pathlib

import tensorflow_datasets as tfds

from fmjax.data.emoji import EmojiCaptions

FASHION_MNIST_LABELS = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
# Debian's dataset-fashion-mnist package (the IDX files of Zalando's release).
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: pathlib.Path):
    """The array in a (gzipped) IDX file: uint8 images [N, H, W] or labels [N]."""
    import gzip

    import numpy as np

    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = data[0] << 8 | data[1], data[2], data[3]
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not a uint8 IDX file (header {data[:4]!r})")
    shape = tuple(
        int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)
    )
    values = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if values.size != int(np.prod(shape)):
        raise ValueError(f"{path}: {values.size} values for shape {shape}")
    return values.reshape(shape)


def _fashion_mnist_dir() -> pathlib.Path:
    path = pathlib.Path(os.environ.get("FMJAX_FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    missing = [
        n for pair in _IDX_FILES.values() for n in pair if not (path / n).is_file()
    ]
    if missing:
        raise FileNotFoundError(
            f"fashion_mnist needs the IDX files {missing} in {str(path)!r}: install "
            "Debian's package (sudo apt-get install dataset-fashion-mnist) or set "
            "$FMJAX_FASHION_MNIST_DIR to a directory that holds them"
        )
    return path


class FashionMnist(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST (Xiao et al., 2017): 28x28 grey images of 10 kinds of
    clothing, 60,000 train and 10,000 test, from Debian's dataset-fashion-mnist.
    The TFDS catalog's name, features (`image` uint8 [28, 28, 1], `label`) and
    splits, so a config reads the catalog's dataset where that is prepared."""

    VERSION = tfds.core.Version("3.0.1")  # the catalog's version
    RELEASE_NOTES = {"3.0.1": "Built from Debian's dataset-fashion-mnist."}

    # Where TFDS looks for a checksums file (see fmjax.data.sources.BbcNews):
    # none, as the emoji builder has none.
    code_path = EmojiCaptions.code_path

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(
                        shape=(28, 28, 1), encoding_format="png"
                    ),
                    "label": tfds.features.ClassLabel(names=list(FASHION_MNIST_LABELS)),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://github.com/zalandoresearch/fashion-mnist",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # The IDX files come with a Debian package.
        path = _fashion_mnist_dir()
        return {
            split: self._generate_examples(path / images, path / labels)
            for split, (images, labels) in _IDX_FILES.items()
        }

    def _generate_examples(self, images_path, labels_path):
        import io

        from PIL import Image

        images_NHW, labels_N = read_idx(images_path), read_idx(labels_path)
        if len(images_NHW) != len(labels_N):
            raise ValueError(
                f"{images_path} has {len(images_NHW)} images, {labels_path} "
                f"{len(labels_N)} labels"
            )
        for index, (image_HW, label) in enumerate(
            zip(images_NHW, labels_N, strict=True)
        ):
            png = io.BytesIO()
            Image.fromarray(image_HW).save(png, format="PNG")
            yield index, {"image": png.getvalue(), "label": int(label)}
