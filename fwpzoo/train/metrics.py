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


def parsed_rows(path: Path) -> list[tuple[bytes, dict | None]]:
    """Each line of `path` as (its bytes, its row), the row None where the line is damaged: cut
    short by a kill, not UTF-8, not a JSON object with a step."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_bytes().splitlines(keepends=True):
        try:
            row = json.loads(line.decode("utf-8"))
            rows.append((line, row if isinstance(row.get("step"), int) else None))
        except (UnicodeDecodeError, ValueError, AttributeError):
            rows.append((line, None))
    return rows


def read_metrics(workdir: Path) -> list[dict]:
    """The rows of metrics.jsonl, damaged lines left out."""
    return [row for _, row in parsed_rows(Path(workdir) / METRICS_FILE) if row is not None]


def truncate_metrics(workdir: Path, last_step: int, last_row: dict | None = None) -> None:
    """Keeps the rows up to `last_step`, the step the run resumes from: drops lines logged after
    it (a run killed after its last checkpoint wrote them, and the resumed run writes those steps
    again) and every damaged line. `last_row`, the row logged at `last_step` as saved with its
    checkpoint, is written again if the file lost it, since the resumed run starts after it. The
    file is replaced in one rename, so a second kill cannot lose the lines kept."""
    path = Path(workdir) / METRICS_FILE
    rows = parsed_rows(path)
    kept = [line for line, row in rows if row is not None and row["step"] <= last_step]
    if last_row is not None and not any(row and row["step"] == last_step for _, row in rows):
        kept.append(json.dumps(last_row, allow_nan=False).encode())
    if kept != [line for line, _ in rows]:
        partial = path.with_name(f".{METRICS_FILE}.partial")
        partial.write_bytes(b"".join(line.rstrip(b"\n") + b"\n" for line in kept))
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

    def __init__(
        self, workdir: Path, start_step: int, enabled: bool, start_row: dict | None = None
    ):
        """`start_row`: the row logged at `start_step`, as saved with its checkpoint."""
        self.workdir, self.start_step, self.enabled = Path(workdir), start_step, enabled
        self.file = self.tensorboard = None
        if enabled:
            truncate_metrics(workdir, start_step, start_row)

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
