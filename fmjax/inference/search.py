"""Semantic search: an index of normalised passage embeddings and exact top-k.

    index = Index.build(fmjax.load("all-MiniLM-L6-v2 dir"), read_passages("c.jsonl"))
    index.save("index/")
    Index.load("index/").search_texts(["who won?"], k=5)   # [[Hit(id, text, score)]]

Exact search is one jitted program: the corpus matrix lies sharded by rows over
the devices of a 1-D mesh (all local devices by default); each device scans its
rows in chunks, keeping a running top-k of query . passage scores, and the
devices' top-k lists are merged into the global one. The same code serves one
CPU and a pod slice. Ties go to the lower passage index, as a stable argsort.

An index directory holds `embeddings.safetensors` ([N, D] float32 unit rows),
`passages.jsonl` (one {"id", "text"} per row) and `index.json` (the encoder
that embedded it, which also embeds the queries).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fmjax.errors import RequestError

AXIS = "corpus"
EMBEDDINGS_FILENAME = "embeddings.safetensors"
PASSAGES_FILENAME = "passages.jsonl"
META_FILENAME = "index.json"
CHUNK_ROWS = 32768  # scores of one chunk: [queries, CHUNK_ROWS] float32
QUERY_BLOCK = 1024  # queries per call; fewer are padded to a power of two
TOP_K_BLOCK = 128  # a chunk's top-k looks first at the maxima of blocks this wide
# A retrieval-augmented prompt: the passages (best first, one a line), a blank
# line, then the prompt.
RAG_TEMPLATE = "{passages}\n\n{prompt}"


class Hit(NamedTuple):
    id: str
    text: str
    score: float


def unit_rows(x_ND: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), float32."""
    x_ND = np.asarray(x_ND, np.float32)
    norms_N1 = np.linalg.norm(x_ND, axis=-1, keepdims=True)
    return x_ND / np.maximum(norms_N1, 1e-12)


def augment(prompt: str, hits: Sequence[Hit], template: str = "") -> str:
    """`prompt` with the retrieved passages in front, as `template` (default
    RAG_TEMPLATE, fields {passages} and {prompt}) places them."""
    template = template or RAG_TEMPLATE
    if "{passages}" not in template or "{prompt}" not in template:
        raise RequestError(
            f"RAG template {template!r}: expected both {{passages}} and {{prompt}}"
        )
    passages = "\n".join(hit.text for hit in hits)
    return template.replace("{passages}", passages).replace("{prompt}", prompt)


# --- exact top-k over a sharded corpus -------------------------------------------


@dataclasses.dataclass(frozen=True)
class ShardedCorpus:
    """[N, D] rows padded to `devices x rows_per_device` and split by rows over a
    1-D mesh; rows at or past `count` are padding and never returned."""

    rows_ND: jax.Array
    count: int
    chunk: int
    mesh: jax.sharding.Mesh

    @classmethod
    def place(cls, embeddings_ND, devices=None, chunk: int = CHUNK_ROWS):
        embeddings_ND = np.asarray(embeddings_ND, np.float32)
        if embeddings_ND.ndim != 2 or not len(embeddings_ND):
            raise RequestError(
                f"corpus embeddings of shape {embeddings_ND.shape}: expected [N, D] "
                "with N >= 1"
            )
        devices = list(devices if devices is not None else jax.devices())
        count, dim = embeddings_ND.shape
        per_device = -(-count // len(devices))
        chunk = min(chunk, per_device)
        per_device = -(-per_device // chunk) * chunk
        padded_ND = np.zeros((per_device * len(devices), dim), np.float32)
        padded_ND[:count] = embeddings_ND
        mesh = jax.sharding.Mesh(np.array(devices), (AXIS,))
        sharding = NamedSharding(mesh, P(AXIS, None))
        rows_ND = jax.make_array_from_callback(
            padded_ND.shape, sharding, lambda index: padded_ND[index]
        )
        return cls(rows_ND, count, chunk, mesh)

    def top_k(self, queries_QD, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k], passage indices [Q, k]) by inner product, best first."""
        queries_QD = np.asarray(queries_QD, np.float32)
        dim = self.rows_ND.shape[1]
        if queries_QD.ndim != 2 or queries_QD.shape[1] != dim:
            raise RequestError(
                f"queries of shape {queries_QD.shape}: expected [Q, {dim}]"
            )
        if not 1 <= k <= self.count:
            raise RequestError(f"k={k}: expected 1 <= k <= {self.count} (passages)")
        scores, indices = [], []
        for start in range(0, len(queries_QD), QUERY_BLOCK):
            block_QD = queries_QD[start : start + QUERY_BLOCK]
            padded = max(8, 1 << (len(block_QD) - 1).bit_length())
            block_QD = np.pad(block_QD, ((0, padded - len(block_QD)), (0, 0)))
            s_QK, i_QK = _top_k(
                block_QD,
                self.rows_ND,
                k=k,
                count=self.count,
                chunk=self.chunk,
                mesh=self.mesh,
            )
            rows = min(QUERY_BLOCK, len(queries_QD) - start)
            scores.append(np.asarray(s_QK)[:rows])
            indices.append(np.asarray(i_QK)[:rows])
        if not scores:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
        return np.concatenate(scores), np.concatenate(indices)


def block_top_k(scores_QS, k: int, block: int = TOP_K_BLOCK):
    """`jax.lax.top_k(scores_QS, k)`, the same values and indices, ties to the
    lower index, from fewer candidates: each row's top k lie in the k blocks
    of `block` columns with the largest maxima (a block left out has k blocks
    at least as good before it), so only those k * block scores are ranked.
    On XLA:CPU ranking a whole chunk's row cost a fifth of its matmul's time
    (docs/benchmarks.md, "Exact search against faiss")."""
    queries, width = scores_QS.shape
    if width % block or k > width // block:
        return jax.lax.top_k(scores_QS, k)
    blocks_QBW = scores_QS.reshape(queries, width // block, block)
    _, best_QK = jax.lax.top_k(blocks_QBW.max(axis=-1), k)
    best_QK = jnp.sort(best_QK, axis=-1)  # candidates in index order: ties
    candidates_QKW = jnp.take_along_axis(blocks_QBW, best_QK[..., None], axis=1)
    top_QK, where_QK = jax.lax.top_k(candidates_QKW.reshape(queries, k * block), k)
    in_block_QK = jnp.take_along_axis(best_QK, where_QK // block, axis=1)
    return top_QK, in_block_QK * block + where_QK % block


def _merge(best, candidates, k: int):
    """Top-k of two (scores [Q, *], indices [Q, *]) lists; on equal scores the
    first list's entries (lower passage indices) win, as lax.top_k keeps order."""
    scores_QM = jnp.concatenate([best[0], candidates[0]], axis=1)
    indices_QM = jnp.concatenate([best[1], candidates[1]], axis=1)
    top_QK, where_QK = jax.lax.top_k(scores_QM, k)
    return top_QK, jnp.take_along_axis(indices_QM, where_QK, axis=1)


@functools.partial(jax.jit, static_argnames=("k", "count", "chunk", "mesh"))
def _top_k(queries_QD, rows_ND, *, k: int, count: int, chunk: int, mesh):
    def shard_top_k(q_QD, shard_RD):
        rows, dim = shard_RD.shape
        first = jax.lax.axis_index(AXIS) * rows
        chunks_CSD = shard_RD.reshape(rows // chunk, chunk, dim)
        starts_C = first + jnp.arange(rows // chunk) * chunk

        def scan_chunk(best, chunk_and_start):
            chunk_SD, start = chunk_and_start
            scores_QS = jnp.einsum("QD,SD->QS", q_QD, chunk_SD)
            index_S = start + jnp.arange(chunk, dtype=jnp.int32)
            scores_QS = jnp.where(index_S < count, scores_QS, -jnp.inf)
            local_QK, where_QK = block_top_k(scores_QS, min(k, chunk))
            return _merge(best, (local_QK, index_S[where_QK]), k), None

        queries = q_QD.shape[0]
        empty = jax.lax.pcast(  # each device's own running list
            (
                jnp.full((queries, k), -jnp.inf, jnp.float32),
                jnp.full((queries, k), -1, jnp.int32),
            ),
            (AXIS,),
            to="varying",
        )
        best, _ = jax.lax.scan(scan_chunk, empty, (chunks_CSD, starts_C))
        return best

    scores_QM, indices_QM = jax.shard_map(
        shard_top_k,
        mesh=mesh,
        in_specs=(P(), P(AXIS, None)),
        out_specs=(P(None, AXIS), P(None, AXIS)),
    )(queries_QD, rows_ND)
    # Every device's k candidates side by side, lowest passage indices first.
    top_QK, where_QK = jax.lax.top_k(scores_QM, k)
    return top_QK, jnp.take_along_axis(indices_QM, where_QK, axis=1)


# --- the index -------------------------------------------------------------------


@dataclasses.dataclass
class Index:
    """Unit-norm passage embeddings with their ids and texts, and the path of the
    encoder that made them (which embeds the queries too)."""

    embeddings_ND: np.ndarray
    ids: list[str]
    texts: list[str]
    encoder: str = ""
    # The loaded encoder (`load_encoder` reads `encoder` when it is None).
    encoder_model: Any = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self):
        count = len(self.embeddings_ND)
        if not len(self.ids) == len(self.texts) == count:
            raise RequestError(
                f"{count} embeddings but {len(self.ids)} ids and {len(self.texts)} "
                "texts: expected one of each per passage"
            )

    @classmethod
    def build(
        cls,
        encoder,
        passages: Sequence[dict],
        batch_size: int = 64,
        progress: bool = False,
        encoder_path: str = "",
    ) -> Index:
        """Embeds each passage's "text" with `encoder` (an `fmjax.api.Model`)."""
        from tqdm.auto import tqdm

        if not passages:
            raise RequestError("no passages to index")
        texts = [p["text"] for p in passages]
        blocks = []
        starts = range(0, len(texts), batch_size)
        for start in tqdm(starts, desc="embed", unit="batch", disable=not progress):
            blocks.append(encoder.embed(texts[start : start + batch_size], batch_size))
        ids = [str(p["id"]) for p in passages]
        index = cls(unit_rows(np.concatenate(blocks)), ids, texts, encoder_path)
        index.encoder_model = encoder
        return index

    @functools.cached_property
    def corpus(self) -> ShardedCorpus:
        return ShardedCorpus.place(self.embeddings_ND)

    def search(self, queries_QD, k: int = 5) -> list[list[Hit]]:
        """The k passages nearest each query embedding (unit vectors), best first."""
        scores_QK, indices_QK = self.corpus.top_k(queries_QD, k)
        return [
            [
                Hit(self.ids[i], self.texts[i], float(s))
                for s, i in zip(row_s, row_i, strict=True)
            ]
            for row_s, row_i in zip(scores_QK, indices_QK, strict=True)
        ]

    def search_texts(self, queries, k: int = 5, encoder=None):
        """`search` for query texts embedded by `encoder` (default: the index's
        own). One string gives one list of hits."""
        if isinstance(queries, str):
            return self.search_texts([queries], k, encoder)[0]
        encoder = encoder or self.load_encoder()
        return self.search(unit_rows(encoder.embed(list(queries))), k)

    def load_encoder(self):
        if self.encoder_model is None:
            import fmjax

            if not self.encoder:
                raise RequestError(
                    "this index records no encoder: pass encoder= (an fmjax model)"
                )
            self.encoder_model = fmjax.load(self.encoder)
        return self.encoder_model

    def save(self, directory: str) -> str:
        from safetensors.numpy import save_file

        os.makedirs(directory, exist_ok=True)
        save_file(
            {"embeddings": self.embeddings_ND},
            os.path.join(directory, EMBEDDINGS_FILENAME),
        )
        with open(os.path.join(directory, PASSAGES_FILENAME), "w") as f:
            for id_, text in zip(self.ids, self.texts, strict=True):
                f.write(json.dumps({"id": id_, "text": text}, ensure_ascii=False))
                f.write("\n")
        meta = {
            "encoder": self.encoder,
            "count": len(self.ids),
            "dim": int(self.embeddings_ND.shape[1]),
        }
        with open(os.path.join(directory, META_FILENAME), "w") as f:
            json.dump(meta, f, indent=2)
        return directory

    @classmethod
    def load(cls, directory: str) -> Index:
        from safetensors.numpy import load_file

        meta_path = os.path.join(directory, META_FILENAME)
        if not os.path.isfile(meta_path):
            raise RequestError(
                f"{directory!r} is not an index (no {META_FILENAME}); build one with "
                "`fmjax embed --workdir ENCODER --input FILE --output DIR`"
            )
        with open(meta_path) as f:
            meta = json.load(f)
        embeddings_ND = load_file(os.path.join(directory, EMBEDDINGS_FILENAME))[
            "embeddings"
        ]
        passages = read_passages(os.path.join(directory, PASSAGES_FILENAME))
        return cls(
            embeddings_ND,
            [p["id"] for p in passages],
            [p["text"] for p in passages],
            meta.get("encoder", ""),
        )


def read_passages(path: str) -> list[dict]:
    """{"id", "text"} records: a .jsonl file's objects ("text" required, "id"
    defaulting to the line number) or a text file's non-empty lines (id: the
    line number, from 1). Ids must be unique."""
    passages = []
    with open(path, encoding="utf-8") as f:
        lines = list(enumerate(f, 1))
    jsonl = path.endswith(".jsonl")
    for number, line in lines:
        if not line.strip():
            continue
        if not jsonl:
            passages.append({"id": str(number), "text": line.rstrip("\n")})
            continue
        record = json.loads(line)
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise RequestError(
                f'{path} line {number}: expected a JSON object with a "text" string '
                f"(and an optional id), got {line.strip()[:80]!r}"
            )
        passages.append({"id": str(record.get("id", number)), "text": record["text"]})
    _check_unique(passages, path)
    return passages


def _check_unique(passages: Iterable[dict], path: str) -> None:
    seen = set()
    for passage in passages:
        if passage["id"] in seen:
            raise RequestError(f"{path}: id {passage['id']!r} appears twice")
        seen.add(passage["id"])
