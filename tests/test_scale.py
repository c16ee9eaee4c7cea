"""The mesh: its config, the logical-axis rules, remat, and (in one process over 8 CPU devices,
tests/scale_worker.py) equal losses under every mesh, context parallelism per cell, the
collectives of a context-parallel step, cross-mesh resume and `fwpzoo plan`."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec

from fwpzoo import cli
from fwpzoo.bench.scale import recorded_plan
from fwpzoo.config import MESH_AXES, Config, ConfigError, MeshConfig, from_dict, load
from fwpzoo.interop.architectures import ARCHITECTURES
from fwpzoo.models import ModelConfig, build_model
from fwpzoo.train.plan import cpu_count_of
from fwpzoo.train.sharding import (
    check_context_length,
    check_layout,
    logical_axes,
    logical_entry,
    module_of,
    partition_spec,
    path_names,
    sibling_names,
)
from fwpzoo.train.state import new_model, split_model
from fwpzoo.train.steps import make_train_step

REPO = Path(__file__).resolve().parent.parent


def test_mesh_resolves_its_free_axis_and_refuses_a_product_that_misses_the_devices():
    assert MeshConfig().shape(8) == {"data": 8, "fsdp": 1, "tensor": 1, "context": 1}
    assert MeshConfig(data=2, fsdp=-1, context=2).shape(8)["fsdp"] == 2
    with pytest.raises(ConfigError, match=r"data=2 x fsdp=4 .* does not match the run's 2 dev"):
        MeshConfig(data=2, fsdp=4).shape(2)
    with pytest.raises(ConfigError, match="a multiple of 3"):
        MeshConfig(data=-1, tensor=3).shape(8)
    with pytest.raises(ConfigError, match="only one mesh axis may be -1"):
        from_dict(Config, {"mesh": {"data": -1, "fsdp": -1}})
    with pytest.raises(ConfigError, match="mesh.context must be >= 1 or -1"):
        from_dict(Config, {"mesh": {"context": 0}})


def mesh(**sizes) -> AbstractMesh:
    return AbstractMesh(tuple(sizes.get(name, 1) for name in MESH_AXES), MESH_AXES)


@pytest.mark.parametrize("mixer", ["fwp", "mamba2"])
def test_context_leaves_each_device_the_short_convs_halo(mixer):
    """The conv halo comes whole from the previous device: T / context >= conv_size - 1."""
    model = from_dict(Config, {"model": {"mixers": [mixer], "conv_size": 4}}).model
    check_context_length(model, 12, 4)
    with pytest.raises(ConfigError, match=r"leaves 2 tokens per device, fewer than the 3-token"):
        check_context_length(model, 8, 4)


def layout_of(model: dict, **sizes) -> None:
    """check_layout of a run of `model` at 32 tokens under a mesh of `sizes`."""
    cfg = from_dict(Config, {"model": model, "data": {"seq_len": 32}, "eval": {"lengths": []}})
    check_layout(cfg, mesh(**sizes))


def test_tensor_must_divide_the_heads_each_layer_reads():
    layout_of({"mixers": ["fwp", "ssm"], "num_heads": 4}, tensor=4)  # the SSM has no heads
    refusal = r"^mesh.tensor=4 does not divide model.mixers\[1\] \(attention\) num_kv_heads=2; "
    with pytest.raises(ConfigError, match=refusal + "use a tensor size that divides 2$"):
        layout_of(
            {"mixers": ["fwp", {"mixer": "attention", "num_kv_heads": 2}], "num_heads": 4}, tensor=4
        )
    with pytest.raises(ConfigError, match=r"^mesh.tensor=3 does not divide model.mixers\[0\] "):
        layout_of({"mixers": ["fwp"], "num_heads": 4}, tensor=3)


SEQUENTIAL = "is sequential by nature (each token reads the state through a nonlinearity)"


@pytest.mark.parametrize(
    "entry, refusal",
    [
        ({"mixer": "rdn"}, f"(rdn) {SEQUENTIAL}"),
        ({"mixer": "srwm"}, f"(srwm) {SEQUENTIAL}"),
        # a nonlinear rule has no chunkwise form: the model-wide chunkwise runs recurrent
        ({"mixer": "plastic", "plasticity": "oja"}, f"(plastic) {SEQUENTIAL}"),
        ({"mixer": "fwp", "cell": "ttt_linear"}, "cell ttt_linear is not affine in its state"),
    ],
)
def test_context_refuses_a_layer_whose_sequence_cannot_split(entry, refusal):
    model = {"mixers": ["fwp", entry]}
    layout_of(model, context=1)
    with pytest.raises(ConfigError, match=r"^model.mixers\[1\] ") as refused:
        layout_of(model, context=2)
    assert refusal in str(refused.value) and str(refused.value).endswith("use mesh.context=1")


def test_context_splits_an_affine_plastic_layer():
    affine = {"mixer": "plastic", "plastic_activation": "identity"}  # input site, hebb
    layout_of({"mixers": [affine, "attention", "mamba2", "ssm"], "chunk_size": 4}, context=2)


def test_context_splits_the_sequence_into_whole_chunks():
    model = from_dict(Config, {"model": {"mixers": ["attention", "fwp"], "chunk_size": 8}}).model
    check_context_length(model, 32, 4)  # 8 tokens per device: one chunk
    check_context_length(model, 24, 4)  # 6: less than one chunk, one shorter chunk
    refusal = r"^mesh.context=2 splits 24 tokens into pieces of 12, not whole chunks of "
    refusal += r"model.mixers\[1\] chunk_size=8; make 24 / context a multiple of 8$"
    with pytest.raises(ConfigError, match=refusal):
        check_context_length(model, 24, 2)
    with pytest.raises(ConfigError, match=r"^mesh.context=5 does not divide the sequence length"):
        check_context_length(model, 24, 5)


def test_rules_put_heads_and_mlp_on_tensor_and_the_largest_free_axis_on_fsdp():
    qkv = logical_axes(("blocks", "mixer", "qkv_proj", "kernel"), 2)
    assert qkv == ("embed", "heads")
    assert partition_spec(qkv, (64, 192), mesh(fsdp=4, tensor=2)) == PartitionSpec("fsdp", "tensor")
    down = logical_axes(("blocks", "mlp", "down", "kernel"), 2)
    assert partition_spec(down, (256, 64), mesh(fsdp=4, tensor=2)) == PartitionSpec(
        "tensor", "fsdp"
    )
    embedding = logical_axes(("embed", "embedding"), 2)  # vocab 17 does not split: embed does
    assert partition_spec(embedding, (17, 64), mesh(fsdp=4)) == PartitionSpec(None, "fsdp")
    # an axis that does not divide by its mesh axis stays whole
    assert partition_spec(("heads",), (3,), mesh(tensor=2)) == PartitionSpec(None)
    assert logical_axes(("something", "new"), 3) == (None, None, None)
    # D: the SSM's skip scale per channel of the model's width, mamba2's per head
    ssm = frozenset({"B", "C", "D", "nu_log", "gamma_log"})
    assert logical_axes(("blocks", "mixer", "D"), 1, ssm) == ("embed",)
    assert logical_axes(("blocks", "mixer", "D"), 1, frozenset({"D", "norm"})) == ("heads",)


# The smallest config of each released architecture fwpzoo imports (tests/test_interop.py builds
# the same layouts with transformers; their model sections are all this needs).
RELEASES = {
    "qwen3_5_text": {
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
        "linear_key_head_dim": 8, "linear_value_head_dim": 8, "tie_word_embeddings": False,
    },
    "olmo_hybrid": {
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8,
        "linear_value_head_dim": 8, "tie_word_embeddings": True, "linear_allow_neg_eigval": True,
    },
    "qwen3_next": {
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 8, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
        "linear_key_head_dim": 8, "linear_value_head_dim": 8, "num_experts": 6,
        "num_experts_per_tok": 2, "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 24, "mlp_only_layers": [1],
        "tie_word_embeddings": False,
    },
}  # fmt: skip
RELEASE_COMMON = {"vocab_size": 260, "hidden_size": 32, "intermediate_size": 40}


def shipped_models() -> dict:
    """{where it comes from: ModelConfig} for every model section of configs/ (sweep files of
    another kind, without one, left out) and of every released architecture, each with one
    layer per distinct entry of its mixers (the parameters are named alike in every layer)."""
    models = {}
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        if "model" in yaml.safe_load(path.read_text()):
            models[str(path.relative_to(REPO))] = load(path).model
    assert set(RELEASES) == set(ARCHITECTURES)
    for model_type, hf in RELEASES.items():
        section = ARCHITECTURES[model_type].model_section({**RELEASE_COMMON, **hf})
        models[model_type] = from_dict(ModelConfig, section, "model.")
    distinct = {}
    for source, cfg in models.items():
        mixers = tuple({repr(entry): entry for entry in cfg.mixers}.values())
        cfg = dataclasses.replace(cfg, mixers=mixers)
        distinct.setdefault(repr(cfg), (source, cfg))
    return dict(distinct.values())


def test_every_parameter_of_every_shipped_config_and_release_has_logical_axes():
    """Each parameter of each shipped config and imported architecture is named by a
    LOGICAL_AXES entry that names each of its axes (an entry may name more, for a gate's [H] or
    [H, K]); a parameter no entry names would be placed by FSDP alone, never by tensor
    parallelism. An axis named embed is the model's width."""
    seen = set()
    for source, cfg in shipped_models().items():
        model = nnx.eval_shape(lambda cfg=cfg: build_model(cfg, vocab_size=7, rngs=nnx.Rngs(0)))
        params = nnx.state(model, nnx.Param)
        siblings = sibling_names(params)
        for path, x in jax.tree_util.tree_leaves_with_path(params):
            names = path_names(path)
            beside = siblings[module_of(path)]
            if (names, beside, x.shape) in seen:
                continue
            seen.add((names, beside, x.shape))
            axes = logical_entry(names, beside)
            where = f"{'/'.join(names)} {x.shape} of {source}"
            assert axes is not None and len(axes) >= x.ndim, f"{where}: axes {axes}"
            for name, size in zip(axes, x.shape, strict=False):
                assert name != "embed" or size == cfg.d_model, f"{where}: axes {axes}"


def test_remat_computes_the_same_step():
    """model.remat block and mixer change what the backward keeps, not the loss or gradients."""
    batch = {
        "inputs": jnp.arange(64).reshape(2, 32) % 17,
        "targets": jnp.arange(1, 65).reshape(2, 32) % 17,
        "weights": jnp.ones((2, 32)),
    }
    results = {}
    for remat in ("none", "block", "mixer"):
        model = {"mixers": ["fwp", "attention"], "d_model": 16, "remat": remat, "chunk_size": 8}
        cfg = from_dict(Config, {"model": model, "data": {"seq_len": 32}})
        graphdef, state = split_model(new_model(cfg, 17))

        def loss(params, graphdef=graphdef, state=state):
            step = make_train_step(graphdef, _sgd(), grad_accum=1)
            _, metrics = step({**state, "params": params, "opt_state": ()}, batch)
            return metrics["loss"], metrics["grad_norm"]

        results[remat] = jax.jit(loss)(state["params"])
    for remat in ("block", "mixer"):
        np.testing.assert_allclose(results[remat], results["none"], rtol=1e-6)


def _sgd():
    import optax

    return optax.GradientTransformation(lambda params: (), lambda g, s, p=None: (g, s))


def test_plan_names_a_malformed_cpu_topology():
    assert cpu_count_of("v5e:2x2") is None
    assert cpu_count_of("cpu:8") == 8
    with pytest.raises(ConfigError, match="expected cpu:N with N >= 1"):
        cpu_count_of("cpu:0")


def test_bench_cells_topology_refuses_a_host_topology(refused):
    refused(["bench", "cells", "--topology", "cpu:2", "--families", "delta_rule"], "cpu:2")


@pytest.mark.slow
def test_bench_cells_compiles_each_direction_for_a_tpu_topology(capsys, tmp_path):
    shape = ["--lengths", "16", "--chunk-sizes", "16", "--batch", "4", "--heads", "1"]
    shape += ["--key-dim", "4", "--value-dim", "4"]
    out = tmp_path / "topology.md"
    argv = ["bench", "cells", "--topology", "v5e:2x2", "--families", "delta_rule", *shape]
    assert cli.main([*argv, "--out", str(out)]) == 0
    (row,) = json.loads(out.with_suffix(".json").read_text())
    assert (row["family"], row["T"], row["chunk"]) == ("delta_rule", 16, 16)
    for direction in ("fwd", "fwd+bwd"):
        assert 0 < row[f"{direction} bytes"] < row["device_memory"]
    assert row["fwd+bwd bytes"] > row["fwd bytes"]  # the backward keeps the forward's inputs


@pytest.mark.slow
def test_meshes_context_parallelism_resume_and_plan(tmp_path):
    """One process over 8 CPU devices (tests/scale_worker.py; `--full` runs every mesh and cell
    the comments name, and a v5e:2x2 plan, at several times the compile time):
    - 10 train steps of a DeltaNet / per-key gated delta rule / attention hybrid, with resets at
      and beside the shard edges, give the same losses under data=8 and data=2 x tensor=2 x
      context=2 (--full: also data=2 x fsdp=4 and fsdp=2 x context=4), and its first step with
      resets beside the edges only (the state crossing every edge) the same loss and gradients;
    - an FWP layer of the delta rule and of the mLSTM, a mamba2 layer with its decay in
      (-1, 1) and a complex SSM layer (--full: every affine cell, mamba2's other range, the
      real SSM) with its sequence over context=4 gives the unsplit layer's outputs, final
      state and gradients (one row with resets at t = 0, on and beside the shard edges, one
      with resets beside them only, so that the state crosses every edge);
    - no all-gather of a context-parallel step of a model without attention (DeltaNet, mamba2
      and SSM layers) grows with T;
    - a run saved under data=2 x fsdp=4 resumes under data=8 as the uninterrupted run goes;
    - `fwpzoo plan` fits on cpu:8."""
    worker = Path(__file__).with_name("scale_worker.py")
    done = subprocess.run(
        [sys.executable, str(worker), str(tmp_path)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    reference = out["losses"]["data=8"]
    for name, losses in out["losses"].items():
        np.testing.assert_allclose(losses, reference, rtol=1e-5, err_msg=name)
    # the first step with the state crossing every edge (the 10 steps keep a reset on each:
    # there the gradient is too ill-conditioned for 10 steps to agree, see scale_worker.losses).
    # data=8's own gradient moves by 8e-6 when its parameters are rounded differently, so the
    # chunkwise forms' 1e-4 (test_cells); context=2 measured 1.2e-5, while cutting the gradient
    # through the fold's entering states or the conv halo (stop_gradient) differs by 0.35 and
    # 0.40, the loss unchanged
    first_loss = out["first_step"]["data=8"][0]
    for name, (loss, gradients) in out["first_step"].items():
        np.testing.assert_allclose(loss, first_loss, rtol=1e-6, err_msg=name)
        assert gradients < 1e-4, name
    np.testing.assert_allclose(out["resumed"], out["uninterrupted"], rtol=1e-5)
    for cell, difference in out["cells"].items():  # the chunkwise forms' tolerance (test_cells)
        assert difference < 1e-4, cell
    short, long = (out["all_gathers"][str(n)] for n in sorted(map(int, out["all_gathers"])))
    assert short and short == long  # summaries and weights: the same at T and 2T
    assert max(long) < min(out["activations"].values())  # smaller than a layer's [B, T, D]
    for topology, result in out["plan"].items():
        assert result["fits"] and result["topology"] == topology
        assert 0 < result["bytes_per_device"] < result["device_memory_bytes"]
        assert result["flops"] > 0


def test_a_plan_is_recorded_and_read_back_while_its_config_values_are_unchanged(tmp_path):
    config, plans = tmp_path / "long.yaml", tmp_path / "plans"
    config.write_text("model: {d_model: 64}\n")
    planned = []

    def plan(*row):  # stands for `fwpzoo plan`, counting the compiles
        planned.append(row)
        return {"fits": True, "compiles": len(planned)}

    row = (str(config), "v5e:4x4", ("mesh.context=2",))
    assert recorded_plan(row, plans, plan=plan) == {"fits": True, "compiles": 1}
    assert recorded_plan(row, plans, plan=plan)["compiles"] == 1  # read back, not compiled
    (path,) = plans.iterdir()
    assert path.name == "long__v5e-4x4__mesh.context=2.json"
    record = json.loads(path.read_text())
    assert record["command"] == f"fwpzoo plan {config} --topology v5e:4x4 mesh.context=2"
    assert recorded_plan(row, plans, replan=True, plan=plan)["compiles"] == 2
    config.write_text("# the same values\nmodel: {d_model: 64}\n")
    assert recorded_plan(row, plans, plan=plan)["compiles"] == 2
    config.write_text("model: {d_model: 128}\n")  # another config: its old plan is stale
    assert recorded_plan(row, plans, plan=plan)["compiles"] == 3
    assert [p.name for p in plans.iterdir()] == [path.name]
