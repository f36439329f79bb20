"""The inference commands of the `fmjax` CLI, their parsers and handlers: `eval
--tasks` (lm-evaluation-harness), `generate` (optionally retrieval-augmented),
`embed` and `search`. Handlers call the library; `fmjax.cli` dispatches."""

from __future__ import annotations

import json
import os

from fmjax.errors import RequestError


def _shots(text: str) -> list[int | None]:
    from fmjax.config import ConfigError

    if not text:
        return [None]
    try:
        shots = [int(k) for k in text.split(",")]
    except ValueError:
        shots = [-1]
    if any(k < 0 for k in shots):
        raise ConfigError(
            f"--num-fewshot {text!r}: expected a count >= 0 or counts like 0,1,2,4,8"
        )
    return shots


def cmd_lm_eval(args, overrides):
    """`fmjax eval --tasks`: lm-evaluation-harness on the workdir's decoder."""
    from fmjax import storage
    from fmjax.config import ConfigError

    try:
        from fmjax.inference.lm_eval import FmjaxLM, evaluate_shots, format_table
    except ModuleNotFoundError as e:
        raise ConfigError(
            f"fmjax eval --tasks needs lm-evaluation-harness ({e}): "
            "pip install 'fmjax[eval]'"
        ) from None
    import fmjax

    if overrides:
        raise ConfigError(
            f"fmjax eval --tasks takes no --config overrides: {overrides}"
        )
    tasks = [t for t in args.tasks.split(",") if t]
    shots = _shots(args.num_fewshot)
    if args.plot and len(shots) < 2:
        raise ConfigError(
            "--plot draws accuracy against k: give --num-fewshot 0,1,2,4,8"
        )
    lm = FmjaxLM(fmjax.load(args.workdir), batch_size=args.batch_size)
    out_dir = args.output or storage.join(args.workdir, "lm_eval")
    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)  # lm-eval: a count of docs; below 1, a fraction
    options = {"fewshot_encoder": args.fewshot_encoder or None}
    if args.retrieve:
        options["retrieve"] = {
            "index": args.retrieve,
            "k": args.k,
            "template": args.rag_template,
        }
    result = evaluate_shots(lm, tasks, shots, limit, out_dir, args.plot, **options)
    if args.json:
        print(json.dumps({"table": result["table"], "output": out_dir}))
    else:
        print(format_table(result["table"]))
        print(f"results: {out_dir}/results.json")
    return 0


def _read_prompts(args) -> list[str]:
    """--prompt (repeatable) and the texts of --prompt-file (its lines, or a
    .jsonl file's "prompt" fields)."""
    prompts = list(args.prompt or [])
    if args.prompt_file:
        prompts += read_texts(args.prompt_file, "prompt")
    if not prompts:
        raise RequestError("no prompt: give --prompt TEXT or --prompt-file FILE")
    return prompts


def cmd_generate(args, overrides):
    import fmjax

    prompts = _read_prompts(args)
    model = fmjax.load(args.workdir)
    passages = None
    if args.retrieve:
        from fmjax.inference.search import Index, augment

        passages = Index.load(args.retrieve).search_texts(prompts, args.k)
        sent = [
            augment(p, h, args.rag_template)
            for p, h in zip(prompts, passages, strict=True)
        ]
    else:
        sent = prompts
    if args.show_prompt:
        for prompt in sent:
            print(f"--- prompt sent to the model ---\n{prompt}\n---", flush=True)
    settings = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop or ()),
    )
    if len(prompts) == 1 and not args.json:  # text as it is decoded
        print(prompts[0], end="", flush=True)
        for piece in model.stream(sent[0], **settings):
            print(piece, end="", flush=True)
        print()
        return 0
    texts = model.generate(
        sent, batch_size=args.batch_size, progress=len(prompts) > 1, **settings
    )
    if args.json:
        completions = [
            {"prompt": p, "completion": t} for p, t in zip(prompts, texts, strict=True)
        ]
        if passages is not None:
            for record, hits, prompt in zip(completions, passages, sent, strict=True):
                record["passages"] = [hit._asdict() for hit in hits]
                record["prompt_sent"] = prompt
        print(json.dumps({"completions": completions, **settings}))
    else:
        for prompt, text in zip(prompts, texts, strict=True):
            print(f"{prompt}{text}\n")
    return 0


def cmd_embed(args, overrides):
    """An index directory of the input's passages, or (--output FILE.npy) just
    the embedding matrix as `Model.embed` gives it."""
    import numpy as np

    import fmjax
    from fmjax.inference.search import Index, read_passages

    passages = read_passages(args.input)
    encoder = fmjax.load(args.workdir)
    if args.output.endswith(".npy"):
        embeddings = encoder.embed([p["text"] for p in passages], args.batch_size)
        np.save(args.output, embeddings)
        print(f"wrote {embeddings.shape[0]} x {embeddings.shape[1]} to {args.output}")
        return 0
    index = Index.build(
        encoder,
        passages,
        batch_size=args.batch_size,
        progress=True,
        encoder_path=encoder_reference(args.workdir),
    )
    index.save(args.output)
    count, dim = index.embeddings_ND.shape
    print(f"wrote an index of {count} passages x {dim} to {args.output}")
    return 0


def encoder_reference(workdir: str) -> str:
    """How an index records its encoder so `fmjax search` finds it from any
    directory: a local path made absolute; a name (all-MiniLM-L6-v2) or a
    remote path as given."""
    from fmjax import storage
    from fmjax.convert.sentence_transformers import MINILM

    if workdir == MINILM or storage.is_remote(workdir):
        return workdir
    return os.path.abspath(workdir)


def read_texts(path: str, field: str, strings: bool = False) -> list[str]:
    """A file's texts: its non-empty lines, or for .jsonl each line's object's
    `field` (with `strings`, a bare JSON string too, for texts with newlines);
    errors name the file's line."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if not path.endswith(".jsonl"):
                texts.append(line.rstrip("\n"))
                continue
            record = json.loads(line)
            text = record.get(field) if isinstance(record, dict) else None
            if strings and isinstance(record, str):
                text = record
            if not isinstance(text, str):
                what = "a JSON string or an object" if strings else "a JSON object"
                raise RequestError(
                    f'{path} line {number}: expected {what} with a "{field}" '
                    f"string, got {line.strip()[:80]!r}"
                )
            texts.append(text)
    return texts


def cmd_search(args, overrides):
    import fmjax
    from fmjax.inference.search import Index

    queries = list(args.query or []) + (
        read_texts(args.query_file, "text", strings=True) if args.query_file else []
    )
    if not queries:
        raise RequestError("fmjax search: give --query TEXT or --query-file FILE")
    args.query = queries
    index = Index.load(args.index)
    encoder = fmjax.load(args.workdir) if args.workdir else None
    results = index.search_texts(args.query, args.k, encoder=encoder)
    if args.json:
        print(
            json.dumps(
                {
                    "results": [
                        {"query": q, "hits": [hit._asdict() for hit in hits]}
                        for q, hits in zip(args.query, results, strict=True)
                    ]
                },
                ensure_ascii=False,
            )
        )
        return 0
    for query, hits in zip(args.query, results, strict=True):
        print(f"query: {query}")
        for rank, hit in enumerate(hits, 1):
            text = hit.text if len(hit.text) <= 100 else hit.text[:97] + "..."
            print(f"{rank:3d}. {hit.score:.4f}  [{hit.id}] {text}")
    return 0


def add_retrieval_arguments(parser, what: str) -> None:
    """--retrieve INDEX, -k and --rag-template: the top-k passages go in front
    of `what` (generate's prompts, eval's contexts)."""
    rag = parser.add_argument_group("retrieval-augmented prompts")
    rag.add_argument(
        "--retrieve",
        default="",
        help=f"an index directory (fmjax embed): put the top-k passages nearest "
        f"{what} in front of it",
    )
    rag.add_argument("-k", type=int, default=3, help="passages to retrieve")
    rag.add_argument(
        "--rag-template",
        default="",
        help="how passages and prompt combine (default: passages, a blank line, "
        "the prompt); fields {passages} and {prompt}",
    )


def add_generate_parser(sub) -> None:
    generate = sub.add_parser(
        "generate", help="continue prompts with a decoder (KV-cache decoding)"
    )
    generate.add_argument("--workdir", required=True, help="or an HF GPT-2 directory")
    generate.add_argument(
        "--prompt", action="append", help="a prompt (repeat for several)"
    )
    generate.add_argument(
        "--prompt-file", default="", help="one prompt a line (.jsonl: a 'prompt' key)"
    )
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.add_argument(
        "--temperature", type=float, default=0.0, help="0: greedy (the default)"
    )
    generate.add_argument("--top-k", type=int, default=0, help="0: off")
    generate.add_argument("--top-p", type=float, default=1.0, help="1: off")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument(
        "--stop", action="append", help="end the text before this string (repeatable)"
    )
    generate.add_argument("--batch-size", type=int, default=8)
    generate.add_argument(
        "--json", action="store_true", help="print one JSON object, not text"
    )
    add_retrieval_arguments(generate, "each prompt")
    generate.add_argument(
        "--show-prompt", action="store_true", help="print the prompt actually sent"
    )
    generate.set_defaults(func=cmd_generate)


def add_embed_parsers(sub) -> None:
    embed = sub.add_parser(
        "embed", help="embed passages into a search index (or a .npy matrix)"
    )
    embed.add_argument("--workdir", required=True, help="the encoder (or HF directory)")
    embed.add_argument(
        "--input",
        required=True,
        help="a .txt file (one passage a line) or .jsonl ({'id', 'text'} objects)",
    )
    embed.add_argument(
        "--output", required=True, help="an index directory, or FILE.npy for the matrix"
    )
    embed.add_argument("--batch-size", type=int, default=64)
    embed.set_defaults(func=cmd_embed)

    search = sub.add_parser("search", help="nearest passages of an index to a query")
    search.add_argument("--index", required=True, help="a directory from fmjax embed")
    search.add_argument("--query", action="append", help="repeat for several")
    search.add_argument(
        "--query-file",
        default="",
        help="queries, one per line (.jsonl: a JSON string or an object with "
        '"text" per line, for queries with newlines)',
    )
    search.add_argument("-k", type=int, default=5)
    search.add_argument(
        "--workdir", default="", help="the query encoder (default: the index's own)"
    )
    search.add_argument("--json", action="store_true")
    search.set_defaults(func=cmd_search)


def cmd_bench_search(args, overrides):
    from fmjax.bench_search import bench_search

    result = bench_search(
        args.count, args.dim, args.queries, args.k, args.repeats, args.seed,
        args.against,
    )  # fmt: skip
    if not args.json:
        print(
            f"{result['cpu']}, {result['cores']} cores, {result['devices']} device(s)"
        )
        for name in ("fmjax", "faiss"):
            if name in result:
                r = result[name]
                print(
                    f"{name:6s} {r['queries_per_s']:9.1f} queries/s "
                    f"(median of {len(r['seconds'])}: {r['median_s']:.3f} s)"
                )
        if "speedup_vs_faiss" in result:
            print(
                f"fmjax / faiss: {result['speedup_vs_faiss']:.2f}x (target >= "
                f"{result['target']}); identical top-{args.k}: "
                f"{result['identical_queries']:.1%} of queries, other ranks ties: "
                f"{result['differences_are_ties']}"
            )
    print(json.dumps(result))
    return 0


def _settings(text: str) -> list[tuple[str, int]]:
    from fmjax.config import ConfigError

    settings = []
    for item in filter(None, text.split(",")):
        task, _, shots = item.rpartition(":")
        if not task or not shots.isdigit():
            raise ConfigError(
                f"--settings item {item!r}: expected TASK:SHOTS, e.g. rt_sentiment:0"
            )
        settings.append((task, int(shots)))
    return settings


def cmd_bench_eval(args, overrides):
    from fmjax.bench_eval import bench_eval

    result = bench_eval(
        args.hf, _settings(args.settings), args.limit, args.batch_size,
        args.layers, args.width, args.heads, args.vocab_size, args.repeats,
    )  # fmt: skip
    if not args.json:
        print(f"{result['cpu']}, {result['cores']} cores, model {result['model']}")
        for row in result["rows"]:
            fm, hf = row["fmjax"], row["hf"]
            print(
                f"{row['task']} {row['num_fewshot']}-shot, {row['requests']} requests: "
                f"fmjax {fm['requests_per_s']:7.1f}/s, hf {hf['requests_per_s']:7.1f}/s"
                f" = {row['speedup_vs_hf']:.2f}x (target >= {result['target']}); "
                f"scores {fm['score']:.4f} / {hf['score']:.4f}"
            )
            if "necessary" in row:
                print(
                    f"  at the matmul peak its FLOPs take "
                    f"{row['necessary']['seconds_at_peak']:.2f} s: fmjax runs at "
                    f"{fm['fraction_of_peak']:.0%} of it, hf at "
                    f"{hf['fraction_of_peak']:.0%}; at most "
                    f"{row['speedup_bound_at_peak']:.2f}x hf is possible here"
                )
    print(json.dumps(result))
    return 0


def add_bench_parsers(bench_sub) -> None:
    search = bench_sub.add_parser(
        "search", help="exact search queries/s against faiss IndexFlatIP"
    )
    search.add_argument("--count", type=int, default=1_000_000, help="corpus rows")
    search.add_argument("--dim", type=int, default=384)
    search.add_argument("--queries", type=int, default=1000)
    search.add_argument("-k", type=int, default=10)
    search.add_argument("--repeats", type=int, default=3)
    search.add_argument("--seed", type=int, default=0)
    search.add_argument("--against", default="faiss", help="'faiss', or '' for none")
    search.add_argument("--json", action="store_true", help="only the JSON line")
    search.set_defaults(func=cmd_bench_search)

    evaluate = bench_sub.add_parser(
        "eval", help="lm-eval requests/s: fmjax's LM against lm-eval's hf model"
    )
    evaluate.add_argument(
        "--hf", default="", help="an HF GPT-2 directory (default: a random one)"
    )
    evaluate.add_argument(
        "--settings",
        default="rt_sentiment:0,bbc_topic:2,bbc_topic_fixed:4",
        help="TASK:SHOTS,... (shipped names or YAML files)",
    )
    evaluate.add_argument("--limit", type=int, default=50, help="docs per task")
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--layers", type=int, default=12)
    evaluate.add_argument("--width", type=int, default=768)
    evaluate.add_argument("--heads", type=int, default=12)
    evaluate.add_argument("--vocab-size", type=int, default=16384)
    evaluate.add_argument("--repeats", type=int, default=2)
    evaluate.add_argument("--json", action="store_true", help="only the JSON line")
    evaluate.set_defaults(func=cmd_bench_eval)
