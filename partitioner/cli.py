"""The `partitioner` command line: plan a model, explain a saved plan, run the benchmark.

    partitioner plan gpt3-1.3b --devices 8 --json plan.json        # a zoo model
    partitioner plan mymodels:build --inputs mymodels:example --devices 4
    partitioner plan hf:LlamaConfig:num_hidden_layers=2,hidden_size=256,num_attention_heads=4 --devices 2
    partitioner explain plan.json                                  # a saved plan's summary
    partitioner bench gpt3-1.3b --devices 8                        # bench/run.py (a source checkout)

`plan` builds the model on the meta device (no weights are allocated, nothing is downloaded), compiles it for
the devices and prints the plan's summary. Also `python -m partitioner ...`.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import logging
import os
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import partitioner
from partitioner.plan.recompute import MODES as RECOMPUTE_MODES
from partitioner.plan.sharding import DP_MODES
from partitioner.schedules import SCHEDULES
from partitioner.validate import memory_bytes

__all__ = ["CliError", "ModelCall", "build_parser", "load_model", "main", "parse_config_args", "parse_value"]

DEFAULT_BATCH = 8
DEFAULT_HF_SEQ = 128  # hf models: min(the config's context, this) unless --seq says otherwise
MODEL_FORMS = (
    "MODEL is a zoo name ({zoo}), module:factory (a Python callable returning an nn.Module, with --inputs "
    "module:function), or hf:ConfigClass:key=value,... (a transformers config class)"
)


class CliError(Exception):
    """A problem with the command line itself: printed as one line, exit status 2."""


@dataclass
class ModelCall:
    """A model built on the meta device and the example call `compile` captures it with."""

    model: nn.Module
    args: tuple
    kwargs: dict[str, Any] = field(default_factory=dict)


def parse_value(text: str) -> int | float | bool | str:
    """A config value from the command line: int, then float, then true/false (any case), else the string."""
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def parse_config_args(text: str) -> dict[str, Any]:
    """`key=value,key=value` as a dict of parsed values (parse_value); an empty text is no arguments."""
    out: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise CliError(f"config argument {item!r} is not key=value: write hf:ConfigClass:key=value,key=value")
        out[key.strip()] = parse_value(value.strip())
    return out


def _zoo_names() -> list[str]:
    import zoo

    return zoo.names()


def _unknown_model(spec: str, forms: str = MODEL_FORMS) -> CliError:
    """One line: the unknown name, the close zoo names, and `forms` with every zoo name filled in."""
    names = _zoo_names()
    close = difflib.get_close_matches(spec, names, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return CliError(f"unknown model {spec!r}{hint}; " + forms.format(zoo=", ".join(names)))


def _import_attr(ref: str, what: str) -> Any:
    """`module:attr` imported with importlib, the current directory first on sys.path."""
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise CliError(f"{what} {ref!r} is not module:name")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)  # the console script's sys.path[0] is its bin/, not the current directory
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise CliError(
            f"{what} {ref!r}: cannot import module {module_name!r} ({e}); it is imported with importlib, the current "
            f"directory first on sys.path: run from the directory that holds {module_name.replace('.', '/')}.py"
        ) from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise CliError(f"{what} {ref!r}: module {module_name!r} ({module.__file__}) has no {attr!r}") from None


def _to_meta(value: Any) -> Any:
    """Every tensor in a (nested) value moved to the meta device: only shapes and dtypes matter for planning."""
    return torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.to("meta"), value)


def _zoo_model(name: str, batch: int | None, seq: int | None) -> ModelCall:
    import zoo

    with torch.device("meta"):
        model = zoo.get(name)
    kwargs = {} if seq is None else {"seq": seq}
    try:
        args = zoo.example_inputs(name, batch=batch or DEFAULT_BATCH, device="meta", **kwargs)
    except (TypeError, ValueError) as e:
        if seq is None:
            raise
        raise CliError(f"--seq {seq}: {name} does not take it ({str(e).splitlines()[0]})") from None
    return ModelCall(model, tuple(args))


def _factory_model(spec: str, inputs: str | None, batch: int | None, seq: int | None) -> ModelCall:
    if inputs is None:
        raise CliError(
            f"model {spec!r} is module:factory: also pass --inputs module:function, a function returning the "
            f"example inputs (a tuple of positional arguments, a tensor, or a dict of keyword arguments)"
        )
    factory, make_inputs = _import_attr(spec, "MODEL"), _import_attr(inputs, "--inputs")
    with torch.device("meta"):
        model = factory()
    if not isinstance(model, nn.Module):
        raise CliError(f"MODEL {spec!r} returned {type(model).__name__}, not an nn.Module")
    given = {k: v for k, v in (("batch", batch), ("seq", seq)) if v is not None}
    params = inspect.signature(make_inputs).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    refused = [k for k in given if k not in params and not takes_any]
    if refused:
        flags = " and ".join(f"--{k}" for k in refused)
        raise CliError(f"{flags}: --inputs {inputs!r} takes no {' or '.join(refused)} parameter; drop {flags}")
    with torch.device("meta"):
        example = _to_meta(make_inputs(**given))
    if isinstance(example, dict):
        return ModelCall(model.to("meta"), (), example)
    if isinstance(example, torch.Tensor):
        example = (example,)
    if not isinstance(example, (tuple, list)):
        raise CliError(
            f"--inputs {inputs!r} returned {type(example).__name__}: return a tuple of positional arguments, a "
            f"tensor, or a dict of keyword arguments"
        )
    return ModelCall(model.to("meta"), tuple(example))


def _hf_model(spec: str, batch: int | None, seq: int | None) -> ModelCall:
    _, class_name, config_text = (spec.split(":", 2) + [""])[:3]
    try:
        import transformers
    except ImportError:
        raise CliError(f"{spec!r} needs transformers: pip install -e '.[hf]'") from None
    config_cls = getattr(transformers, class_name, None)
    if not (isinstance(config_cls, type) and issubclass(config_cls, transformers.PretrainedConfig)):
        close = difflib.get_close_matches(class_name, [n for n in dir(transformers) if n.endswith("Config")], n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise CliError(
            f"{spec!r}: transformers {transformers.__version__} has no config class {class_name!r}{hint}; write "
            f"hf:ConfigClass:key=value,... with a class such as LlamaConfig or GPT2Config"
        )
    values = parse_config_args(config_text)
    defaults = config_cls()
    for key in values:
        if not hasattr(defaults, key):
            print(f"note: {class_name} has no field {key!r} by default; passed on as given", file=sys.stderr)
    config = config_cls(**values)
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    if seq is None:
        context = next(
            (getattr(config, k) for k in ("max_position_embeddings", "n_positions", "n_ctx") if getattr(config, k, 0)),
            DEFAULT_HF_SEQ,
        )
        seq = min(context, DEFAULT_HF_SEQ)
    input_ids = torch.zeros(batch or DEFAULT_BATCH, seq, dtype=torch.long, device="meta")
    # With the cache on, torch.export refuses the DynamicCache HF causal LMs return (README: known limits).
    return ModelCall(model, (input_ids,), {"use_cache": False})


def load_model(
    spec: str,
    *,
    batch: int | None = None,
    seq: int | None = None,
    inputs: str | None = None,
    dtype: torch.dtype | None = None,
) -> ModelCall:
    """Build MODEL on the meta device with its example call: a zoo name, `module:factory` (with `inputs`, a
    `module:function` returning the example inputs, called with batch= and seq= where given), or
    `hf:ConfigClass:key=value,...` (transformers' AutoModelForCausalLM on a (batch, seq) input_ids, use_cache off).
    dtype: floating parameters and inputs converted to it. Raises CliError naming the valid forms."""
    if spec.startswith("hf:"):
        if inputs is not None:
            raise CliError("--inputs applies to module:factory models only; hf: models take input_ids (batch, seq)")
        call = _hf_model(spec, batch, seq)
    elif ":" in spec:
        call = _factory_model(spec, inputs, batch, seq)
    elif spec in _zoo_names():
        if inputs is not None:
            raise CliError(f"--inputs applies to module:factory models only; zoo model {spec!r} has its own inputs")
        call = _zoo_model(spec, batch, seq)
    else:
        raise _unknown_model(spec)
    if dtype is not None:
        cast = lambda t: t.to(dtype) if t.is_floating_point() else t
        call.model = call.model.to(dtype)
        call.args = torch.utils._pytree.tree_map_only(torch.Tensor, cast, call.args)
        call.kwargs = torch.utils._pytree.tree_map_only(torch.Tensor, cast, call.kwargs)
    return call


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _memory(text: str) -> str:
    try:
        memory_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _add_plan_parser(sub: Any) -> None:
    p = sub.add_parser(
        "plan",
        help="plan a model on the meta device and print the plan's summary",
        description="Build MODEL on the meta device (no weights, no downloads), compile it for --devices\n"
        "devices and print the plan's summary.",
        epilog="MODEL forms:\n"
        + textwrap.fill(
            ", ".join(_zoo_names()), width=110, initial_indent="  zoo name             ", subsequent_indent=" " * 23
        )
        + "\n"
        "  module:factory       a Python callable returning an nn.Module, called under torch.device('meta'); with\n"
        "                       --inputs module:function returning the example inputs (a tuple, a tensor, or a dict\n"
        "                       of keyword arguments), called with batch= / seq= where --batch / --seq are given.\n"
        "                       Both are imported with importlib; the current directory is on sys.path.\n"
        "  hf:Config:k=v,...    a transformers config class and its fields (int, float, true/false, else a string),\n"
        "                       built with AutoModelForCausalLM.from_config on the meta device, called with\n"
        "                       input_ids (batch, seq) and use_cache=False, e.g.\n"
        "                       hf:LlamaConfig:num_hidden_layers=2,hidden_size=64,intermediate_size=128,"
        "num_attention_heads=4,num_key_value_heads=2,vocab_size=256",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="a zoo name, module:factory, or hf:ConfigClass:key=value,...")
    p.add_argument(
        "--devices", type=_positive_int, required=True, metavar="N", help="number of devices to plan for (required)"
    )
    p.add_argument(
        "--device-type",
        default="h100",
        choices=sorted(partitioner.PRESETS),
        help="the device preset the cost model prices (default: %(default)s)",
    )
    p.add_argument(
        "--batch", type=_positive_int, default=None, metavar="B", help=f"global batch size (default: {DEFAULT_BATCH})"
    )
    p.add_argument(
        "--seq",
        type=_positive_int,
        default=None,
        metavar="S",
        help=f"sequence length (default: the zoo model's own, min(context, 128) for GPT-3; hf: min(context, "
        f"{DEFAULT_HF_SEQ}))",
    )
    p.add_argument(
        "--inputs",
        metavar="MODULE:FUNCTION",
        default=None,
        help="module:factory models only: a function returning the example inputs (default: none)",
    )
    p.add_argument(
        "--dtype",
        choices=["bf16", "fp32"],
        default=None,
        help="parameter and input dtype (default: bf16, fp32 with --device-type cpu)",
    )
    p.add_argument(
        "--json", type=Path, metavar="PATH", default=None, help="write plan.to_json() to PATH (default: not written)"
    )
    p.add_argument(
        "--gantt",
        type=Path,
        metavar="PATH",
        default=None,
        help="write a PNG timeline of the plan's simulated step to PATH (needs matplotlib, the bench extra; "
        "default: not written)",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log each compile pass's time and the chosen layout on stderr (the 'partitioner' logger at INFO; "
        "default: not logged)",
    )
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress line (default: one on stderr for compiles over 2 s, when it is a terminal)",
    )
    p.add_argument(
        "--tensor-parallel",
        type=_positive_int,
        default=None,
        metavar="T",
        help="force the tensor degree (default: searched)",
    )
    p.add_argument(
        "--pipeline",
        type=_positive_int,
        default=None,
        metavar="P",
        help="force the pipeline degree (default: searched)",
    )
    p.add_argument(
        "--schedule",
        choices=[*sorted(SCHEDULES), "auto"],
        default=None,
        help="pipeline schedule; auto searches 1f1b, interleaved, zero-bubble, zbv (default: 1f1b and gpipe both "
        "priced, the faster taken)",
    )
    p.add_argument(
        "--microbatches",
        type=_positive_int,
        default=None,
        metavar="M",
        help="microbatches per step (default: searched)",
    )
    p.add_argument(
        "--memory-limit",
        type=_memory,
        default=None,
        metavar="SIZE",
        help="memory per device, bytes or with a unit: 80GB, 80GiB (default: the device's memory)",
    )
    p.add_argument(
        "--recompute",
        choices=list(RECOMPUTE_MODES),
        default=None,
        help="activation recomputation on every stage (default: each stage the least that fits)",
    )
    p.add_argument(
        "--data-parallel",
        choices=list(DP_MODES),
        default=None,
        help="how data-parallel replicas hold their training state (default: searched)",
    )
    p.add_argument(
        "--sequence-parallel",
        choices=["on", "off"],
        default=None,
        help="split tensor parallelism's token-wise ops over its ranks (default: priced both ways)",
    )
    p.add_argument(
        "--context-parallel",
        type=_positive_int,
        default=None,
        metavar="CP",
        help="split every sequence over CP ranks (1: never; default: searched where layouts without it recompute, "
        "do not fit, or get fewer samples than devices)",
    )
    p.set_defaults(run=_plan)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand (bench forwards its options to bench/run.py)."""
    parser = argparse.ArgumentParser(
        prog="partitioner",
        description=__doc__.split("\n\n")[0],
        epilog="`partitioner COMMAND --help` shows a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_plan_parser(sub)
    e = sub.add_parser(
        "explain",
        help="print the summary of a saved plan (partitioner plan --json, or Plan.to_json())",
        description="Load a saved plan (partitioner.Plan.from_json) and print its summary.",
    )
    e.add_argument("plan_file", metavar="PLAN.json", type=Path, help="a plan's JSON file, or - for standard input")
    e.set_defaults(run=_explain)
    sub.add_parser(
        "bench",
        help="run the benchmark, bench/run.py (needs a source checkout): partitioner bench MODEL [OPTIONS]",
        description="partitioner bench MODEL [OPTIONS] runs `python bench/run.py --model MODEL [OPTIONS]`: MODEL is "
        "a zoo name or 'all'; `partitioner bench --help` lists bench/run.py's options.",
        add_help=False,
    )
    return parser


def _plan(args: argparse.Namespace) -> int:
    if args.gantt is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CliError("--gantt needs matplotlib: pip install -e '.[bench]' (or pip install matplotlib)") from None
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[
        args.dtype or ("fp32" if args.device_type == "cpu" else "bf16")
    ]
    if args.verbose:
        _log_to_stderr()
    call = load_model(args.model, batch=args.batch, seq=args.seq, inputs=args.inputs, dtype=dtype)
    t0 = time.perf_counter()
    cm = partitioner.compile(
        call.model,
        devices=args.devices,
        example_inputs=call.args,
        example_kwargs=call.kwargs or None,
        device_type=args.device_type,
        microbatches=args.microbatches,
        memory_limit=args.memory_limit,
        schedule=args.schedule,
        pipeline=args.pipeline,
        tensor_parallel=args.tensor_parallel,
        recompute=args.recompute,
        data_parallel=args.data_parallel,
        sequence_parallel=None if args.sequence_parallel is None else args.sequence_parallel == "on",
        context_parallel=args.context_parallel,
        verbose=not args.quiet,
    )
    elapsed = time.perf_counter() - t0
    written = []  # files first: a closed stdout (| head) must not lose them
    if args.json is not None:
        args.json.write_text(cm.plan.to_json())
        written.append(f"plan: {args.json}")
    if args.gantt is not None:
        from partitioner.gantt import plot_gantt

        title = f"{args.model} on {args.devices} x {args.device_type}, {cm.plan.schedule}"
        written.append(f"gantt: {plot_gantt(cm.simulation, args.gantt, title=title)}")
    print(cm.plan.summary())
    print(f"\ncompiled in {elapsed:.2f} s", *written, sep="\n")
    return 0


def _log_to_stderr() -> None:
    """The 'partitioner' logger's INFO records on stderr, one plain line each (the application's choice: the
    library itself adds no handler)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    log = logging.getLogger("partitioner")
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def _explain(args: argparse.Namespace) -> int:
    name = "standard input" if str(args.plan_file) == "-" else str(args.plan_file)
    try:
        text = sys.stdin.read() if str(args.plan_file) == "-" else args.plan_file.read_text()
    except OSError as e:
        raise CliError(f"cannot read {name}: {e.strerror}") from None
    try:
        plan = partitioner.Plan.from_json(text)
    except ValueError as e:
        raise CliError(f"{name}: {e}") from None
    print(plan.summary())
    return 0


def _bench(argv: list[str]) -> int:
    """`partitioner bench MODEL [OPTIONS]`: bench/run.py's main with --model MODEL and the options."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "bench" / "run.py").is_file():
        raise CliError(
            f"partitioner bench runs bench/run.py, which is not installed with the package (looked in {root}): "
            f"run it from a source checkout installed with pip install -e ."
        )
    if root.as_posix() not in sys.path:
        sys.path.insert(0, root.as_posix())
    from bench import run

    if not argv:
        raise CliError("bench: MODEL is missing: partitioner bench MODEL [OPTIONS] (MODEL: a zoo name or 'all')")
    if argv[0] in ("-h", "--help"):
        print("usage: partitioner bench MODEL [OPTIONS]   (= python bench/run.py --model MODEL [OPTIONS])\n")
        return run.main(["--help"], prog="partitioner bench")
    model, rest = argv[0], argv[1:]
    if model.startswith("-"):
        raise CliError(f"bench: MODEL comes first, before the options (got {model!r}): partitioner bench MODEL ...")
    if model != "all" and model not in _zoo_names():
        raise _unknown_model(
            model, "bench takes a zoo name ({zoo}) or 'all' (partitioner plan also takes module:factory and hf: models)"
        )
    return run.main(["--model", model, *rest], prog="partitioner bench")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (2: a bad command line, 1: planning failed)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        if argv and argv[0] == "bench":
            return _bench(argv[1:])
        args = parser.parse_args(argv)
        return args.run(args)
    except BrokenPipeError:  # stdout closed early (| head): stop quietly, as Python's docs advise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except CliError as e:
        print(f"partitioner: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, partitioner.CaptureError, OSError) as e:  # compile's own errors say what to change
        print(f"partitioner: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
