"""`fmjax bench search`: queries/s of fmjax's exact search (a jitted matmul +
running top-k over the corpus sharded on this host's devices) against faiss's
`IndexFlatIP` on the same corpus and queries, measured in one run."""

from __future__ import annotations

import importlib.metadata as md
import os
import time

import numpy as np

from fmjax.bench import cpu_model, library_versions
from fmjax.config import ConfigError
from fmjax.inference.search import ShardedCorpus, unit_rows

TARGET_SPEEDUP = 1.0
TIE_TOLERANCE = 1e-5  # a rank may differ only between scores this close


def bench_search(
    count: int = 1_000_000,
    dim: int = 384,
    queries: int = 1000,
    k: int = 10,
    repeats: int = 3,
    seed: int = 0,
    against: str = "faiss",
) -> dict:
    """Seeded Gaussian corpus [count, dim] and queries [queries, dim], rows
    normalised, float32. Each side searches all queries `repeats` times, the
    two interleaved so both see the same machine state; the median time counts
    (corpus placement, faiss's `add` and fmjax's compile are reported apart).
    Results: the fraction of queries whose top-k ids are identical, and whether
    every differing rank is a near-tie (scores within TIE_TOLERANCE)."""
    if against not in ("", "faiss"):
        raise ConfigError(f"--against {against!r}; expected 'faiss'")
    rng = np.random.default_rng(seed)
    corpus_ND = unit_rows(rng.standard_normal((count, dim), dtype=np.float32))
    queries_QD = unit_rows(rng.standard_normal((queries, dim), dtype=np.float32))

    start = time.perf_counter()
    corpus = ShardedCorpus.place(corpus_ND)
    corpus.rows_ND.block_until_ready()
    place_s = time.perf_counter() - start
    start = time.perf_counter()
    corpus.top_k(queries_QD, k)  # compiles
    compile_s = time.perf_counter() - start

    index = None
    if against:
        try:
            import faiss
        except ModuleNotFoundError as e:
            raise ConfigError(
                f"bench search --against faiss needs faiss-cpu ({e}): "
                "pip install faiss-cpu"
            ) from None
        start = time.perf_counter()
        index = faiss.IndexFlatIP(dim)
        index.add(corpus_ND)
        add_s = time.perf_counter() - start

    times = {"fmjax": [], "faiss": []}
    for _ in range(repeats):
        start = time.perf_counter()
        scores_QK, ids_QK = corpus.top_k(queries_QD, k)
        times["fmjax"].append(time.perf_counter() - start)
        if index is not None:
            start = time.perf_counter()
            faiss_scores_QK, faiss_ids_QK = index.search(queries_QD, k)
            times["faiss"].append(time.perf_counter() - start)

    def side(seconds):
        return {
            "seconds": seconds,
            "median_s": float(np.median(seconds)),
            "queries_per_s": queries / float(np.median(seconds)),
        }

    result = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "devices": len(corpus.rows_ND.sharding.device_set),
        "versions": {**library_versions(), **_faiss_version()},
        "corpus": [count, dim],
        "queries": queries,
        "k": k,
        "seed": seed,
        "fmjax": {**side(times["fmjax"]), "place_s": place_s, "compile_s": compile_s},
    }
    if index is not None:
        same_QK = ids_QK == faiss_ids_QK
        gaps = np.abs(scores_QK - faiss_scores_QK)[~same_QK]
        result["faiss"] = {**side(times["faiss"]), "add_s": add_s}
        result["identical_queries"] = float(np.mean(same_QK.all(axis=1)))
        result["differing_ranks"] = int((~same_QK).sum())
        result["differences_are_ties"] = bool(np.all(gaps <= TIE_TOLERANCE))
        result["max_score_difference"] = float(
            np.abs(scores_QK - faiss_scores_QK)[same_QK].max(initial=0.0)
        )
        result["speedup_vs_faiss"] = (
            result["fmjax"]["queries_per_s"] / result["faiss"]["queries_per_s"]
        )
        result["target"] = TARGET_SPEEDUP
    return result


def _faiss_version() -> dict:
    try:
        return {"faiss-cpu": md.version("faiss-cpu")}
    except md.PackageNotFoundError:
        return {}
