"""`fmjax` command line: parses arguments and calls the library (nothing else)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from fmjax.inference import commands


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    overrides = [a for a in argv if a.startswith("--config.")]
    rest = [a for a in argv if not a.startswith("--config.")]
    return rest, overrides


def _load_config(args, overrides):
    """--config FILE:VARIANT, or the workdir's saved config.json (local or gs://)."""
    from fmjax import storage
    from fmjax.config import ConfigError, apply_overrides, from_json, load_config

    if args.config:
        return load_config(args.config, overrides)
    saved = storage.join(args.workdir, "config.json")
    if not storage.exists(saved):
        raise ConfigError(f"no --config given and no {saved} to reuse")
    config = from_json(storage.read_text(saved))
    apply_overrides(config, overrides)
    return config


def init_distributed(args) -> None:
    """Starts jax.distributed for a multi-process run, before JAX touches devices.

    From flags (--coordinator/--num-processes/--process-id), else from the
    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables, else
    on a multi-host Cloud TPU VM by JAX's own detection; otherwise one process.
    """
    import jax

    env = os.environ
    coordinator = args.coordinator or env.get("JAX_COORDINATOR_ADDRESS")
    if coordinator:
        num = args.num_processes or int(env.get("JAX_NUM_PROCESSES", "0"))
        index = args.process_id if args.process_id >= 0 else env.get("JAX_PROCESS_ID")
        if not num or index is None:
            from fmjax.config import ConfigError

            raise ConfigError(
                f"coordinator {coordinator!r} needs --num-processes and --process-id "
                "(or JAX_NUM_PROCESSES and JAX_PROCESS_ID)"
            )
        jax.distributed.initialize(coordinator, int(num), int(index))
    elif "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize()


def cmd_train(args, overrides):
    from fmjax.host_devices import split_for_training
    from fmjax.train.loop import train

    config = _load_config(args, overrides)
    split_for_training(config, args.coordinator)
    init_distributed(args)
    summary = train(config, args.workdir)
    print(json.dumps(summary, indent=2))
    return 143 if summary["preempted"] else 0


def cmd_eval(args, overrides):
    if args.tasks:
        return commands.cmd_lm_eval(args, overrides)
    from fmjax.train.loop import evaluate_workdir

    init_distributed(args)
    print(json.dumps(evaluate_workdir(_load_config(args, overrides), args.workdir)))
    return 0


def cmd_data(args, overrides):
    from fmjax.data import sources
    from fmjax.data.tokenizer import tokenizer_for

    data_dir = args.data_dir or sources.default_data_dir()
    path = sources.prepare(args.name, data_dir)
    print(f"prepared {args.name} in {path}")
    if args.vocab_size:
        tok = tokenizer_for(args.name, args.vocab_size, data_dir)
        print(f"tokenizer: {tok.path} ({tok.vocab_size} tokens)")
    return 0


def cmd_bench(args, overrides):
    from fmjax.bench import bench_memory, bench_memory_methods, bench_train

    config = _load_config(args, overrides)
    if args.what == "train":
        from fmjax.host_devices import split_for_training

        split_for_training(config)
    if args.what == "decode":
        return _bench_decode(args, config)
    if args.what == "memory" and args.methods:
        methods = [m for m in args.methods.split(",") if m]
        result = bench_memory_methods(
            config, methods, args.batch_size, args.seq_len, args.topology
        )
        if not args.json:
            for row in result["rows"]:
                keys = ("argument", "temp", "total")
                mib = {k: row[f"{k}_bytes"] / 2**20 for k in keys}
                print(
                    f"{row['method']:6s} arguments {mib['argument']:10.1f} MiB + "
                    f"temporaries {mib['temp']:9.1f} MiB = {mib['total']:10.1f} MiB"
                )
            for name, r in result["ratios"].items():
                print(f"{name}: {r['ratio']:.3f} (target <= {r['target']})")
        print(json.dumps(result))
        return 0
    if args.what == "memory":
        result = bench_memory(config)
        if not args.json:
            for row in result["rows"]:
                print(
                    f"fsdp={row['fsdp']}: params+optimizer "
                    f"{row['state_bytes_compiled'] / 2**20:8.1f} MiB/device "
                    f"({row['ratio_to_fsdp1']:.3f} of fsdp=1; target <= "
                    f"{row['target_ratio']:.3f}), temporaries "
                    f"{row['temp_bytes'] / 2**20:.1f} MiB"
                )
        print(json.dumps(result))
        return 0
    result = bench_train(
        config, args.against, args.warmup, args.steps, rounds=args.rounds
    )
    if not args.json:
        for name in ("fmjax", "hf"):
            if name in result:
                r = result[name]
                unit = next(
                    u for u in ("tokens", "images", "pairs") if f"{u}_per_s" in r
                )
                print(
                    f"{name:6s} {r[f'{unit}_per_s']:10.0f} {unit}/s  "
                    f"{r['step_s'] * 1e3:8.1f} ms/step  MFU {r['mfu']:.1%}"
                )
        if "speedup_vs_hf" in result:
            print(
                f"fmjax / hf {unit}/s: {result['speedup_vs_hf']:.2f}x (at most "
                f"{result['speedup_bound_at_peak']:.2f}x: HF's step over fmjax's "
                "FLOPs at the matmul peak)"
            )
    print(json.dumps(result))
    return 0


def _bench_decode(args, config) -> int:
    from fmjax.bench_decode import bench_decode

    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    result = bench_decode(
        config, args.against, batch_sizes, args.prompt_len, args.new_tokens,
        args.repeats,
    )  # fmt: skip
    if not args.json:
        print(f"{result['cpu']}, {result['threads']} threads")
        for row in result["rows"]:
            for name in ("fmjax", "hf"):
                if name in row:
                    r = row[name]
                    print(
                        f"batch {row['batch_size']} {name:5s} prefill "
                        f"{r['prefill_tokens_per_s']:9.0f} tok/s  decode "
                        f"{r['decode_tokens_per_s']:8.0f} tok/s  first token "
                        f"{r['time_to_first_token_s'] * 1e3:7.1f} ms  "
                        f"{r['fraction_of_peak']:.1%} of peak, "
                        f"{r['fraction_of_bandwidth']:.0%} of streaming per step"
                    )
            if "decode_speedup_vs_hf" in row:
                speedup, ttft = row["decode_speedup_vs_hf"], row["ttft_ratio_to_hf"]
                print(
                    f"batch {row['batch_size']}: decode {speedup:.2f}x HF; first "
                    f"token in {ttft:.2f}x HF's time; fmjax compile "
                    f"{row['fmjax_compile_s']:.1f} s; at most "
                    f"{row['speedup_bound']:.1f}x HF at the step's floor"
                )
    print(json.dumps(result))
    return 0


def cmd_convert(args, overrides):
    from fmjax.convert import hf

    if args.direction == "hf-to-fmjax":
        out = hf.hf_to_fmjax(args.src, args.dst)
    elif args.direction == "lora-to-peft":
        from fmjax.adapt.peft import export_run_to_peft

        out = export_run_to_peft(args.src, args.dst)
    else:
        out = hf.fmjax_to_hf(args.src, args.dst)
    print(f"wrote {out}")
    return 0


def cmd_compile(args, overrides):
    from fmjax.aot import check_fits, compile_for_topology, format_report

    report = compile_for_topology(_load_config(args, overrides), args.topology)
    print(format_report(report))
    if args.json:
        print(json.dumps(report))
    check_fits(report)
    return 0


def _add_distributed_args(parser) -> None:
    group = parser.add_argument_group("multi-process (not needed on a TPU VM)")
    group.add_argument("--coordinator", default="", help="HOST:PORT of process 0")
    group.add_argument("--num-processes", type=int, default=0)
    group.add_argument("--process-id", type=int, default=-1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fmjax",
        description="Pre-train, adapt and use foundation models with JAX.",
        epilog="Config overrides: --config.a.b=value (e.g. --config.train.steps=100)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train (or resume) a model in a workdir")
    train.add_argument("--config", help="configs/NAME.py:VARIANT")
    train.add_argument("--workdir", required=True)
    _add_distributed_args(train)
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("eval", help="evaluate a workdir's latest checkpoint")
    evaluate.add_argument("--config", help="default: WORKDIR/config.json")
    evaluate.add_argument("--workdir", required=True)
    evaluate.add_argument(
        "--tasks",
        default="",
        help="lm-evaluation-harness tasks (a shipped name such as rt_sentiment, a "
        "YAML file, or an lm-eval task), comma-separated: scores the decoder "
        "instead of the training eval",
    )
    evaluate.add_argument(
        "--num-fewshot", default="", help="K, or K1,K2,... for a table over k"
    )
    evaluate.add_argument("--limit", type=float, default=None, help="docs per task")
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--output", default="", help="default: WORKDIR/lm_eval")
    evaluate.add_argument("--plot", action="store_true", help="accuracy vs k plot")
    evaluate.add_argument(
        "--fewshot-encoder",
        default="",
        help="the encoder of a task's 'similar' few-shot sampler (default: "
        "all-MiniLM-L6-v2)",
    )
    commands.add_retrieval_arguments(evaluate, "each document's question")
    evaluate.add_argument("--json", action="store_true")
    _add_distributed_args(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    commands.add_generate_parser(sub)

    data = sub.add_parser("data", help="dataset tools")
    data_sub = data.add_subparsers(dest="action", required=True)
    prepare = data_sub.add_parser(
        "prepare", help="build a dataset's array_record files"
    )
    prepare.add_argument("name")
    prepare.add_argument("--data-dir", default="")
    prepare.add_argument(
        "--vocab-size", type=int, default=0, help="also train a tokenizer"
    )
    prepare.set_defaults(func=cmd_data)

    commands.add_embed_parsers(sub)
    convert = sub.add_parser("convert", help="convert weights between formats")
    convert.add_argument(
        "direction",
        choices=["hf-to-fmjax", "fmjax-to-hf", "lora-to-peft"],
        help="lora-to-peft: a lora/qlora run's WORKDIR -> a PEFT adapter directory",
    )
    convert.add_argument("src")
    convert.add_argument("dst")
    convert.set_defaults(func=cmd_convert)

    compile_ = sub.add_parser(
        "compile", help="compile the train step for a TPU slice, without a TPU"
    )
    compile_.add_argument("--config", required=True)
    compile_.add_argument("--workdir", default="")
    compile_.add_argument("--topology", required=True, help="e.g. v5e:2x2, v5p-64")
    compile_.add_argument("--json", action="store_true")
    compile_.set_defaults(func=cmd_compile)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="what", required=True)
    bench_train = bench_sub.add_parser("train", help="training tokens/s and MFU")
    bench_train.add_argument("--config", required=True)
    bench_train.add_argument("--workdir", default="")
    bench_train.add_argument("--against", default="", help="'hf': also time HF")
    bench_train.add_argument("--warmup", type=int, default=3)
    bench_train.add_argument("--steps", type=int, default=10)
    bench_train.add_argument(
        "--rounds", type=int, default=5,
        help="rounds of --steps per side, fmjax and HF alternating; medians reported",
    )  # fmt: skip
    bench_train.add_argument("--json", action="store_true", help="only the JSON line")
    bench_train.set_defaults(func=cmd_bench)
    bench_decode = bench_sub.add_parser(
        "decode", help="generation: prefill and decode tokens/s, first-token time"
    )
    bench_decode.add_argument("--config", required=True)
    bench_decode.add_argument("--workdir", default="")
    bench_decode.add_argument("--against", default="", help="'hf': also HF generate")
    bench_decode.add_argument("--batch-sizes", default="1,8")
    bench_decode.add_argument("--prompt-len", type=int, default=128)
    bench_decode.add_argument("--new-tokens", type=int, default=128)
    bench_decode.add_argument("--repeats", type=int, default=5)
    bench_decode.add_argument("--json", action="store_true")
    bench_decode.set_defaults(func=cmd_bench)
    bench_memory = bench_sub.add_parser(
        "memory",
        help="per-device params + optimizer bytes for fsdp = 1, 2, 4, 8; or with "
        "--methods, one device's memory per adaptation method",
    )
    bench_memory.add_argument("--config", required=True)
    bench_memory.add_argument("--workdir", default="")
    bench_memory.add_argument(
        "--methods", default="", help="e.g. full,lora,qlora: compare their train steps"
    )
    bench_memory.add_argument(
        "--batch-size", type=int, default=1, help="rows per step (with --methods)"
    )
    bench_memory.add_argument(
        "--seq-len", type=int, default=512, help="tokens per row (with --methods)"
    )
    bench_memory.add_argument(
        "--topology",
        default="",
        help="with --methods: compile for one chip of this TPU topology (e.g. "
        "v5p:1x1x1) instead of this host",
    )
    bench_memory.add_argument("--json", action="store_true")
    bench_memory.set_defaults(func=cmd_bench)
    commands.add_bench_parsers(bench_sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    host_devices = os.environ.get("FMJAX_HOST_DEVICES")
    if host_devices and "jax" not in sys.modules:
        from fmjax.host_devices import FLAG

        # Simulated CPU devices (for meshes on a laptop); must precede JAX's start.
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} {FLAG}={int(host_devices)}"
    rest, overrides = _split_overrides(argv)
    args = build_parser().parse_args(rest)
    if overrides and args.func not in (cmd_train, cmd_eval, cmd_bench, cmd_compile):
        print(
            f"fmjax: error: {args.command} takes no --config.* overrides",
            file=sys.stderr,
        )
        return 2
    if args.func is cmd_compile or getattr(args, "topology", ""):
        # Ahead-of-time compilation runs on the host CPU: never wait for a TPU.
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from fmjax.errors import FmjaxError

    # fmjax's own errors (and a missing file) are one line; anything else is a
    # bug and keeps its traceback. FMJAX_DEBUG=1 shows tracebacks for all.
    try:
        return args.func(args, overrides)
    except (FmjaxError, FileNotFoundError) as e:
        if os.environ.get("FMJAX_DEBUG"):
            raise
        print(f"fmjax: error: {e}", file=sys.stderr)
        return 3 if isinstance(e, FloatingPointError) else 2


def compilation_cache_environ(environ: dict) -> dict:
    """`environ` with JAX's persistent compilation cache on by default: every
    program that took XLA a second or more to compile is kept on disk (in
    $XDG_CACHE_HOME/fmjax/xla, at most 2 GiB, least recently used dropped
    first) and read back by the next `fmjax` command that compiles it: a
    second `fmjax generate` skips the decode loop's compile. The
    JAX_COMPILATION_CACHE_DIR and _MAX_SIZE variables override this;
    JAX_ENABLE_COMPILATION_CACHE=false turns it off."""
    home = environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    defaults = {
        "JAX_COMPILATION_CACHE_DIR": os.path.join(home, "fmjax", "xla"),
        "JAX_COMPILATION_CACHE_MAX_SIZE": str(2 << 30),
    }
    return {**defaults, **environ}


def cpu_where_no_tpu(environ: dict) -> dict:
    """`environ` with JAX_PLATFORMS=cpu where JAX would start libtpu's runtime
    on a machine without TPU chips, or unchanged. JAX starts it wherever the
    `libtpu` package is installed (fmjax's test extras install it for `fmjax
    compile`'s TPU topologies), and off a TPU VM it prints several lines of
    errors (no TPU_WORKER_HOSTNAMES, no host bounds) before JAX falls back to
    the CPU. Unchanged where JAX_PLATFORMS is set, libtpu is absent, another
    PJRT plugin (a GPU's) is installed, or any Google PCI device is attached
    (vendor 0x1ae0, which JAX's own check reads for TPU chips)."""
    import glob
    import importlib.metadata
    import importlib.util
    import pathlib

    if "JAX_PLATFORMS" in environ or importlib.util.find_spec("libtpu") is None:
        return environ
    if importlib.util.find_spec("jax_plugins") or importlib.metadata.entry_points(
        group="jax_plugins"
    ):
        return environ
    vendors = glob.glob("/sys/bus/pci/devices/*/vendor")
    if any(pathlib.Path(v).read_text().strip() == "0x1ae0" for v in vendors):
        return environ
    return {**environ, "JAX_PLATFORMS": "cpu"}


def entry() -> None:
    """The `fmjax` command (and `python -m fmjax.cli`): `main` in a process
    whose malloc keeps XLA's per-step temporaries mapped (jemalloc) or backs
    them with transparent huge pages; the process starts itself again with
    that set first (`fmjax.host_memory`), and with the compilation cache
    (`compilation_cache_environ`) and `cpu_where_no_tpu`."""
    from fmjax.host_memory import reexec_with_malloc

    os.environ.update(cpu_where_no_tpu(compilation_cache_environ(dict(os.environ))))
    reexec_with_malloc(["-m", "fmjax.cli", *sys.argv[1:]])
    sys.exit(main())


if __name__ == "__main__":
    entry()
