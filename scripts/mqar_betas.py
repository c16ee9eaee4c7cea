"""The write strength a trained MQAR model uses: beta by layer and by the role of the token.

For each workdir of an MQAR run of an fwp model with a beta (delta_rule, gated_delta_rule), its
newest checkpoint is restored and run on 128 test-split sequences; it prints the median beta per
layer over the heads of the pairs' key tokens, their value tokens (the re-bindings' too),
the filler tokens and the query tokens, and the range of the per-head medians:

    python scripts/mqar_betas.py runs/experiments/mqar/delta_rule-h8-n8-s1 ...

A point's workdir is what `fwpzoo experiment mqar --point NAME` trains (docs/results/mqar.md).
"""

import argparse
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from fwpzoo.config import ConfigError
from fwpzoo.train.restore import restore_run

ROLES = ("key", "value", "filler", "query")


def token_roles(inputs, weights, bindings):
    """[B, T] role names: the first 2 * bindings tokens alternate key, value; queries carry
    weight; the rest is filler."""
    roles = np.full(inputs.shape, "filler", object)
    roles[:, 0 : 2 * bindings : 2] = "key"
    roles[:, 1 : 2 * bindings : 2] = "value"
    roles[weights > 0] = "query"
    return roles


def layer_betas(model, inputs):
    """Each block's beta [B, T, H] on `inputs` [B, T], the blocks run in turn."""
    x = model.embed(jnp.asarray(inputs))
    betas = []
    for block in model.blocks:
        betas.append(np.asarray(block.mixer.cell_inputs(block.mixer_norm(x))["beta"]))
        x = block(x)
    return betas


def describe(workdir: Path) -> list[str]:
    run, step, state = restore_run(workdir)
    data = run.cfg.data
    if data.task != "mqar" or any(layer.mixers[0] != "fwp" for layer in run.cfg.model.layers()):
        raise ConfigError(f"{workdir} is not an MQAR run of fwp layers")
    model = nnx.merge(run.graphdef, state["params"], state["rest"])
    batch = next(iter(run.task.eval_batches("test", 128, num_batches=1)))
    roles = token_roles(batch["inputs"], batch["weights"], data.num_pairs + data.rebinds)
    try:
        betas = layer_betas(model, batch["inputs"])
    except KeyError:
        raise ConfigError(f"{workdir}: cell {run.cfg.model.cell!r} has no beta") from None
    rows = []
    for i, beta in enumerate(betas):
        by_role = " | ".join(f"{np.median(beta[roles == role]):.3f}" for role in ROLES)
        heads = np.median(beta, axis=(0, 1))  # [H]
        spread = f"{heads.min():.3f}-{heads.max():.3f}"
        rows.append(f"| {workdir.name} | {step} | {i} | {by_role} | {spread} |")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    try:
        rows = [row for workdir in args.workdirs for row in describe(workdir)]
    except ConfigError as error:
        print(f"mqar_betas: {error}", file=sys.stderr)
        return 2
    print("| run | step | layer | key | value | filler | query | per-head medians |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
