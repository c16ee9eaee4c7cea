"""Evaluation: token sums over a split's batches turned into the task's metrics."""

import math

import numpy as np

from fwpzoo.config import ConfigError, EvalConfig
from fwpzoo.train.sharding import shard_batch, to_host


def summarize(sums: dict, metric_names) -> dict:
    """Token sums -> {"loss", and "accuracy", "sequence_accuracy", "bpc", "perplexity", "mse",
    "normalised_error" as the task names them}."""
    weight = max(float(sums["weight"]), 1.0)
    loss = float(sums["loss_sum"]) / weight
    derived = {
        "loss": loss,
        "accuracy": float(sums["correct"]) / weight,
        # strings whose every scored position is right (formal-language recognition)
        "sequence_accuracy": float(sums.get("sequences_correct", 0.0))
        / max(float(sums.get("sequences", 0.0)), 1.0),
        "bpc": loss / math.log(2),
        "perplexity": math.exp(min(loss, 700.0)),  # exp overflows a float64 past ~709
        # tasks whose targets are numbers (regression)
        "mse": float(sums.get("squared_error", 0.0)) / weight,
        "normalised_error": float(sums.get("squared_error", 0.0))
        / max(float(sums.get("target_square", 0.0)), 1e-12),
    }
    return {name: derived[name] for name in ("loss", *metric_names) if name in derived}


def split_sums(eval_step, model_state: dict, batches, mesh) -> dict:
    """Sums of eval_step over every batch of an iterator (float64 on the host)."""
    total = {
        "loss_sum": 0.0,
        "weight": 0.0,
        "correct": 0.0,
        "sequences": 0.0,
        "sequences_correct": 0.0,
    }
    for batch in batches:
        sums = to_host(
            eval_step(model_state["params"], model_state["rest"], shard_batch(batch, mesh))
        )
        total = {name: total.get(name, 0.0) + float(np.asarray(sums[name])) for name in sums}
    return total


def evaluate(eval_step, model_state: dict, task, cfg: EvalConfig, mesh, split: str) -> dict:
    """Metrics of the model on `split` at the task's training length, then at each of
    cfg.lengths as "<metric>@<length>" (length generalisation)."""

    def metrics_at(seq_len):
        batches = task.eval_batches(split, cfg.batch_size, cfg.num_batches, seq_len=seq_len)
        sums = split_sums(eval_step, model_state, batches, mesh)
        if sums["weight"] == 0:  # summarize would report a perfect loss of 0
            raise ConfigError(f"the {split} split has no token to score")
        return summarize(sums, task.metrics)

    metrics = metrics_at(None)
    for length in cfg.lengths:
        metrics.update({f"{name}@{length}": value for name, value in metrics_at(length).items()})
    return metrics
