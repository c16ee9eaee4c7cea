"""The training loop in-process: the step's arithmetic, checkpoints, resume, eval and divergence."""

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import SingleDeviceSharding

from fwpzoo import cells
from fwpzoo.config import CheckpointConfig, Config, from_dict
from fwpzoo.layers import MIXERS
from fwpzoo.layers.params import GateParam, ScaleParam
from fwpzoo.models import ModelConfig, build_model
from fwpzoo.train import (
    TrainingDiverged,
    evaluate,
    make_eval_step,
    prepare,
    restore_run,
    sharding,
    train,
    training_time,
)
from fwpzoo.train.checkpoint import Checkpoints, abstract_with_sharding
from fwpzoo.train.loop import StepPlan, TrainingClock, plan_step
from fwpzoo.train.metrics import read_metrics, truncate_metrics
from fwpzoo.train.optim import decayed, learning_rate_schedule, make_optimizer
from fwpzoo.train.sharding import dividing_count, shard_batch, to_host
from fwpzoo.train.state import init_train_state
from fwpzoo.train.steps import make_train_step, micro_batches, token_sums

REPO = Path(__file__).resolve().parent.parent

TINY = {
    "model": {"mixers": ["fwp", "attention"], "d_model": 16, "num_heads": 2, "chunk_size": 8},
    "data": {"task": "mqar", "seq_len": 16, "vocab_size": 16, "num_pairs": 3},
    "train": {
        "steps": 4,
        "batch_size": 8,
        "learning_rate": 1e-2,
        "warmup_steps": 1,
        "log_every": 1,
    },
    "checkpoint": {"every": 2, "async_save": False},
    "eval": {"every": 2, "batch_size": 8, "num_batches": 1},
}


def tiny(**sections) -> Config:
    return from_dict(Config, {name: {**TINY[name], **sections.get(name, {})} for name in TINY})


def one_step(cfg: Config):
    """(state after one step, metrics) on batch 0."""
    run = prepare(cfg)
    state = init_train_state(cfg, run.task.vocab_size, run.optimizer, run.mesh)
    step = jax.jit(make_train_step(run.graphdef, run.optimizer, grad_accum=cfg.train.grad_accum))
    return step(state, shard_batch(run.task.train_batch(0, cfg.train.batch_size), run.mesh))


def test_micro_batches_take_strided_rows():
    batch = {"inputs": np.arange(6 * 2).reshape(6, 2)}
    micro = micro_batches(batch, 3)["inputs"]  # [3, 2, 2]
    np.testing.assert_array_equal(micro[1], [[2, 3], [8, 9]])


@pytest.fixture(scope="module")
def float32_step():
    """One float32 step of the tiny config without accumulation: the reference of two tests."""
    return one_step(tiny())


def test_grad_accumulation_takes_the_same_step_as_one_big_batch(float32_step):
    state_1, metrics_1 = float32_step
    state_4, metrics_4 = one_step(tiny(train={"grad_accum": 4}))
    np.testing.assert_allclose(metrics_4["loss"], metrics_1["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics_4["grad_norm"], metrics_1["grad_norm"], rtol=1e-5)
    leaves_4, leaves_1 = jax.tree.leaves(state_4["params"]), jax.tree.leaves(state_1["params"])
    for a, b in zip(leaves_4, leaves_1, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bf16_compute_keeps_float32_parameters_and_optimizer_state(float32_step):
    _, metrics_32 = float32_step
    state_16, metrics_16 = one_step(tiny(train={"compute_dtype": "bfloat16"}))
    for leaf in jax.tree.leaves((state_16["params"], state_16["opt_state"])):
        assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
    # the same step, computed with 8 mantissa bits
    np.testing.assert_allclose(metrics_16["loss"], metrics_32["loss"], rtol=2e-2)
    assert not np.allclose(metrics_16["loss"], metrics_32["loss"], rtol=1e-6, atol=0)


def test_schedule_warms_up_linearly_then_decays_to_its_end_value():
    cfg = tiny(train={"steps": 100, "warmup_steps": 10, "end_learning_rate_ratio": 0.1})
    schedule = learning_rate_schedule(cfg.train)
    lr = cfg.train.learning_rate
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(5)), lr / 2, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(10)), lr, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(55)), lr * (0.1 + 0.9 * 0.5), rtol=1e-5)
    np.testing.assert_allclose(float(schedule(100)), lr * 0.1, rtol=1e-6)


# Weight decay by role (fwpzoo.layers.params) --------------------------------------------------

# Model configs that between them build every parameter a layer can have: each cell in the FWP
# mixer under each decay it takes, with its optional gates and a gate bias, and every other mixer
# with its optional parameters; the MoE MLP.
ROLE_CASES = [
    {"cell": name, "decay": decay, "output_norm": True}
    for name, module in cells.CELLS.items()
    for decay in (
        ("scalar", "per_key") if any(g.takes_per_key for g in module.GATE_SPECS) else ("scalar",)
    )
] + [
    {"cell": "delta_product", "product_decay": True},
    {"cell": "deep", "fast_net": "mlp", "inner_optimizer": "momentum"},
    {"cell": "delta_rule", "beta_init": 0.5},
    {"mixers": ("attention",), "attention_qk_norm": "head"},
    {"mixers": ("mamba2",)},
    {"mixers": ("ssm",)},
    {"mixers": ("plastic",), "form": "recurrent"},
    {"mixers": ("plastic",), "form": "recurrent", "plastic_on": "recurrent",
     "plasticity": "neuromodulated", "plastic_alpha": True},
    {"mixers": ("rdn",)},
    {"mixers": ("srwm",), "feature_map": "softmax", "qk_norm": "none"},
    {"moe_experts": 3, "moe_shared_hidden": 8},
]  # fmt: skip
# The weights a layer declares itself (every other weight is a Linear's kernel or the
# embedding): slow-weight matrices (plastic, rdn, srwm), the neuromodulator's readout, the
# diagonal SSM's input and output maps, the experts' stacked kernels.
DECLARED_WEIGHTS = ("W", "R", "W0", "w_mod", "B", "C", "gate", "up", "down")


def role_params(case: dict):
    """The parameters (shapes only) of a one-layer model of `case`."""
    cfg = ModelConfig(**{"mixers": ("fwp",), "d_model": 8, "num_heads": 2, **case})
    model = nnx.eval_shape(lambda: build_model(cfg, vocab_size=5, rngs=nnx.Rngs(0)))
    return nnx.state(model, nnx.Param)


def by_path(params) -> dict:
    """{"blocks/mixer/...": its nnx.Param} (list indices left out)."""
    leaves = jax.tree_util.tree_leaves_with_path(
        params, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    return {"/".join(sharding.path_names(path)): param for path, param in leaves}


def test_every_parameter_is_a_weight_or_has_a_stated_role():
    """Weight decay reads the kind of a parameter, so a gate, decay or per-head scalar declared
    as a plain nnx.Param would be decayed unnoticed: every decayed parameter must be a weight."""
    assert {case.get("mixers", ("fwp",))[0] for case in ROLE_CASES} == set(MIXERS)
    assert {case["cell"] for case in ROLE_CASES if "cell" in case} == set(cells.CELLS)
    for case in ROLE_CASES:
        for path, param in by_path(role_params(case)).items():
            if decayed(param):
                name = path.rsplit("/", 1)[-1]
                assert name in ("kernel", "embedding", *DECLARED_WEIGHTS) and param.ndim >= 2, (
                    f"{path} {param.shape} ({case}) would be weight-decayed: declare a gate, "
                    "decay or per-head scalar as GateParam, a norm's scale as ScaleParam"
                )
            else:
                assert isinstance(param, (GateParam, ScaleParam)), path


def filled(params):
    """Concrete arrays of `params`' shapes, no two entries alike."""
    return jax.tree.map(lambda x: jnp.arange(1, x.size + 1, dtype=x.dtype).reshape(x.shape), params)


def test_scalar_and_per_key_decays_are_treated_alike():
    """model.decay=scalar ([H]) and per_key ([H, K]) leave the decay's A_log and dt_bias to the
    gradient alone; weights are decayed in both. A zero gradient isolates weight decay."""
    optimizer = make_optimizer(tiny(train={"weight_decay": 0.5, "warmup_steps": 0}).train)
    zero_gradient_update = jax.jit(
        lambda params: optimizer.update(
            jax.tree.map(jnp.zeros_like, params), optimizer.init(params), params
        )[0]
    )
    moved = {}
    for decay in ("scalar", "per_key"):
        params = filled(role_params({"cell": "gated_delta_rule", "decay": decay}))
        updates = by_path(zero_gradient_update(params))
        moved[decay] = {path for path, x in updates.items() if np.any(x[...] != 0)}
        decays = {path for path in updates if "/decay/" in path}
        assert decays == {
            "blocks/mixer/gates/log_alpha/decay/A_log",
            "blocks/mixer/gates/log_alpha/decay/dt_bias",
        }
        assert not decays & moved[decay] and "blocks/mixer/qkv_proj/kernel" in moved[decay]
    assert moved["scalar"] == moved["per_key"]


def test_a_checkpoint_of_plain_params_restores_into_the_kinds(tmp_path):
    """Checkpoints hold arrays by path, not the parameter's kind: one saved when every parameter
    was a plain nnx.Param restores into GateParam and ScaleParam unchanged."""
    params = filled(role_params({"mixers": ("fwp", "mamba2"), "cell": "mesa"}))
    plain = jax.tree.map(
        lambda v: nnx.Param(v[...]), params, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    checkpoints = Checkpoints(tmp_path, CheckpointConfig(async_save=False))
    state = {"params": plain, "rest": {}, "opt_state": {"count": jnp.zeros(())}}
    checkpoints.save(1, state, {"config": {}})
    target = {"params": params, "rest": {}}
    abstract = abstract_with_sharding(target, SingleDeviceSharding(jax.devices()[0]))
    restored = by_path(checkpoints.restore_model(1, abstract, {})["params"])
    checkpoints.close()
    assert any(isinstance(p, GateParam) for p in restored.values())
    for path, param in by_path(params).items():
        assert type(restored[path]) is type(param)
        np.testing.assert_array_equal(restored[path][...], param[...])


def test_eval_from_the_checkpoint_alone_repeats_the_metrics_logged_in_training(tmp_path):
    # (Resuming is tested end to end, after a SIGKILL, in test_cli.py.)
    last = train(tiny(), tmp_path, progress=False)
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3, 4]
    run, step, model_state = restore_run(tmp_path)
    assert step == 4
    eval_step = jax.jit(make_eval_step(run.graphdef))
    metrics = evaluate(eval_step, model_state, run.task, run.cfg.eval, run.mesh, "valid")
    assert metrics == {"loss": last["valid_loss"], "accuracy": last["valid_accuracy"]}


def test_a_diverged_step_stops_the_run_and_is_never_saved(tmp_path):
    # The warmup takes the learning rate from 0 to 1e30: step 1 is harmless, step 2 sends the
    # weights to inf while its own loss (computed before the update) is still finite.
    cfg = tiny(
        train={"learning_rate": 1e30, "warmup_steps": 4, "steps": 6}, checkpoint={"every": 1}
    )
    with pytest.raises(TrainingDiverged) as error:
        train(cfg, tmp_path, progress=False)
    message = "param_norm is inf at step 2; training stopped, the last good checkpoint is step 1"
    assert str(error.value) == message
    assert Checkpoints(tmp_path / "checkpoints").steps() == [1]
    logged = read_metrics(tmp_path)
    assert [m["step"] for m in logged] == [1, 2]
    assert logged[1]["param_norm"] is None and logged[1]["nonfinite"] == {"param_norm": "inf"}
    assert np.isfinite(logged[1]["loss"])


def test_checkpoints_keep_the_latest_n_and_the_best(tmp_path):
    state = {"params": {"w": jnp.ones(2)}, "rest": {}, "opt_state": {"mu": jnp.zeros(2)}}
    for metric, losses, best in [
        ("loss", [0.5, 0.1, 0.7, 0.9], 2),
        ("accuracy", [0.5, 0.9, 0.2, 0.1], 2),
    ]:
        cfg = CheckpointConfig(keep=1, best_metric=metric, async_save=False)
        checkpoints = Checkpoints(tmp_path / metric, cfg)
        for step, value in enumerate(losses, start=1):
            checkpoints.save(step, state, {"next_batch_index": step}, metrics={metric: value})
        assert checkpoints.steps() == [best, 4]
        assert checkpoints.best_step() == best
        checkpoints.close()


def test_truncate_metrics_drops_lines_after_the_checkpoint(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        "".join(f'{{"step": {s}, "loss": 1.0}}\n' for s in range(1, 6))
    )
    truncate_metrics(tmp_path, 3)
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3]


def test_summarize_names_the_task_metrics():
    from fwpzoo.train import summarize

    sums = {"loss_sum": 6.0, "weight": 3.0, "correct": 1.5}
    assert summarize(sums, ("loss", "accuracy")) == {"loss": 2.0, "accuracy": 0.5}
    assert summarize(sums, ("loss", "bpc")) == {"loss": 2.0, "bpc": 2.0 / math.log(2)}


def test_replicated_metrics_reach_the_host():
    assert float(to_host(jnp.float32(2.5))) == 2.5


def test_sequence_accuracy_counts_strings_right_at_every_scored_position():
    from fwpzoo.train import summarize

    sums = {"loss_sum": 0.0, "weight": 1.0, "correct": 1.0, "sequences": 4.0}
    assert summarize(sums | {"sequences_correct": 3.0}, ("sequence_accuracy",)) == {
        "loss": 0.0,
        "sequence_accuracy": 0.75,
    }


def test_training_stops_when_the_stop_metric_is_reached_and_stays_stopped(tmp_path):
    """stop_at 0 is reached at the first eval (step 2 of 4): a checkpoint is kept there and a
    rerun into the workdir trains no further."""
    cfg = tiny(train={"stop_metric": "accuracy", "stop_at": 0.0})
    train(cfg, tmp_path, progress=False)
    assert Checkpoints(tmp_path / "checkpoints").latest_step() == 2
    assert train(cfg, tmp_path, progress=False) == {"step": 2}
    assert [row["step"] for row in read_metrics(tmp_path)] == [1, 2]


def test_a_resumed_run_counts_the_training_time_of_every_segment(tmp_path):
    """The checkpoints carry the wall and CPU seconds spent so far: a run resumed from step 2
    adds its own to those of the segment before, rather than starting from zero."""
    train(tiny(train={"steps": 2}), tmp_path, progress=False)
    first = training_time(tmp_path, 2)
    assert set(first) == {"train_seconds", "train_cpu_seconds"}
    assert all(seconds > 0 for seconds in first.values())
    train(tiny(train={"steps": 4}), tmp_path, progress=False)
    both = training_time(tmp_path, 4)
    assert all(both[key] > first[key] for key in first)
    clock = TrainingClock()
    clock.resume({"train_seconds": 1e6, "train_cpu_seconds": 2e6})
    spent = clock.spent()
    assert 1e6 <= spent["train_seconds"] < 1e6 + 60 and 2e6 <= spent["train_cpu_seconds"] < 2e6 + 60


def test_an_unknown_stop_metric_is_refused():
    from fwpzoo.config import ConfigError

    with pytest.raises(ConfigError, match="train.stop_metric 'bpc' is not an eval metric"):
        prepare(tiny(train={"stop_metric": "bpc"}))


@pytest.mark.slow
def test_programmed_mixers_train_resume_and_evaluate_like_any_other(tmp_path, capsys):
    """rdn and srwm layers on a formal language: a run stopped at step 2 and resumed to step 4
    logs the losses of the uninterrupted run, and eval from the checkpoint alone repeats the
    metrics logged in training (no special case in train/ for either mixer). The model-wide
    form, chunkwise, is one neither has: each layer runs recurrent, said once per run."""
    sections = {
        "model": {
            "mixers": ["rdn", "srwm"],
            "feature_map": "softmax",
            "qk_norm": "none",
            "chunk_size": 8,
        },
        "data": {"task": "formal_language", "language": "dyck_1", "seq_len": 12, "max_len": 12},
    }
    cfg = tiny(**sections)
    whole = train(cfg, tmp_path / "whole", progress=False)
    err = capsys.readouterr().err
    for i, mixer in enumerate(("rdn", "srwm")):
        note = (
            f"fwpzoo train: model.mixers[{i}]: model.form=chunkwise: the {mixer} mixer has no "
            "chunkwise form (its forms: recurrent), so it runs recurrent\n"
        )
        assert err.count(note) == 1
    train(tiny(**sections, train={"steps": 2}), tmp_path / "resumed", progress=False)
    resumed = train(cfg, tmp_path / "resumed", progress=False)
    losses = [[row["loss"] for row in read_metrics(tmp_path / d)] for d in ("whole", "resumed")]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    assert resumed["valid_loss"] == whole["valid_loss"]
    run, step, model_state = restore_run(tmp_path / "whole")
    eval_step = jax.jit(make_eval_step(run.graphdef))
    metrics = evaluate(eval_step, model_state, run.task, run.cfg.eval, run.mesh, "valid")
    assert step == 4 and metrics["loss"] == whole["valid_loss"]
    assert metrics["sequence_accuracy"] == whole["valid_sequence_accuracy"]


def test_the_default_device_count_is_the_largest_that_divides_the_batches():
    assert dividing_count(4, [32, 64]) == 4
    assert dividing_count(4, [6, 64]) == 2
    assert dividing_count(3, [8]) == 2
    assert dividing_count(4, [7]) == 1
    assert dividing_count(2, [8], processes=2) == 2
    assert dividing_count(2, [6], processes=2) == 1


def test_one_device_per_core_unless_told_and_one_line_when_the_batch_does_not_divide(
    monkeypatch, capsys
):
    split = []
    monkeypatch.setattr(sharding, "split_cpu", split.append)
    monkeypatch.setattr(sharding, "cpu_cores", lambda: 4)
    monkeypatch.setattr(sharding, "device_count_set_elsewhere", lambda: False)
    sharding.use_cpu_devices(None, {"train.batch_size": 32, "eval.batch_size": 64})
    sharding.use_cpu_devices(3, {"train.batch_size": 32})  # as told, checked later by prepare
    assert split == [4, 3] and capsys.readouterr().err == ""
    sharding.use_cpu_devices(None, {"train.batch_size": 6, "eval.batch_size": 64})
    assert split[-1] == 2
    message = capsys.readouterr().err
    assert message == (
        "fwpzoo: train.batch_size = 6, eval.batch_size = 64: not divisible by 4 CPU devices "
        "(one per core); using 2\n"
    )
    monkeypatch.setattr(sharding, "device_count_set_elsewhere", lambda: True)
    sharding.use_cpu_devices(None, {"train.batch_size": 6})  # XLA_FLAGS or a started backend
    assert split[-1] == 2 and len(split) == 3


def test_a_packed_batch_scores_each_document_as_if_it_ran_alone(tmp_path):
    """Documents of a folder corpus packed into rows: every scored token's loss equals the loss
    of the same token with its document's part of the row run alone (each mixer's own resets are
    tested in test_layers); the targets that are a document's first byte are not scored."""
    text = (REPO / "tests" / "fixtures" / "carroll-alice.txt").read_bytes()
    for i, length in enumerate([30, 9, 45, 20, 12, 60]):  # train parts: 90% of each
        (tmp_path / f"doc{i}.txt").write_bytes(text[1000 * i : 1000 * i + length])
    data = {"task": "text", "corpus": str(tmp_path), "seq_len": 16, "pack": True}
    cfg = tiny(data=data, model={"mixers": ["fwp", "attention"]})  # chunkwise, chunks of 8
    run = prepare(cfg)
    starts = np.flatnonzero(run.task.starts["train"])
    np.testing.assert_array_equal(starts, [0, 27, 35, 75, 93, 103])
    rows = run.task.num_windows  # 9 windows of 16 + 1 bytes: one epoch in one batch
    batch = run.task.train_batch(0, rows)
    reset, weights = batch["reset"], batch["weights"]
    # every document start is an input once (reset) and, but the first, a target once (unscored)
    assert reset.sum() == 6 and (weights == 0).sum() == 5
    assert sorted(batch["targets"][weights == 0]) == sorted(run.task.splits["train"][starts[1:]])
    segments = [
        (row, start, end)
        for row in range(rows)
        for start, end in zip(
            [0, *np.flatnonzero(reset[row][1:]) + 1],
            [*np.flatnonzero(reset[row][1:]) + 1, 16],
            strict=True,
        )
    ]
    state = init_train_state(cfg, run.task.vocab_size, run.optimizer, run.mesh)

    @jax.jit
    def losses(params, rest, batch):
        model = nnx.merge(run.graphdef, params, rest)
        token_loss = lambda logits, targets: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
            logits, targets
        )
        packed = token_loss(model(batch["inputs"], reset=batch["reset"]), batch["targets"])
        # each segment alone at the start of its own row, byte 0 after it (causal: never seen)
        inputs, targets = (
            jnp.stack([jnp.pad(batch[name][r, s:e], (0, 16 - e + s)) for r, s, e in segments])
            for name in ("inputs", "targets")
        )  # [segments, 16]
        alone = token_loss(model(inputs), targets)
        return packed, alone, token_sums(run.graphdef, params, rest, batch)["loss_sum"]

    packed, alone, loss_sum = losses(state["params"], state["rest"], batch)
    for (row, start, end), loss in zip(segments, alone, strict=True):
        scored = weights[row, start:end] > 0
        np.testing.assert_allclose(
            packed[row, start:end][scored], loss[: end - start][scored], rtol=1e-5
        )
    np.testing.assert_allclose(loss_sum, np.sum(np.asarray(packed) * weights), rtol=1e-5)


def test_the_plan_after_each_step_follows_the_schedules():
    cfg = from_dict(
        Config,
        {
            "train": {"steps": 12, "log_every": 5},
            "checkpoint": {"every": 4, "best_metric": None},
            "eval": {"every": 6},
        },
    )
    plans = {step: plan_step(cfg, step, stopping=False) for step in range(1, 13)}
    assert [s for s, p in plans.items() if p.save] == [4, 8, 12]  # and the last step
    assert [s for s, p in plans.items() if p.evaluate] == [6, 12]
    assert [s for s, p in plans.items() if p.log] == [4, 5, 6, 8, 10, 12]  # every save and eval
    assert all(p.scheduled_eval == p.evaluate for p in plans.values())
    # a stop saves where the schedule would not, and logs only what the schedule logs
    assert plan_step(cfg, 3, stopping=True) == StepPlan(
        save=True, evaluate=False, log=False, scheduled_eval=False
    )
    # a checkpoint ranked by an eval metric is evaluated at every save, an interrupted one too
    ranked = from_dict(Config, {"train": {"steps": 12}, "checkpoint": {"every": 4}})
    assert plan_step(ranked, 4, stopping=False).evaluate
    assert plan_step(ranked, 3, stopping=True) == StepPlan(
        save=True, evaluate=True, log=False, scheduled_eval=False
    )
