"""The tuning protocol: where a page compares models, each model's learning rate is chosen from
the same grid, on seed TUNING_SEED, at the point that decides the page's finding; a model whose
best rate is not its config's is rerun at that rate on every seed of the compared points.

An experiment adds the grid's other rates at its deciding point (`other_rates`), reads back the
best rate once all are recorded (`tuned_rate`), and adds the reruns at it; its page states the
protocol (`protocol_text`) or says it is not applied yet (`untuned_text`).
"""

import math
from collections.abc import Callable

from fwpzoo.experiments._sweep import Options, recorded_metric

LEARNING_RATES = (1e-3, 3e-3, 1e-2)
TUNING_SEED = 0
# another rate replaces the config's only if it beats it by more than this (accuracy, or bits):
# runs that stop at a validation threshold differ by less than this at the threshold
TUNING_MARGIN = 0.01


def rate_label(rate: float) -> str:
    return f"{rate:g}"


def rate_override(rate: float) -> str:
    return f"train.learning_rate={rate_label(rate)}"


def other_rates(config_rate: float) -> tuple[float, ...]:
    """The grid's rates a model's config does not already train at (its own points do)."""
    return tuple(rate for rate in LEARNING_RATES if not math.isclose(rate, config_rate))


def best_rate(values: dict[float, float | None], config_rate: float, lower_is_better=False):
    """The rate a model is rerun at: None until every rate of the grid is recorded; the config's
    unless another beats it by more than TUNING_MARGIN (then the best of those)."""
    if set(values) != set(LEARNING_RATES) or any(v is None for v in values.values()):
        return None
    sign = -1 if lower_is_better else 1
    own = next(v for r, v in values.items() if math.isclose(r, config_rate))
    better = {r: v for r, v in values.items() if sign * (v - own) > TUNING_MARGIN}
    return max(better, key=lambda r: sign * better[r]) if better else config_rate


def tuned_rate(
    options: Options,
    point_at: Callable[[float | None], str],
    config_rate: float,
    metric: str,
    lower_is_better: bool = False,
) -> float | None:
    """The best rate of one model at its deciding point (see best_rate), from the records of
    the points `point_at(rate)` names (`point_at(None)`: the point at the config's rate)."""
    names = {rate: point_at(rate) for rate in other_rates(config_rate)}
    names[config_rate] = point_at(None)
    values = {rate: recorded_metric(options, name, metric) for rate, name in names.items()}
    return best_rate(values, config_rate, lower_is_better)


def untuned_text(rate: str) -> str:
    """What a page whose models have not had the tuning protocol says instead."""
    rates = ", ".join(rate_label(r) for r in LEARNING_RATES)
    return (
        f"Tuning protocol: not applied on this page yet. Every model here trains at learning rate "
        f"{rate}, untuned; the protocol (the same grid, {rates}, per model on seed "
        f"{TUNING_SEED} at the deciding point) is applied first to mqar, charlm and "
        "formal_languages (see their pages)."
    )


def protocol_text(deciding: str, metric: str) -> str:
    """The tuning protocol as a page states it."""
    rates = ", ".join(rate_label(r) for r in LEARNING_RATES)
    return (
        f"Tuning protocol: every model compared here gets the same learning-rate grid ({rates}) "
        f"on seed {TUNING_SEED} at {deciding}; a rate other than the config's is taken only if "
        f"its {metric} beats the config's by more than {TUNING_MARGIN}, and a model whose best "
        "rate is not its config's is rerun at that rate on every seed of the compared points."
    )
