"""The ``sparse-llm`` command: thin argument parsing around functions usable from Python.

Every bad argument exits with code 2 and one line on stderr (``sparse-llm ...: error: ...``), before
any model is loaded; ``-v`` adds the traceback at debug level.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import logging
import sys

import sparse_llm

logger = logging.getLogger("sparse_llm.cli")

LM_EVAL = "lm-eval"  # `sparse-llm eval lm-eval ARGS` hands ARGS to lm-eval's own command line


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already says it (None, False and
    empty defaults are not shown; lists are shown as the comma lists the options take)."""

    def _format_action(self, action):
        default = _shown_default(action)
        text = action.help or ""
        if default is not None and text is not argparse.SUPPRESS and "default" not in text:
            action = copy.copy(action)
            action.help = f"{text} (default: {default.replace('%', '%%')})".lstrip()
        return super()._format_action(action)


def _shown_default(action) -> str | None:
    value = action.default
    if value is None or value is argparse.SUPPRESS or isinstance(value, bool) or value in ("", (), [], {}):
        return None
    if not action.option_strings and action.nargs not in ("?", "*"):
        return None
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return json.dumps(value) if isinstance(value, dict) else str(value)


class _Parser(argparse.ArgumentParser):
    """Defaults in every help text; a usage error is one line (``prog: error: message``)."""

    def __init__(self, *args, formatter_class=_HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _methods(text: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in text.split(",") if m.strip())


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _heads(text: str) -> tuple[int, int]:
    """``"4,1"`` -> ``(4, 1)``: query heads, KV heads."""
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"use QUERY_HEADS,KV_HEADS (e.g. 4,1), got {text!r}")
    return _positive_int(parts[0]), _positive_int(parts[1])


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


def _check_device(name: str) -> None:
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}: use cpu, cuda, cuda:N or mps") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, True):
        raise ValueError(f"device {name!r} requested, but torch {torch.__version__} sees no {device.type}")


def _check_args(args) -> None:
    """What every command checks before it loads anything: the model name or folder, the device."""
    from sparse_llm.models import check_model

    if getattr(args, "model", None) is not None:
        check_model(args.model, shapes=args.command == "bench")  # other commands need a tokenizer
    if getattr(args, "device", None) is not None:
        _check_device(args.device)


def _cmd_demo(args) -> int:
    from sparse_llm.demo import format_table, run_demo

    rows = run_demo(args.model, context_tokens=args.context_tokens, methods=args.methods)
    print(format_table(rows))
    return 0


def _cmd_bench(args) -> int:
    from sparse_llm.bench import plots

    if args.what == "kernel":
        from sparse_llm.bench.kernel import KernelBenchConfig, kernel_markdown, run_kernel_bench

        hq, hkv = args.heads
        config = KernelBenchConfig(
            lengths=args.lengths or (8192,),
            densities=args.densities,
            patterns=args.patterns,
            q_heads=hq,
            kv_heads=hkv,
            head_dim=args.head_dim,
            block_size=args.block_size,
            dtype=args.dtype,
            device=args.device,
            repeats=args.repeats,
            flex=args.flex,
        )
        report = run_kernel_bench(config, out=args.out, progress=not args.quiet)
        print(kernel_markdown(report["results"]))
        if args.out:
            print(f"plot: {plots.plot_kernel(args.out)}")
        return 0
    from sparse_llm.bench.runner import BenchConfig, markdown, run_bench

    stray = sorted(set(args.method_params) - set(args.methods))
    if stray:
        raise ValueError(f"--method-params for methods not run: {stray}; --methods: {','.join(args.methods)}")
    config = BenchConfig(
        model=args.model,
        methods=args.methods,
        lengths=args.lengths or (1024, 4096, 8192),
        repeats=args.repeats,
        rounds=args.rounds,
        device=args.device,
        dtype=args.dtype,
        method_params=args.method_params,
        prefill_chunks=args.prefill_chunk,
    )
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
    from sparse_llm.models import list_models

    parser = _Parser(
        prog="sparse-llm",
        description="Training-free sparse attention for Hugging Face causal LMs: a demo, benchmarks and "
        "evaluations. `sparse-llm <command> --help` shows a command's flags and defaults; the reference is "
        "docs/cli.md.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {sparse_llm.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub, list_models())
    _add_bench(sub)
    _add_eval(sub, parser, argv)
    sub.add_parser("methods", help="list the sparse-attention methods").set_defaults(func=_cmd_methods)
    sub.add_parser("models", help="list the embedded models").set_defaults(func=_cmd_models)
    return parser


def _add_demo(sub, models) -> None:
    demo = sub.add_parser("demo", help="needle-in-a-haystack prefill demo on an embedded model")
    demo.add_argument("--model", default="gemma3-270m", choices=list(models), help="embedded model")
    demo.add_argument("--context-tokens", type=_positive_int, default=4096, help="prompt length in tokens")
    demo.add_argument(
        "--methods",
        type=_methods,
        default=("sdpa", "dense", "streaming", "block_topk"),
        help="comma-separated; 'sdpa' is the unpatched Hugging Face baseline",
    )
    demo.set_defaults(func=_cmd_demo)


def _add_bench(sub) -> None:
    from sparse_llm.eval.common import json_object

    bench = sub.add_parser(
        "bench",
        help="prefill latency and peak memory per method and length; or the kernel alone",
        description="`sparse-llm bench [prefill]`: end-to-end prefill per method and length, each "
        "configuration in a fresh process. `sparse-llm bench kernel`: the block-sparse kernel alone "
        "over densities, against the ideal 1/density speedup.",
    )
    bench.add_argument(
        "what", nargs="?", choices=("prefill", "kernel"), default="prefill", help="what to time"
    )
    bench.add_argument(
        "--model",
        default="gemma3-270m",
        help="embedded model, shape-only model (e.g. llama-3.2-1b-shape) or HF model path",
    )
    bench.add_argument(
        "--methods",
        type=_methods,
        default=("sdpa", "floor", "dense", "streaming", "block_topk"),
        help="comma-separated; baselines: sdpa, eager, flex_attention, flash_attention_2, floor (no attn)",
    )
    bench.add_argument(
        "--lengths", type=_lengths, default=None, help="e.g. 1k,4k,8k (default 1k,4k,8k; kernel: 8k)"
    )
    bench.add_argument(
        "--repeats", type=_positive_int, default=3, help="timed runs per configuration (median)"
    )
    bench.add_argument(
        "--rounds",
        type=_positive_int,
        default=1,
        help="prefill: run all configurations this many times in turn, pooling each one's times "
        "(evens out a machine whose speed drifts during the run)",
    )
    bench.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    bench.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="dtype")
    bench.add_argument(
        "--method-params",
        type=json_object,
        default={},
        help='JSON per method, e.g. \'{"streaming": {"local_tokens": 512}}\'',
    )
    bench.add_argument(
        "--prefill-chunk",
        type=_lengths,
        default=(0,),
        help="prefill: tokens per forward through the KV cache, e.g. 2k; a list (0,2k) runs each; "
        "0 = the whole prompt in one forward",
    )
    bench.add_argument("--out", default=None, help="write the JSON report here (and a PNG plot beside it)")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    kernel = bench.add_argument_group("kernel options")
    kernel.add_argument("--densities", type=_floats, default=(0.1, 0.25, 0.5, 0.75, 1.0), help="in (0, 1]")
    kernel.add_argument(
        "--patterns",
        type=_methods,
        default=("window", "random"),
        help="block patterns: window, random; the neighborhood method's nbh_aligned, nbh_blocked (on the "
        "block grid), nbh_sliding, nbh_strided, nbh_halo (off it)",
    )
    kernel.add_argument("--heads", type=_heads, default=(4, 1), help="query heads,KV heads (Gemma3-270M's)")
    kernel.add_argument("--head-dim", type=_positive_int, default=256, help="head dimension")
    kernel.add_argument("--block-size", type=_positive_int, default=64, help="block size in tokens")
    kernel.add_argument(
        "--flex", action="store_true", help="also time FlexAttention on the same blocks (impl='flex')"
    )
    bench.set_defaults(func=_cmd_bench)


def _add_eval(sub, parser: argparse.ArgumentParser, argv: list[str] | None) -> None:
    evaluate = sub.add_parser("eval", help="run an evaluation (niah, sweep, mqar, longbench, lm-eval)")
    tasks = evaluate.add_subparsers(dest="task", required=True)
    from sparse_llm.eval import list_tasks, task_module

    # Only the requested evaluation's module is imported (lm-eval and datasets load slowly).
    argv = sys.argv[1:] if argv is None else argv
    chosen = argv[argv.index("eval") + 1] if "eval" in argv[:-1] else None
    for name, description in list_tasks().items():
        if name == LM_EVAL:  # parsed by lm-eval itself (see main)
            tasks.add_parser(name, help=description, add_help=False)
            continue
        task = tasks.add_parser(name, help=description, description=description)
        if name == chosen:
            try:
                module = task_module(name)
            except ImportError as err:  # an optional dependency (lm-eval, datasets) is missing
                parser.exit(2, f"sparse-llm: error: {err}\n")
            module.add_arguments(task)
            task.set_defaults(func=module.run_from_args)


def _lm_eval_argv(argv: list[str]) -> list[str] | None:
    """The arguments after ``[-v] eval lm-eval``, or None for any other command."""
    rest = list(argv)
    while rest and rest[0] in ("-v", "--verbose"):
        rest.pop(0)
    return rest[2:] if rest[:2] == ["eval", LM_EVAL] else None


def _one_line(err: BaseException) -> str:
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    leading = itertools.takewhile(lambda token: token.startswith("-"), argv)  # sparse-llm's own options
    verbose = bool({"-v", "--verbose"} & set(leading))
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    lm_eval_argv = _lm_eval_argv(argv)
    try:
        if lm_eval_argv is not None:
            from sparse_llm.eval import task_module

            try:
                module = task_module(LM_EVAL)
            except ImportError as err:  # lm-eval is not installed: as parser.exit does for the others
                print(f"sparse-llm: error: {_one_line(err)}", file=sys.stderr)
                sys.exit(2)
            return module.main(lm_eval_argv)
        args = build_parser(argv).parse_args(argv)
        _check_args(args)
        return args.func(args)
    except (ValueError, TypeError, OSError, NotImplementedError, ImportError) as err:
        logger.debug("traceback", exc_info=True)
        print(f"sparse-llm: error: {_one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
