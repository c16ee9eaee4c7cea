"""fwpzoo import / export against transformers' own implementation of each architecture.

Tiny random models are built with transformers (pure-PyTorch gated DeltaNet: no
flash-linear-attention), saved with save_pretrained and converted; the fwpzoo model must give
transformers' logits, greedy tokens and log-probabilities, and export must give back every
tensor bit for bit. The models are made once per session and shared.
"""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from fwpzoo.interop.architectures import ARCHITECTURES  # noqa: E402
from fwpzoo.interop.convert import (  # noqa: E402
    expected_shapes,
    from_params,
    load_model,
    model_targets,
    read_checkpoint,
)
from fwpzoo.interop.safetensors import read_folder, write_file  # noqa: E402
from fwpzoo.models import generate  # noqa: E402

FIXTURE_TEXT = Path(__file__).parent / "fixtures" / "carroll-alice.txt"
VOCAB = 260  # the models'; the tokenizer has fewer (releases pad theirs)
COMMON = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 40, "rms_norm_eps": 1e-6}
# several head layouts; value heads = 2 x key heads throughout; tied and untied embeddings
LAYOUTS = {
    "qwen_untied": (
        "Qwen3_5",
        {"num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
         "linear_key_head_dim": 8, "linear_value_head_dim": 8, "tie_word_embeddings": False,
         "rope_parameters": {"rope_type": "default", "rope_theta": 1000.0,
                             "partial_rotary_factor": 0.25}},
    ),
    "qwen_tied": (
        "Qwen3_5",
        {"num_hidden_layers": 2, "layer_types": ["linear_attention", "full_attention"],
         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
         "linear_num_key_heads": 1, "linear_num_value_heads": 2, "linear_key_head_dim": 16,
         "linear_value_head_dim": 8, "tie_word_embeddings": True,
         "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                             "partial_rotary_factor": 0.5}},
    ),
    "olmo_tied": (
        "OlmoHybrid",
        {"num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
         "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8,
         "linear_value_head_dim": 8, "tie_word_embeddings": True, "pad_token_id": 0,
         "eos_token_id": 1, "linear_allow_neg_eigval": True},
    ),
    "olmo_untied": (
        "OlmoHybrid",
        {"num_hidden_layers": 2, "layer_types": ["linear_attention", "full_attention"],
         "num_attention_heads": 2, "num_key_value_heads": 2, "linear_num_key_heads": 1,
         "linear_num_value_heads": 2, "linear_key_head_dim": 16, "linear_value_head_dim": 8,
         "tie_word_embeddings": False, "pad_token_id": 0, "eos_token_id": 1,
         "linear_allow_neg_eigval": False},
    ),
    "qwen3_next": (
        "Qwen3Next",
        {"num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 8, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
         "linear_key_head_dim": 8, "linear_value_head_dim": 8, "num_experts": 6,
         "num_experts_per_tok": 2, "moe_intermediate_size": 16,
         "shared_expert_intermediate_size": 24, "mlp_only_layers": [1],
         "tie_word_embeddings": False},
    ),
}  # fmt: skip


def make_tokenizer():
    """A byte-level BPE of fewer than VOCAB tokens, learned from the fixture text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 10, initial_alphabet=alphabet)
    tokenizer.train_from_iterator([FIXTURE_TEXT.read_text()], trainer)
    return tokenizer


def build(kind: str, fields: dict):
    """A random transformers model whose every norm weight is moved off its start, so a norm
    mapped to the wrong place, or read with the wrong centring, changes the logits."""
    config = getattr(transformers, f"{kind}TextConfig" if kind == "Qwen3_5" else f"{kind}Config")
    model = getattr(transformers, f"{kind}ForCausalLM")(config(**COMMON, **fields)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "A_log" not in name:
                p.add_(0.3 * torch.randn_like(p))
            if name.endswith("mlp.gate.weight"):  # a router that prefers some experts
                p.normal_(0, 0.5)
    return model


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    """{layout: (folder, transformers model)}: each model saved with its tokenizer."""
    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    out = {}
    for name, (kind, fields) in LAYOUTS.items():
        folder = tmp_path_factory.mktemp(name)
        model = build(kind, fields)
        model.save_pretrained(folder)
        tokenizer.save(str(folder / "tokenizer.json"))
        out[name] = (folder, model)
    return out


@pytest.fixture(scope="session")
def converted(folders):
    """{layout: fwpzoo model} converted from each folder."""
    return {name: load_model(folder)[0] for name, (folder, _) in folders.items()}


def prompt_ids(length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (1, length))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_logits_match_transformers_at_every_position(folders, converted, layout):
    ids = prompt_ids(64)
    graphdef, state = nnx.split(converted[layout])
    forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))  # one compile
    ours = np.asarray(forward(state, jnp.asarray(ids, jnp.int32)))[0]  # [T, vocab]
    with torch.no_grad():
        ref = folders[layout][1](torch.tensor(ids)).logits.numpy()[0]
    scale = np.abs(ref).max(axis=-1)  # [T]
    assert (np.abs(ours - ref).max(axis=-1) <= 1e-4 * scale).all()


@pytest.mark.parametrize("layout", ["qwen_untied", "olmo_tied"])
def test_greedy_decode_and_logprobs_match_through_the_step_path(folders, converted, layout):
    """Prefill of 16 tokens then 32 decode steps (each layer's recurrent `step` from the state
    the prefill left) give transformers' greedy tokens and their log-probabilities: one
    transformers forward over prompt + tokens has each token as the argmax after its prefix,
    which is what its greedy decode would pick, step by step."""
    ids = prompt_ids(16, seed=1)
    tokens, logits = generate(
        converted[layout], jnp.asarray(ids, jnp.int32), 32, rng=jax.random.key(0), temperature=0
    )
    tokens = np.asarray(tokens)[0]
    with torch.no_grad():
        whole = torch.tensor(np.concatenate([ids[0], tokens])[None])
        ref = folders[layout][1](whole).logits[0, 15:-1]  # [32, vocab]: before each new token
    assert ref.argmax(-1).tolist() == tokens.tolist()
    ours = jax.nn.log_softmax(logits[0], axis=-1)[np.arange(32), tokens]
    theirs = torch.log_softmax(ref, -1)[np.arange(32), tokens]
    np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=1e-4)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_import_then_export_gives_back_every_tensor(folders, layout):
    folder = folders[layout][0]
    arch, hf, _, params, manifest = read_checkpoint(folder, model_targets)
    rules = arch.rules(hf, "model.")
    found = {name: tuple(shape) for name, shape in manifest["shapes"].items()}
    shapes = expected_shapes(rules, {path: x.shape for path, x in params.items()}, found)
    back = from_params(rules, params, shapes, manifest["dtypes"])
    source = read_folder(folder)
    assert set(back) == set(source)
    for name, tensor in source.items():
        assert back[name].dtype == tensor.dtype and np.array_equal(back[name], tensor), name


def test_the_mapping_covers_the_three_architectures():
    assert {"qwen3_5_text", "olmo_hybrid", "qwen3_next"} <= set(ARCHITECTURES)


# refusals: one line, exit 2, nothing written ------------------------------------------------


def broken_copy(folder: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "src"
    shutil.copytree(folder, copy)
    return copy


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def test_refusals_name_the_file_or_tensor_and_write_nothing(folders, tmp_path, refused):
    source = folders["qwen_tied"][0]
    workdir = tmp_path / "w"

    def check(src, culprit):
        refused(["import", str(src), "--workdir", str(workdir)], culprit)
        assert not workdir.exists()

    src = broken_copy(source, tmp_path)
    (src / "config.json").unlink()
    check(src, "config.json")
    for changes, culprit in (
        ({"model_type": "llama"}, "'llama'"),
        ({"sliding_window": 4}, "sliding_window"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"vocab_size": 200}, "tokenizer.json has"),
    ):
        shutil.rmtree(src)
        src = broken_copy(source, tmp_path)
        edit_config(src, **changes)
        check(src, culprit)
    tensors = read_folder(src)
    shutil.rmtree(src)
    src = broken_copy(source, tmp_path)
    name = "model.layers.0.linear_attn.A_log"
    write_file(src / "model.safetensors", {k: v for k, v in tensors.items() if k != name})
    check(src, name)
    write_file(src / "model.safetensors", tensors | {name: np.zeros(3, np.float32)})
    check(src, name)
    data = (source / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) - 100])
    check(src, "truncated")
    workdir.mkdir()
    (workdir / "notes.txt").write_text("mine")
    refused(["import", str(source), "--workdir", str(workdir)], "not an empty folder")
    assert sorted(p.name for p in workdir.iterdir()) == ["notes.txt"]
    refused(["export", "--workdir", str(workdir), "--out", str(tmp_path / "o")], "interop.json")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_import_sample_export_through_the_command_line(folders, tmp_path, capsys):
    """The verbs end to end (in this process: the CLI's own entry point): import, then sample
    --prompt --temperature 0 --logprobs gives transformers' greedy continuation, then export
    writes a folder transformers loads and whose tensors are the source's."""
    from fwpzoo import cli

    folder, hf = folders["olmo_untied"]
    workdir, out = tmp_path / "w", tmp_path / "out"

    def fwpzoo(*args):
        assert cli.main([str(a) for a in args]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    fwpzoo("import", folder, "--workdir", workdir)
    sampled = fwpzoo(
        "sample", "--workdir", workdir, "--prompt", "Alice was beginning", "--num-tokens", 32,
        "--temperature", 0, "--logprobs",
    )  # fmt: skip
    ids = (
        tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        .encode("Alice was beginning")
        .ids
    )
    assert sampled["prompt"] == ids
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
            output_logits=True, return_dict_in_generate=True, pad_token_id=0,
        )  # fmt: skip
    assert sampled["tokens"] == ref.sequences[0, len(ids) :].tolist()
    theirs = torch.log_softmax(torch.stack(ref.logits)[:, 0], -1)[np.arange(32), sampled["tokens"]]
    np.testing.assert_allclose(sampled["logprobs"], theirs.numpy(), atol=1e-4)
    assert isinstance(sampled["text"], str) and sampled["text"]
    fwpzoo("export", "--workdir", workdir, "--out", out)
    source, back = read_folder(folder), read_folder(out)
    assert set(back) == set(source)
    assert all(np.array_equal(back[name], source[name]) for name in source)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        x = torch.tensor(prompt_ids(8))
        assert torch.equal(reloaded(x).logits, hf(x).logits)
