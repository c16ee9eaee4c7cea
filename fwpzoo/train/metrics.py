"""What a run records: metrics.jsonl (one JSON object per logged step) and TensorBoard events."""

import json
from pathlib import Path

from tensorboardX import SummaryWriter

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def read_metrics(workdir: Path) -> list[dict]:
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(workdir: Path, last_step: int) -> None:
    """Drops lines logged after `last_step`: a run killed after its last checkpoint wrote them,
    and the resumed run writes those steps again."""
    path = Path(workdir) / METRICS_FILE
    if path.exists():
        kept = [m for m in read_metrics(workdir) if m["step"] <= last_step]
        path.write_text("".join(json.dumps(m) + "\n" for m in kept))


class MetricsLog:
    """Appends to metrics.jsonl and TensorBoard; a no-op outside process 0."""

    def __init__(self, workdir: Path, start_step: int, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        truncate_metrics(workdir, start_step)
        self.file = open(Path(workdir) / METRICS_FILE, "a")  # noqa: SIM115 (open for the run)
        # purge_step hides events a killed run wrote after its last checkpoint.
        self.tensorboard = SummaryWriter(
            str(Path(workdir) / TENSORBOARD_DIR), purge_step=start_step + 1
        )

    def write(self, metrics: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        for name, value in metrics.items():
            if name != "step":
                self.tensorboard.add_scalar(name, value, metrics["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tensorboard.close()
