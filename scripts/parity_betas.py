"""The write strength beta a trained one-layer parity model gives each bit, per head.

    python scripts/parity_betas.py WORKDIR

WORKDIR is a parity run's workdir (e.g. runs/experiments/state_tracking/<point>). Beta comes from
a projection of the token's normalised embedding alone (not through the short convolution), so it
depends only on the bit; printed per head: beta for a 0 bit and for a 1 bit. A head that tracks
parity reflects on a 1 bit (beta near 2) and, to keep the sign over long strings, leaves the
tracked direction alone on a 0 bit: with beta near 0, or with a key orthogonal to the 1 bit's
(the write I - beta k k^T then moves nothing along it). Without a short convolution a key too
depends on the bit alone, and the cosine between the two bits' keys is printed as well.

For a mamba2 model the decay alpha is printed instead (its dt, too, bypasses the convolution): a
head that tracks parity with model.decay_range -1,1 flips its state's sign on a 1 bit (alpha
near -1) and keeps it on a 0 bit (alpha near 1).
"""

import sys

import jax.numpy as jnp
from flax import nnx

from fwpzoo.config_file import ConfigError
from fwpzoo.data.state_tracking import BIT_TOKENS
from fwpzoo.layers.mamba2 import Mamba2Mixer
from fwpzoo.train import restore_run


def print_decays(mixer: Mamba2Mixer, x) -> None:
    """alpha of a 0 bit and of a 1 bit per head, x [1, 2, D] the bits' normalised embeddings."""
    alpha = mixer.alpha(mixer.cell_inputs(x)["log_alpha"])[0]  # [2, H]
    for head, (a0, a1) in enumerate(alpha.T.tolist()):  # alpha [2, H]
        print(f"head {head}: alpha(0) = {a0:+.4f}, alpha(1) = {a1:+.4f}")


def main(workdir: str) -> None:
    run, step, state = restore_run(workdir)
    model = nnx.merge(run.graphdef, state)
    block = model.blocks[0]
    tokens = jnp.asarray([BIT_TOKENS])  # [1, 2]: bit 0, then bit 1
    x = block.mixer_norm(model.embed(tokens))  # [1, 2, D]
    print(f"{workdir} at step {step}")
    if isinstance(block.mixer, Mamba2Mixer):
        print_decays(block.mixer, x)
        return
    written = block.mixer.cell_inputs(x)
    beta = written["beta"][0]  # [2, H]
    # keys of the bits alone, L2-normalised [2, H, K]; with a conv each mixes in its neighbour
    keys = written["k"][0] if block.mixer.conv is None else None
    for head in range(beta.shape[-1]):
        b0, b1 = float(beta[0, head]), float(beta[1, head])
        line = f"head {head}: beta(0) = {b0:.4f}, beta(1) = {b1:.4f}"
        if keys is not None:
            line += f", cos(k(0), k(1)) = {float(jnp.dot(keys[0, head], keys[1, head])):+.4f}"
        print(line)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/parity_betas.py WORKDIR")
    try:
        main(sys.argv[1])
    except ConfigError as error:
        sys.exit(f"parity_betas: {error}")
