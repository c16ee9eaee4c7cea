"""Inner mini-batches: how the deep cells lay a sequence out for their scans, and the layer norm
TTT puts on its fast net's output.

A sequence [B, T, H, ...] is padded to a whole number of units (a mini-batch, or a chunk of
several) and laid out as [N, B, H, U, ...] for a lax.scan over its N units. Padded tokens are
marked invalid: the cells drop their gradients, and the last gate value is repeated into the
padding (edge padding), so a padded token's weights are the last real token's and the final
state is the one after the last real token.

Dimension letters: B batch, T time, H heads, K key dim, V value dim, N units, U tokens per unit.
"""

import jax
import jax.numpy as jnp

EPS = 1e-6  # TTT's LayerNorm epsilon (flash-linear-attention's naive ttt_linear)


def pad_time(x, T_padded, mode="constant"):
    """x [B, T, ...] padded along time to T_padded (zeros, or "edge": the last value repeated)."""
    widths = [(0, 0), (0, T_padded - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
    return jnp.pad(x, widths, mode=mode)


def units(x, size):
    """[B, T, H, ...] (T a multiple of size) -> [N, B, H, U, ...]; [B, T] -> [N, B, 1, U]."""
    B, T = x.shape[:2]
    if x.ndim == 2:  # resets and the valid mask: one row for all heads
        return jnp.moveaxis(x.reshape(B, T // size, 1, size), 1, 0)
    x = x.reshape(B, T // size, size, *x.shape[2:])  # [B, N, U, H, ...]
    return jnp.swapaxes(jnp.moveaxis(x, 1, 0), 2, 3)


def from_units(x):
    """[N, B, H, U, ...] -> [B, N U, H, ...]."""
    x = jnp.moveaxis(jnp.swapaxes(x, 2, 3), 0, 1)  # [B, N, U, H, ...]
    return x.reshape(x.shape[0], -1, *x.shape[3:])


def padded_length(T, size):
    return -(-T // size) * size


def layout(size, per_token, reset, edge=()):
    """The scan inputs of a sequence in units of `size` tokens: every array of per_token
    {name: [B, T, H, ...]} as [N, B, H, U, ...] (those named in `edge` padded with their last
    value, the rest with zeros), and "valid", "reset" [N, B, 1, U] bool."""
    B, T = next(iter(per_token.values())).shape[:2]
    T_padded = padded_length(T, size)
    out = {
        name: units(pad_time(x, T_padded, "edge" if name in edge else "constant"), size)
        for name, x in per_token.items()
    }
    valid = jnp.arange(T_padded) < T  # [T_padded]
    out["valid"] = units(jnp.broadcast_to(valid, (B, T_padded)), size)
    reset = jnp.zeros((B, T), bool) if reset is None else reset
    out["reset"] = units(pad_time(reset, T_padded), size)
    return out


def normalise(x, eps=EPS):
    """(x - mean) / std over the last axis, and std = sqrt(var + eps) [..., 1] (biased var)."""
    centred = x - jnp.mean(x, axis=-1, keepdims=True)
    std = jnp.sqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + eps)
    return centred / std, std


def layer_norm(x, weight, bias, eps=EPS):
    """weight * normalise(x) + bias, weight and bias broadcast over the last axis."""
    return weight * normalise(x, eps)[0] + bias


def layer_norm_gradient(z, target, weight, bias, eps=EPS):
    """d/dz of 1/2 ||layer_norm(z) - target||^2 over the last axis, in closed form (the TTT
    authors' and flash-linear-attention's; the float64 test checks it against jax.grad)."""
    z_hat, std = normalise(z, eps)
    g = (weight * z_hat + bias - target) * weight  # [..., V]: the gradient at z_hat
    D = z.shape[-1]
    sums = jnp.sum(g, axis=-1, keepdims=True), jnp.sum(g * z_hat, axis=-1, keepdims=True)
    return (D * g - sums[0] - z_hat * sums[1]) / (D * std)


def scan_units(body, carry, xs):
    """lax.scan of body over the leading axis of xs, each unit's work recomputed in the
    backward (jax.checkpoint): only the carries entering the units are kept."""
    return jax.lax.scan(jax.checkpoint(body), carry, xs)
