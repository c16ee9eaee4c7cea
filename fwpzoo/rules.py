"""The rules table: every cell family's update, objective, step, state and forms, read from the
cell modules themselves (GATE_SPECS and OBJECTIVE, fwpzoo/cells/_spec.py).

    fwpzoo list                 prints it as text, with the other registries
    fwpzoo list --rules-md      prints docs/rules.md (a test checks the committed file matches)
"""

from fwpzoo import cells

COLUMNS = ("rule", "update", "objective", "step", "state size", "forms", "paper")
FORM_NAMES = ("step", *cells.FORMS)


def forms_of(module) -> list[str]:
    return [form for form in FORM_NAMES if hasattr(module, form)]


def row(name: str, module) -> dict[str, str]:
    objective = module.OBJECTIVE
    return {
        "rule": name,
        "update": objective.update,
        "objective": objective.loss,
        "step": objective.describe_step(),
        "state size": f"{objective.state.size()} ({objective.state.describe()})",
        "forms": ", ".join(forms_of(module)),
        "paper": objective.paper,
    }


def rows() -> list[dict[str, str]]:
    return [row(name, module) for name, module in cells.CELLS.items()]


def gate_line(name: str, module) -> str:
    gates = [
        f"`{g.name}` ({g.shape}, {g.range}{', per sub-step' if g.per_sub_step else ''}"
        f"{', optional' if g.optional else ''}{f', times `{g.times}`' if g.times else ''})"
        for g in module.GATE_SPECS
    ]
    return f"- `{name}`: {', '.join(gates) if gates else 'no gates'}"


def markdown() -> str:
    """docs/rules.md."""
    lines = [
        "# Update rules and the objectives they optimise",
        "",
        "Generated from the cell modules by `fwpzoo list --rules-md > docs/rules.md`; do not edit",
        "by hand (tests/test_rules_table.py checks this file against the generator).",
        "",
        "Every fast-weight update is one step of an optimiser on a local objective of the current",
        "token (Irie & Gershman 2025, Table 1). Orientation: S [K, V], read o_t = S_t^T q_t after",
        "the write. `step` names the kind of step: a gradient step (on a linear loss it is",
        "Hebbian), N gradient steps per token, an implicit (proximal) step, a gradient step with",
        "momentum, or the exact minimiser; `decay exp(g)` means the state is first scaled by the",
        "decay gate g (weight decay as a shrinkage step). tests/test_cells.py checks in float64",
        "that every rule's `step` is the step its objective names, with the gradient from",
        "jax.grad of the loss. State size counts floats per head.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for r in rows():
        cells_text = [r[c].replace("|", "\\|") for c in COLUMNS]
        cells_text[0] = f"`{cells_text[0]}`"
        lines.append("| " + " | ".join(cells_text) + " |")
    lines += ["", "## Gates", "", "Each gate's shape and range, as the FWP layer builds it:", ""]
    lines += [gate_line(name, module) for name, module in cells.CELLS.items()]
    lines += [
        "",
        "Ranges: `beta` is a sigmoid scaled by `model.beta_range`, `unit` a sigmoid, `log decay`",
        "the Mamba-2 parametrisation -exp(A) softplus(x + dt_bias) (<= 0), `positive` a softplus,",
        "`real` no activation, `negative unit` a sigmoid minus 1, `direction` the projection",
        "L2-normalised over the key axis. A gate `times` another is multiplied by it. A `scalar",
        "or per key` gate is [B, T, H] or [B, T, H, K] as `model.decay` says; a static gate is a",
        "parameter [H, K] of the layer.",
        "",
    ]
    return "\n".join(lines)


def text() -> str:
    """The table for `fwpzoo list`: rule, step, state size and forms, aligned."""
    table = [("rule", "step", "state size", "forms")]
    for name, module in cells.CELLS.items():
        objective = module.OBJECTIVE
        table.append(
            (name, objective.describe_step(), objective.state.size(), ", ".join(forms_of(module)))
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(r, widths, strict=True)).rstrip()
        for r in table
    )
