"""Pure train and eval steps on the split model state (graphdef, params, rest).

The loop jits these functions of plain pytrees rather than using nnx.jit in graph mode: the model
is rebuilt inside the trace by nnx.merge, so each call costs one dispatch (DESIGN.md section 3).
The compute dtype lives in the graphdef (build_model's `dtype`): parameters stay float32 and are
cast where they are used, so their gradients and the optimizer state are float32 too.
A TrainState is a dict {"params", "rest", "opt_state"}: the model's nnx.Param leaves, its other
variables (fixed random features, RNG state) and the optax state of the params.
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def token_sums(graphdef, params, rest, batch) -> dict:
    """Sums over the batch's weighted target tokens: cross-entropy, weight and correct argmaxes;
    and the sequences with a scored token and those whose every scored token is right. A batch of
    packed rows carries "reset" [B, T] (True at each document start) for the model; one whose
    tokens stand for numbers carries "token_values" [B, vocab] (NaN for the other tokens), and
    the sums add the squared error of the most likely number and the targets' squares."""
    model = nnx.merge(graphdef, params, rest)
    logits = model(batch["inputs"], reset=batch.get("reset"))  # [B, T, vocab] float32
    targets = batch["targets"]  # [B, T]
    weights = batch["weights"].astype(jnp.float32)  # [B, T]
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # [B, T]
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)  # [B, T]
    scored = weights > 0  # [B, T]
    sequence_scored = jnp.any(scored, axis=-1)  # [B]
    sequence_correct = sequence_scored & jnp.all((correct > 0) | ~scored, axis=-1)  # [B]
    sums = {
        "loss_sum": jnp.sum(cross_entropy * weights),
        "weight": jnp.sum(weights),
        "correct": jnp.sum(correct * weights),
        "sequences": jnp.sum(sequence_scored.astype(jnp.float32)),
        "sequences_correct": jnp.sum(sequence_correct.astype(jnp.float32)),
    }
    if "token_values" in batch:
        sums |= number_sums(logits, targets, weights, batch["token_values"])
    return sums


def number_sums(logits, targets, weights, values) -> dict:
    """Squared error of the most likely number token's value and the targets' squared values,
    weighted: logits [B, T, vocab], targets, weights [B, T], values [B, vocab] (NaN: not a
    number)."""
    numbers = ~jnp.isnan(values)[:, None, :]  # [B, 1, vocab]
    guess = jnp.argmax(jnp.where(numbers, logits, -jnp.inf), axis=-1)  # [B, T]
    known = jnp.nan_to_num(values)  # [B, vocab]
    predicted = jnp.take_along_axis(known, guess, axis=1)  # [B, T]
    target = jnp.take_along_axis(known, targets, axis=1)  # [B, T]
    return {
        "squared_error": jnp.sum(jnp.square(predicted - target) * weights),
        "target_square": jnp.sum(jnp.square(target) * weights),
    }


def micro_batches(batch, grad_accum: int):
    """[B, ...] -> [grad_accum, B / grad_accum, ...], micro-batch j = rows j, j + A, j + 2A, ...

    Strided rows keep the leading (data-sharded) axis of every micro-batch evenly split over the
    devices, so no rows move between devices.
    """

    def split(x):
        x = x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:])  # [B / A, A, ...]
        return jnp.swapaxes(x, 0, 1)  # [A, B / A, ...]

    return jax.tree.map(split, batch)


def make_train_step(graphdef, optimizer: optax.GradientTransformation, *, grad_accum: int):
    """train_step(state, batch) -> (state, metrics): one optimizer step on the mean token loss.

    Gradients of the summed loss are accumulated over micro-batches and divided by the total weight
    once, so grad_accum > 1 computes the same step as one big batch.
    """

    def summed_loss(params, rest, batch):
        sums = token_sums(graphdef, params, rest, batch)
        return sums["loss_sum"], sums

    grad_fn = jax.grad(summed_loss, has_aux=True)

    def accumulated_grads(params, rest, batch):
        if grad_accum == 1:
            return grad_fn(params, rest, batch)

        def add_micro_batch(total, micro):
            return jax.tree.map(jnp.add, total, grad_fn(params, rest, micro)), None

        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, rest, batch))
        total, _ = jax.lax.scan(add_micro_batch, zeros, micro_batches(batch, grad_accum))
        return total

    def train_step(state, batch):
        grads, sums = accumulated_grads(state["params"], state["rest"], batch)
        weight = jnp.maximum(sums["weight"], 1.0)
        grads = jax.tree.map(lambda g: g / weight, grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {
            "loss": sums["loss_sum"] / weight,
            "accuracy": sums["correct"] / weight,
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(params),
        }
        return {"params": params, "rest": state["rest"], "opt_state": opt_state}, metrics

    return train_step


def make_eval_step(graphdef):
    """eval_step(params, rest, batch) -> token sums (see token_sums)."""

    def eval_step(params, rest, batch):
        return token_sums(graphdef, params, rest, batch)

    return eval_step
