"""The ``sparse-llm`` command: thin argument parsing around functions usable from Python."""

from __future__ import annotations

import argparse
import json
import logging
import sys

import sparse_llm


def _methods(text: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in text.split(",") if m.strip())


def _cmd_demo(args) -> int:
    from sparse_llm.demo import format_table, run_demo

    rows = run_demo(args.model, context_tokens=args.context_tokens, methods=args.methods)
    print(format_table(rows))
    return 0


def _lengths(text: str) -> tuple[int, ...]:
    """``"1k,4k,8192"`` -> ``(1024, 4096, 8192)``."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        try:
            out.append(int(part[:-1]) * 1024 if part.endswith("k") else int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad length {part!r}: use integers or 'Nk'") from None
    return tuple(out)


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad number list {text!r}") from None


def _cmd_bench(args) -> int:
    from sparse_llm.bench import plots

    if args.what == "kernel":
        from sparse_llm.bench.kernel import KernelBenchConfig, kernel_markdown, run_kernel_bench

        hq, hkv = (int(x) for x in args.heads.split(","))
        config = KernelBenchConfig(
            lengths=args.lengths or (8192,), densities=args.densities, patterns=args.patterns,
            q_heads=hq, kv_heads=hkv, head_dim=args.head_dim, block_size=args.block_size,
            dtype=args.dtype, device=args.device, repeats=args.repeats, flex=args.flex,
        )  # fmt: skip
        report = run_kernel_bench(config, out=args.out, progress=not args.quiet)
        print(kernel_markdown(report["results"]))
        if args.out:
            print(f"plot: {plots.plot_kernel(args.out)}")
        return 0
    from sparse_llm.bench.runner import BenchConfig, markdown, run_bench

    config = BenchConfig(
        model=args.model, methods=args.methods, lengths=args.lengths or (1024, 4096, 8192),
        repeats=args.repeats, rounds=args.rounds, device=args.device, dtype=args.dtype,
        method_params=json.loads(args.method_params),
    )  # fmt: skip
    report = run_bench(config, out=args.out, progress=not args.quiet)
    print(markdown(report["results"]))
    if args.out:
        print(f"plot: {plots.plot_prefill(args.out)}")
    return 0


def _cmd_methods(args) -> int:
    from sparse_llm import list_methods

    for name, description in list_methods().items():
        print(f"{name:12s} {description}")
    return 0


def _cmd_models(args) -> int:
    from sparse_llm.model_shapes import list_shapes
    from sparse_llm.models import list_models

    for name, description in list_models().items():
        print(f"{name:20s} {description}")
    print("\nshape-only (random weights, for `sparse-llm bench`):")
    for name, description in list_shapes().items():
        print(f"{name:20s} {description}")
    return 0


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-llm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {sparse_llm.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="needle-in-a-haystack prefill demo on an embedded model")
    demo.add_argument("--model", default="gemma3-270m", help="embedded model name (see `sparse-llm models`)")
    demo.add_argument("--context-tokens", type=int, default=4096)
    demo.add_argument(
        "--methods",
        type=_methods,
        default=("sdpa", "dense", "streaming", "block_topk"),
        help="comma-separated; 'sdpa' is the unpatched Hugging Face baseline",
    )
    demo.set_defaults(func=_cmd_demo)

    bench = sub.add_parser(
        "bench", help="prefill latency and peak memory per method and length; or the kernel alone",
        description="`sparse-llm bench [prefill]`: end-to-end prefill per method and length, each "
        "configuration in a fresh process. `sparse-llm bench kernel`: the block-sparse kernel alone "
        "over densities, against the ideal 1/density speedup.",
    )  # fmt: skip
    bench.add_argument("what", nargs="?", choices=("prefill", "kernel"), default="prefill")
    bench.add_argument(
        "--model", default="gemma3-270m",
        help="embedded model, shape-only model (e.g. llama-3.2-1b-shape) or HF model path",
    )  # fmt: skip
    bench.add_argument(
        "--methods",
        type=_methods,
        default=("sdpa", "floor", "dense", "streaming", "block_topk"),
        help="comma-separated; baselines: sdpa, eager, flex_attention, flash_attention_2, floor (no attn)",
    )
    bench.add_argument(
        "--lengths", type=_lengths, default=None, help="e.g. 1k,4k,8k (default 1k,4k,8k; kernel: 8k)"
    )
    bench.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median)")
    bench.add_argument(
        "--rounds", type=int, default=1,
        help="prefill: run all configurations this many times in turn, pooling each one's times "
        "(evens out a machine whose speed drifts during the run)",
    )  # fmt: skip
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    bench.add_argument(
        "--method-params", default="{}", help='JSON, e.g. \'{"streaming": {"local_tokens": 512}}\''
    )
    bench.add_argument("--out", default=None, help="write the JSON report here (and a PNG plot beside it)")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    kernel = bench.add_argument_group("kernel options")
    kernel.add_argument("--densities", type=_floats, default=(0.1, 0.25, 0.5, 0.75, 1.0))
    kernel.add_argument("--patterns", type=_methods, default=("window", "random"))
    kernel.add_argument("--heads", default="4,1", help="query heads,KV heads (default: Gemma3-270M's)")
    kernel.add_argument("--head-dim", type=int, default=256)
    kernel.add_argument("--block-size", type=int, default=64)
    kernel.add_argument("--flex", action="store_true", help="also time compiled flex_attention")
    bench.set_defaults(func=_cmd_bench)

    evaluate = sub.add_parser("eval", help="run an evaluation (niah, sweep, mqar, longbench, lm-eval)")
    tasks = evaluate.add_subparsers(dest="task", required=True)
    from sparse_llm.eval import list_tasks, task_module

    # Only the requested evaluation's module is imported (lm-eval and datasets load slowly).
    argv = sys.argv[1:] if argv is None else argv
    chosen = argv[argv.index("eval") + 1] if "eval" in argv[:-1] else None
    for name, description in list_tasks().items():
        task = tasks.add_parser(name, help=description, description=description)
        if name == chosen:
            try:
                module = task_module(name)
            except ImportError as err:  # an optional dependency (lm-eval, datasets) is missing
                parser.exit(2, f"sparse-llm: error: {err}\n")
            module.add_arguments(task)
            task.set_defaults(func=module.run_from_args)

    sub.add_parser("methods", help="list the sparse-attention methods").set_defaults(func=_cmd_methods)
    sub.add_parser("models", help="list the embedded models").set_defaults(func=_cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError, ImportError) as err:
        print(f"sparse-llm: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
