"""The report kit: what benchmark and experiment pages are made of.

A page is markdown, rewritten on every run above NOTES_MARKER; the hand-written notes below it
(findings, their reasons, what was tried) are kept. Numbers go into tables through
`markdown_table`, which writes a float as `number` does and None as "-"; a quantity measured
over seeds is written as its median with the range (`spread_cell`) and drawn as the median with
bars to the min and max (`errorbars`). Figures are drawn with `subplots` and written with
`save_figure` (files only: no display on the machines that run sweeps and benchmarks). Every
page names the code it was computed from: `git_commit`.
"""

import functools
import statistics
import subprocess
from collections.abc import Sequence
from pathlib import Path

NOTES_MARKER = "<!-- notes: kept when the report is rewritten -->"


def write_page(path: Path, body: str) -> None:
    """path with body, then NOTES_MARKER and whatever notes the old page had after it."""
    old = path.read_text() if path.exists() else ""
    notes = old.split(NOTES_MARKER, 1)[1] if NOTES_MARKER in old else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body.rstrip() + "\n\n" + NOTES_MARKER + (notes or "\n"))


# ---------------------------------------------------------------------------------------------
# Numbers and tables


def number(value: float) -> str:
    """Three decimals, none from 100 up, two significant digits below 0.01."""
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3f}" if abs(value) >= 0.01 or value == 0 else f"{value:.2g}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence], align: str = "") -> str:
    """A markdown table; a cell None is "-", a float is written by `number`, anything else by
    str. `align` has a letter per column, "l" or "r" (right-aligned, for numbers); columns it
    does not reach are left as markdown leaves them."""

    def cell(value):
        if value is None:
            return "-"
        if isinstance(value, float):
            return number(value)
        return str(value)

    rule = "".join("---:|" if align[i : i + 1] == "r" else "---|" for i in range(len(header)))
    lines = ["| " + " | ".join(header) + " |", "|" + rule]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def signed(differences: dict[str, float]) -> str:
    """ "name +0.123; name -0.045" for a papers table, "-" where there is none."""
    return "; ".join(f"{name} {value:+.3f}" for name, value in differences.items()) or "-"


# ---------------------------------------------------------------------------------------------
# Medians over seeds with their range


def group(records: Sequence[dict], by: Sequence[str]) -> dict[tuple, list[float]]:
    """{values of the fields `by`: the values of the records that share them}, in first-seen
    order."""
    groups: dict[tuple, list[float]] = {}
    for rec in records:
        groups.setdefault(tuple(rec[key] for key in by), []).append(rec["value"])
    return groups


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    return statistics.median(values), min(values), max(values)


def medians(records: Sequence[dict], by: Sequence[str]) -> dict[tuple, float]:
    """{values of the fields `by`: the median value of the records that share them}."""
    return {key: statistics.median(values) for key, values in group(records, by).items()}


def spread_cell(
    values: Sequence[float] | None, seeds: int | None = None, decimals: int | None = None
) -> str | None:
    """ "median (min-max)" over seeds, with the count where it falls short of `seeds`; numbers
    as `number` writes them, or with `decimals` places."""
    if not values:
        return None
    show = number if decimals is None else lambda value: f"{value:.{decimals}f}"
    middle, low, high = spread(values)
    text = show(middle) if len(values) == 1 else f"{show(middle)} ({show(low)}-{show(high)})"
    if seeds is not None and len(values) < seeds:
        text += f" [{len(values)}/{seeds} seeds]"
    return text


def versions_line(records: Sequence[dict]) -> str:
    """The software of the records: each field once, with every value it takes among them
    ("fwpzoo 1880e6e40be9 / 425cfb4ef05c"); each record keeps its own set."""
    values: dict[str, set[str]] = {}
    for rec in records:
        for name, value in (rec.get("versions") or {}).items():
            values.setdefault(name, set()).add(str(value))
    return ", ".join(f"{name} {' / '.join(sorted(vs))}" for name, vs in values.items())


def machine_line(result: dict) -> str:
    """A benchmark's "Machine:" sentence: what ran it and how loaded it was before and after."""
    info = result["machine"]
    return (
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['devices']} x {info['device']}, "
        f"jax {info['jax']}, Python {info['python']}; 1-minute load average "
        f"{result['load_before']:.1f} before, {result['load_after']:.1f} after."
    )


# ---------------------------------------------------------------------------------------------
# Figures


def pyplot():
    """matplotlib.pyplot drawing into files (imported here, when a figure is drawn: a command
    that writes no figure does not pay for matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def subplots(*args, **kwargs):
    """matplotlib's (figure, axes), for a file."""
    return pyplot().subplots(*args, **kwargs)


def save_figure(fig, path: Path, dpi: int = 120) -> None:
    """Lays the figure out, writes it to `path` and frees it."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def errorbars(ax, curve: dict, **style) -> None:
    """Plots {x: values over seeds} as the median with bars to the min and max."""
    xs = sorted(curve)
    if not xs:
        return
    middle, low, high = zip(*(spread(curve[x]) for x in xs), strict=True)
    below = [m - lo for m, lo in zip(middle, low, strict=True)]
    above = [hi - m for m, hi in zip(middle, high, strict=True)]
    style = {"marker": "o", "markersize": 3, **style}
    ax.errorbar(xs, middle, yerr=[below, above], capsize=2, **style)


REPO = Path(__file__).resolve().parents[1]


def git(*args: str) -> str:
    """stdout of a git command in the checkout this code runs from; CalledProcessError/OSError."""
    return subprocess.run(
        ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


# What a point's computation reads from the checkout besides installed packages: the code and
# the configs (a record's spec holds the settings, but not a new module or an edited default).
TRACKED_INPUTS = ("fwpzoo", "configs")


@functools.cache
def checkout_state() -> tuple[str, tuple[str, ...]] | None:
    """(HEAD's full commit, the paths under TRACKED_INPUTS that differ from it, untracked ones
    included); None outside a git checkout. Cached: read once when a sweep starts, it names
    the code the sweep's process runs."""
    try:
        head = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=all", "--", *TRACKED_INPUTS)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head, tuple(line[3:] for line in status.splitlines())


def git_commit() -> str | None:
    """The checkout's commit (12 digits), "+" if its code or configs differ from it."""
    state = checkout_state()
    if state is None:
        return None
    head, changed = state
    return head[:12] + "+" * bool(changed)
