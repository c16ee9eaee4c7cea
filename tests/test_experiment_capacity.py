import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fwpzoo import cells, experiments
from fwpzoo.config import ConfigError
from fwpzoo.data.capacity import capacity_batch
from fwpzoo.experiments import capacity
from fwpzoo.experiments._sweep import RUN_FIELDS
from fwpzoo.layers.feature_maps import apply_feature_map, favor_projection


def _batch(setting, num_pairs, batch_size=6, seed=0):
    batch = capacity_batch(seed, batch_size, num_pairs, setting)
    values = jax.nn.one_hot(batch["values"], num_pairs)  # [B, L, V]
    return batch, values


@pytest.mark.parametrize("form", ["recurrent", "chunkwise"])
def test_sum_rule_is_normalised_linear_attention(form):
    S, d_key = 5, 4
    batch, values = _batch("overwrite", S)
    params = capacity.init_params(jax.random.key(0), S, d_key)
    readout = jax.jit(capacity.readout_fn("sum-elu1", form=form, chunk_size=4))
    y = readout(params, batch["keys"], values, batch["query"])
    k = apply_feature_map("elu1", params["embedding"][batch["keys"]] @ params["w_k"])  # [B, L, K]
    q = apply_feature_map("elu1", params["embedding"][batch["query"]] @ params["w_q"])  # [B, K]
    scores = np.einsum("blk,bk->bl", k, q)  # [B, L]
    expected = np.einsum("bl,blv->bv", scores, values) / scores.sum(-1, keepdims=True)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model", ["delta-dpfp2", "sum-favor"])
def test_chunkwise_matches_recurrent_in_outputs_and_gradients(model):
    S, d_key = 5, 4  # overwrite: L = 10 pairs, two full chunks of 4 and a partial one
    batch, _ = _batch("overwrite", S)
    params = capacity.init_params(jax.random.key(1), S, d_key)
    projection = favor_projection(jax.random.key(2), d_key, 3)

    def loss(form, p):
        readout = capacity.readout_fn(model, projection, form=form, chunk_size=4)
        return capacity.batch_loss(readout, p, batch, S)

    reference, reference_grads = jax.jit(jax.value_and_grad(lambda p: loss("recurrent", p)))(params)
    fast, fast_grads = jax.jit(jax.value_and_grad(lambda p: loss("chunkwise", p)))(params)
    np.testing.assert_allclose(fast, reference, rtol=1e-5)
    for name in params:
        np.testing.assert_allclose(fast_grads[name], reference_grads[name], rtol=1e-4, atol=1e-6)


def _one_hot_key_params(S):
    """Keys whose DPFP-1 features are one-hot: embedding row j = e_j + e_{j+1} gives
    dpfp1 = e_{j+1} (the only adjacent pair of positive entries); beta ~ 1."""
    d = S + 1
    eye = jnp.eye(d)
    return {
        "embedding": eye[:S] + eye[1 : S + 1],  # [S, d]
        "w_k": eye,
        "w_q": eye,
        "w_beta": jnp.zeros(d),
        "b_beta": jnp.array(30.0),
    }


def test_delta_rule_overwrites_where_the_sum_rule_averages():
    S = 6
    batch = capacity_batch(3, 16, S, "overwrite")
    values = jax.nn.one_hot(batch["values"], S)  # [B, L, V]
    params = _one_hot_key_params(S)
    y = jax.jit(capacity.readout_fn("delta-dpfp1"))(params, batch["keys"], values, batch["query"])
    # the same memory written with sum-normalised one-hot keys and beta = sigmoid(30), one step at
    # a time by the cell's own update
    unit = jnp.eye(S + 1) / (1 + 1e-6)  # the normaliser's epsilon
    k = unit[batch["keys"] + 1]  # [B, L, K]
    beta = jnp.full(k.shape[:2] + (1,), jax.nn.sigmoid(30.0))  # [B, L, H=1]
    state = jnp.zeros((16, 1, S + 1, S))
    for t in range(k.shape[1]):
        state = cells.get("delta_rule").delta_update(
            state, k[:, t, None], values[:, t, None], beta[:, t]
        )
    q = unit[batch["query"] + 1]  # [B, K]
    np.testing.assert_allclose(y, jnp.einsum("bkv,bk->bv", state[:, 0], q), atol=1e-6)
    # each write replaced the key's old value: the read is the last value (up to beta and epsilon)
    np.testing.assert_allclose(y, jax.nn.one_hot(batch["target"], S), atol=1e-5)
    # the sum rule returns the mean of all values the key was given: with 12 draws over 6 keys
    # most keys repeat with a different value
    summed = capacity.batch_loss(capacity.readout_fn("sum-dpfp1"), params, batch, S)
    assert float(summed) > 0.05


@pytest.mark.slow
def test_quick_sweep_writes_records_and_resumes(tmp_path, monkeypatch):
    workdir = tmp_path / "runs"
    quick = ["capacity", "--quick", "--workdir", str(workdir), "--no-progress"]
    assert experiments.main(quick) == 0
    out = workdir / "capacity"
    records = json.loads((out / "capacity.json").read_text())
    sweep = capacity.load_sweep(capacity.CONFIGS / "capacity" / "quick.yaml")
    assert len(records) == len(capacity.grid(sweep)) * len(sweep.seeds)
    for rec in records:
        assert tuple(rec) == (*capacity.KEYS, *(k for k in RUN_FIELDS if k not in capacity.KEYS))
        assert rec["metric"] == "loss" and rec["setting"] in ("unique", "overwrite")
        assert rec["feature_map"] in ("elu1", "dpfp1", "dpfp2", "dpfp3", "favor", "softmax")
        assert rec["cell"] in (None, *cells.CELLS)
        assert np.isfinite(rec["value"]) and rec["x"] == 3 and rec["seed"] == 0
        assert rec["stop_reason"] in ("max_steps", "plateau", "stop_loss")
    by_map = {rec["feature_map"]: rec for rec in records}
    assert by_map["favor"]["phi_dim"] == 2 * sweep.favor_features
    assert by_map["dpfp2"]["phi_dim"] == 4 * sweep.d_key
    assert by_map["softmax"]["phi_dim"] is None and by_map["softmax"]["model"] == "attention"
    assert (out / "capacity.png").stat().st_size > 0
    assert "| delta-dpfp2 |" in (out / "capacity.md").read_text()

    # a rerun computes only the points without a record file
    missing = records[-1]["point"]
    (out / "points" / f"{missing}.json").unlink()
    recomputed = []
    real_train_run = capacity.train_run

    def counting_train_run(sweep, setting, model, num_pairs, seed):
        recomputed.append((setting, model, num_pairs, seed))
        return real_train_run(sweep, setting, model, num_pairs, seed)

    monkeypatch.setattr(capacity, "train_run", counting_train_run)
    experiments.main([*quick, "--report-only"])
    assert recomputed == []  # the report of the recorded points alone
    assert json.loads((out / "capacity.json").read_text()) == records[:-1]
    experiments.main(quick)
    assert recomputed == [(*capacity.grid(sweep)[-1], 0)]
    again = json.loads((out / "capacity.json").read_text())
    # the same loss from the same seed; only the timing differs
    assert again[-1]["value"] == records[-1]["value"]
    assert [r["point"] for r in again] == [r["point"] for r in records]


def test_bad_sweep_files_name_the_problem(tmp_path):
    good = (capacity.CONFIGS / "capacity" / "quick.yaml").read_text()
    path = tmp_path / "sweep.yaml"
    path.write_text(good.replace("delta-dpfp2", "delta-dpfp9"))
    with pytest.raises(ConfigError, match="unknown models.*delta-dpfp9.*valid: softmax, sum-elu1"):
        capacity.load_sweep(path)
    path.write_text(good + "learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match="unknown key learning_rat"):
        capacity.load_sweep(path)
    path.write_text(good.replace("batch_size: 4", "batch_size: four"))
    with pytest.raises(ConfigError, match="batch_size: expected an integer"):
        capacity.load_sweep(path)
    with pytest.raises(ConfigError, match="cannot read sweep"):
        capacity.load_sweep(tmp_path / "missing.yaml")


def test_largest_s_solved_is_the_largest_that_passes():
    """Not the last S before the first failure: a larger S that passes counts, and the smaller
    ones that failed are named; a larger S still pending leaves it open."""
    ok, bad = [0.001, 0.002, 0.003], [0.02, 0.03, 0.05]
    assert capacity.capacity_of({8: ok, 16: bad, 32: ok}, [8, 16, 32], 1e-3) == "32 (16 failed)"
    assert capacity.capacity_of({8: ok, 16: bad}, [8, 16, 32], 1e-3) == ">= 8"
    assert capacity.capacity_of({8: bad, 16: bad}, [8, 16], 1e-3) == "-"
    assert capacity.capacity_of({}, [8], 1e-3) is None


def test_the_papers_losses_sit_beside_ours_s_by_s():
    """Both grids' S in one table: the paper's loss where its logs have that S, the median over
    our seeds where we ran it, "-" where one of them has no run."""
    sweep = capacity.load_sweep(capacity.CONFIGS / "capacity" / "dkey64.yaml")
    losses = {("unique", "sum-dpfp1", 160): [0.1, 0.2, 0.3]}
    lines = capacity.paper_table(losses, sweep).splitlines()
    assert "| 100 | 0.78 | solved | - |" in lines
    assert "| 160 | 1.25 | 0.100 | 0.2 (0.1-0.3) |" in lines
    assert "| 64 | 0.50 | - | - |" in lines
