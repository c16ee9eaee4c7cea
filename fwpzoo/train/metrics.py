"""What a run records: metrics.jsonl (one JSON object per logged step) and TensorBoard events.

metrics.jsonl is strict JSON, readable by any parser: a NaN or inf value is written as null and
named, with its value, under "nonfinite" (e.g. {"loss": null, "nonfinite": {"loss": "nan"}}).
"""

import json
import math
from pathlib import Path

from tensorboardX import SummaryWriter

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def read_metrics(workdir: Path) -> list[dict]:
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def logged_before(line: str, last_step: int) -> bool:
    try:
        return json.loads(line)["step"] <= last_step
    except (ValueError, KeyError, TypeError):  # a line cut short by a kill
        return False


def truncate_metrics(workdir: Path, last_step: int) -> None:
    """Drops lines logged after `last_step` (a run killed after its last checkpoint wrote them,
    and the resumed run writes those steps again) and any line a kill cut short. The file is
    replaced in one rename, so a second kill cannot lose the lines kept."""
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if logged_before(line, last_step)]
    if kept != lines:
        partial = path.with_name(f".{METRICS_FILE}.partial")
        partial.write_text("".join(line if line.endswith("\n") else line + "\n" for line in kept))
        partial.replace(path)


def strict_row(metrics: dict) -> dict:
    """`metrics` with each NaN or inf replaced by null and listed under "nonfinite"."""
    bad = {k: str(v) for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)}
    if not bad:
        return metrics
    return {**{k: None if k in bad else v for k, v in metrics.items()}, "nonfinite": bad}


class MetricsLog:
    """Appends to metrics.jsonl and TensorBoard; a no-op outside process 0.

    Both files are opened at the first write, so a run with nothing left to do (re-running a
    finished one) adds no empty TensorBoard event file.
    """

    def __init__(self, workdir: Path, start_step: int, enabled: bool):
        self.workdir, self.start_step, self.enabled = Path(workdir), start_step, enabled
        self.file = self.tensorboard = None
        if enabled:
            truncate_metrics(workdir, start_step)

    def write(self, metrics: dict) -> None:
        if not self.enabled:
            return
        if self.file is None:
            self.file = open(self.workdir / METRICS_FILE, "a")  # noqa: SIM115 (open for the run)
            # purge_step hides events a killed run wrote after its last checkpoint.
            self.tensorboard = SummaryWriter(
                str(self.workdir / TENSORBOARD_DIR), purge_step=self.start_step + 1
            )
        row = strict_row(metrics)
        self.file.write(json.dumps(row, allow_nan=False) + "\n")
        self.file.flush()
        for name, value in row.items():
            if name != "step" and isinstance(value, int | float):
                self.tensorboard.add_scalar(name, value, metrics["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.tensorboard.close()
