"""`fwpzoo bench scale [--out docs/scale.md]`: the scale page, every number from `fwpzoo plan`.

Each row is one `fwpzoo plan` run in its own process (a cpu:N plan splits that process's CPU),
its JSON line read back: the committed scale configs on TPU topologies (libtpu installed), the
parameter and optimizer bytes per device under fsdp = 1, 2, 4, 8, and the activation bytes per
device at T = 32768 under context = 1, 2, 4. Nothing runs a step; nothing needs a TPU.

A pod plan compiles for a quarter of an hour or more on a small host, so every plan is kept as a
record (docs/benchmarks/plans/, one JSON per row: its command, the commit it ran from, the hash
of its config's values and the plan's JSON line) and read back while those are unchanged: an
interrupted run continues where it stopped, and `--replan` computes every row again.
"""

import hashlib
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from fwpzoo.bench._common import BenchArgs, positive_int
from fwpzoo.config import ConfigError
from fwpzoo.platform import libtpu_installed
from fwpzoo.reports import git_commit, markdown_table

GiB = 2**30
REPO = Path(__file__).resolve().parents[2]
PLANS = REPO / "docs" / "benchmarks" / "plans"
HYBRID = "configs/scale/hybrid_1b5.yaml"
LONG = "configs/scale/long_context.yaml"
# (config, topology, overrides): the table of fitting and non-fitting plans
PODS = (
    (HYBRID, "v5e:16x16", ()),
    (HYBRID, "v5e:16x16", ("mesh.data=256", "mesh.fsdp=1", "model.remat=none")),
    (LONG, "v5e:4x4", ()),
    (LONG, "v5e:4x4", ("train.batch_size=16", "mesh.context=1", "mesh.data=16")),
)
# two layers of the long-context model at 2048 tokens, 8 rows over 8 CPU devices: parameters
# and optimizer state per device as fsdp takes devices from data
FSDP = tuple(
    (
        LONG,
        "cpu:8",
        (
            "model.mixers=[fwp,fwp]",
            "data.seq_len=2048",
            "train.batch_size=8",
            f"mesh.fsdp={f}",
            f"mesh.data={8 // f}",
            "mesh.context=1",
        ),
    )
    for f in (1, 2, 4, 8)
)
# two layers of it on one 32768-token row split over context devices: activations per device
CONTEXT = tuple(
    (
        LONG,
        f"cpu:{c}",
        (
            "model.mixers=[fwp,fwp]",
            "data.seq_len=32768",
            "train.batch_size=1",
            "mesh.data=1",
            f"mesh.context={c}",
        ),
    )
    for c in (1, 2, 4)
)


def run_plan(config: str, topology: str, overrides) -> dict:
    """The JSON line of `fwpzoo plan`; ConfigError with its message if it was refused."""
    argv = [sys.executable, "-m", "fwpzoo", "plan", config, "--topology", topology, *overrides]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode not in (0, 1):
        raise ConfigError(f"{' '.join(argv[2:])}: {done.stderr.strip().splitlines()[-1]}")
    print(f"planned {config} on {topology} {' '.join(overrides)}", file=sys.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def plan_file(config: str, topology: str, overrides) -> str:
    """A row's record name, readable: the config's stem, the topology, the overrides."""
    name = "__".join([Path(config).stem, topology, *overrides])
    return "".join(c if c.isalnum() or c in "._=-" else "-" for c in name) + ".json"


def config_digest(path: Path) -> str:
    """sha256 of the config's values, not its text: a comment edited does not make a plan stale."""
    values = yaml.safe_load(path.read_text())
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def recorded_plan(row, plans: Path, replan: bool = False, plan=run_plan) -> dict:
    """The plan of row = (config, topology, overrides): its record in `plans` while the config's
    values are those it was made from (unless `replan`); otherwise planned now and recorded."""
    config, topology, overrides = row
    path = plans / plan_file(*row)
    digest = config_digest(Path(config))
    if path.exists() and not replan:
        record = json.loads(path.read_text())
        if record["config_sha256"] == digest:
            return record["result"]
    result = plan(*row)
    record = {
        "command": " ".join(["fwpzoo plan", config, "--topology", topology, *overrides]),
        "commit": git_commit(),
        "config_sha256": digest,
        "result": result,
    }
    plans.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(record, indent=1) + "\n")
    partial.replace(path)  # a killed run leaves no half record
    return result


def gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def mesh_text(mesh: dict) -> str:
    return " x ".join(f"{name}={size}" for name, size in mesh.items() if size > 1) or "1 device"


def pod_table(rows) -> str:
    if not rows:
        return "Not planned in this run (`--no-pods`): `fwpzoo bench scale` with libtpu plans them."
    header = ["config", "topology", "mesh", "remat", "GiB per device (of HBM)", "fits"]
    header += ["FLOPs per device"]
    table = []
    for (config, topology, overrides), result in rows:
        name = f"`{config}`" + (f" `{' '.join(overrides)}`" if overrides else "")
        memory = f"{gib(result['bytes_per_device'])} ({gib(result['device_memory_bytes'])})"
        flops = result["flops"]
        table.append(
            [
                name,
                topology,
                mesh_text(result["mesh"]),
                result["remat"],
                memory,
                "yes" if result["fits"] else "no",
                "refused by XLA" if flops is None else format(flops, ".3g"),
            ]
        )
    return markdown_table(header, table)


def series_table(rows, axis: str, column: str, key: str) -> str:
    table = [
        [result["mesh"][axis], mesh_text(result["mesh"]), f"{result[key] / 2**20:.1f}"]
        for _, result in rows
    ]
    return markdown_table([axis, "mesh", f"{column} (MiB)"], table)


def markdown(pods, fsdp, context, command: str) -> str:
    return "\n".join(
        [
            "# Scale: FSDP, tensor and context parallelism, planned ahead of time",
            "",
            f"Generated by `{command}`: every number is the compiler's own accounting of the",
            "run's exact train step (`fwpzoo plan`), compiled for the topology without running it",
            '(TPU topologies through libtpu, `pip install -e ".[tpu]"`, on a CPU-only host).',
            "Bytes per device = arguments + outputs - donated buffers + temporaries. FLOPs are",
            "the compiler's count for one device's step with each loop body (the chunk scans)",
            "counted once: a lower bound, for comparing configs. Each plan is recorded in",
            "`docs/benchmarks/plans/` with its command and the commit it ran from.",
            "",
            "## Configs on TPU pods",
            "",
            pod_table(pods),
            "",
            "## Parameters and optimizer state per device as fsdp grows",
            "",
            f"`{LONG}` with two layers at 2048 tokens, 8 rows, on cpu:8; argument bytes",
            "(parameters, Adam's two moments and the batch shard) of one device:",
            "",
            series_table(fsdp, "fsdp", "arguments", "argument_bytes"),
            "",
            "## Activations per device at T = 32768 as context grows",
            "",
            f"`{LONG}` with two layers on one 32768-token row split over `context` CPU devices;",
            "temporaries (activations kept for the backward pass and scratch) of one device:",
            "",
            series_table(context, "context", "temporaries", "temp_bytes"),
            "",
            "## Launching on a pod",
            "",
            "Run the same command on every host of the slice, one process per host, with the",
            "existing multi-process flags; each process feeds its devices' rows:",
            "",
            "```bash",
            "# host i of N (process 0's address as the coordinator)",
            f"fwpzoo train {HYBRID} --workdir gs-or-shared/runs/hybrid_1b5 \\",
            "    --coordinator HOST0:1234 --num-processes N --process-id i",
            "```",
            "",
            "The mesh section (`mesh.data`, `mesh.fsdp`, `mesh.tensor`, `mesh.context`; one of",
            "them -1 for the devices the others leave) must multiply to the slice's device count.",
            "A checkpoint restores onto any mesh, so a run can move between slices of different",
            "sizes; check a config with `fwpzoo plan CONFIG --topology NAME` before it gets one.",
            "",
        ]
    )


def main(argv: list[str]) -> int:
    parser = BenchArgs(prog="fwpzoo bench scale")
    parser.add_argument("--out", default=None, help="write the page here (e.g. docs/scale.md)")
    parser.add_argument("--jobs", type=positive_int, default=4, help="plans compiled at once")
    parser.add_argument(
        "--replan", action="store_true", help="plan every row again rather than read its record"
    )
    parser.add_argument(
        "--no-pods",
        action="store_true",
        help="only the fsdp and context tables (this host's CPU; no libtpu needed)",
    )
    options = parser.parse_args(argv)
    pods_rows = () if options.no_pods else PODS
    if pods_rows and not libtpu_installed():
        raise ConfigError(
            "fwpzoo bench scale plans for TPU topologies: pip install -e '.[tpu]' (or --no-pods)"
        )
    rows = (*pods_rows, *FSDP, *CONTEXT)
    # compiling is single-threaded: a few plans at once keep the cores busy
    with ThreadPoolExecutor(max_workers=options.jobs) as pool:
        results = list(pool.map(lambda row: recorded_plan(row, PLANS, options.replan), rows))
    planned = list(zip(rows, results, strict=True))
    pods = planned[: len(pods_rows)]
    fsdp = planned[len(pods_rows) : len(pods_rows) + len(FSDP)]
    context = planned[len(pods_rows) + len(FSDP) :]
    page = markdown(pods, fsdp, context, " ".join(["fwpzoo bench scale", *argv]))
    print(page)
    if options.out is not None:
        Path(options.out).write_text(page)
    return 0
