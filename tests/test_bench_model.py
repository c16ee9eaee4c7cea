"""`fwpzoo bench model` at toy sizes: the report's structure, the files it writes, bad input."""

import json

import pytest

from fwpzoo import cli
from fwpzoo.bench import model as bench
from fwpzoo.reports import NOTES_MARKER

TINY = [
    "--lengths", "8,16", "--tokens-per-step", "32", "--d-model", "16", "--num-heads", "2",
    "--num-layers", "1", "--chunk-size", "4", "--repeats", "1", "--decode-tokens", "2",
    "--vocab-size", "16",
]  # fmt: skip


@pytest.mark.slow
def test_report_tables_files_and_kept_notes(tmp_path, capsys):
    page = tmp_path / "model.md"
    page.write_text(f"old report\n{NOTES_MARKER}\nhand-written notes\n")

    assert cli.main(["bench", "model", *TINY, "--out", str(tmp_path)]) == 0

    report = capsys.readouterr().out
    for heading in ("### Training", "### Decoding", "### One layer's mixer kernel"):
        assert heading in report
    for T, batch in ((8, 4), (16, 2)):
        assert f"\n| {T} | {batch} |" in report  # a training row
    assert "At T=16 DeltaNet trains at" in report

    written = page.read_text()
    assert "old report" not in written
    assert report.strip() in written
    assert written.endswith(f"{NOTES_MARKER}\nhand-written notes\n")
    assert (tmp_path / "model.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    result = json.loads((tmp_path / "model.json").read_text())
    assert result["options"]["lengths"] == [8, 16]
    for section, key, models in (
        ("training", "tokens_per_s", bench.MODELS),
        ("decoding", "ms_per_token", bench.DECODERS),
    ):
        rows = result[section]
        assert sorted((row["model"], row["T"]) for row in rows) == [
            (name, T) for name in sorted(models) for T in (8, 16)
        ]
        assert all(row[key] > 0 for row in rows)
    assert all(row["batch"] * row["T"] == 32 for row in result["training"])
    # in-process the devices are what JAX started with; each step uses those its batch splits
    assert all(row["batch"] % row["devices"] == 0 for row in result["training"])
    assert "transformer, blockwise" in report and "transformer, dot_product" in report
    assert all(row["memory_bytes"] > 0 for row in result["training"])
    cache_bytes = {(row["model"], row["T"]): row["cache_bytes"] for row in result["decoding"]}
    assert cache_bytes["deltanet", 8] == cache_bytes["deltanet", 16]  # the fast weights only
    # attention keeps keys and values of T + 2 decoded positions: 16 floats each, per position
    assert cache_bytes["transformer", 16] - cache_bytes["transformer", 8] == 2 * 8 * 16 * 4
    assert set(result["kernels"]["seconds"]) == set(bench.KERNELS)
    assert "### Recurrent DeltaNet and SRWM against DeltaNet" in report
    for section, key in (("training", "tokens_per_s"), ("decoding", "ms_per_token")):
        rows = result["programmers"][section]
        assert sorted((row["model"], row["T"]) for row in rows) == [
            (name, T) for name in sorted(("deltanet", *bench.PROGRAMMERS)) for T in (8, 16)
        ]
        assert all(row[key] > 0 for row in rows)
    cache_bytes = {
        (r["model"], r["T"]): r["cache_bytes"] for r in result["programmers"]["decoding"]
    }
    assert cache_bytes["rdn", 8] == cache_bytes["rdn", 16]  # constant-size state


def test_models_differ_only_in_the_mixer():
    options = bench.Options()
    deltanet, *transformers = (bench.model_config(name, options) for name in bench.MODELS)
    assert deltanet.mixers == ("fwp",) * options.num_layers
    for transformer in transformers:
        assert transformer.mixers == ("attention",) * options.num_layers
        for key in ("d_model", "num_heads", "mlp_ratio", "key_dim", "value_dim"):
            assert getattr(deltanet, key) == getattr(transformer, key)
    assert [t.attention_kernel for t in transformers] == ["dense", "dot_product", "blockwise"]
    assert (deltanet.cell, deltanet.form) == ("delta_rule", "chunkwise")


@pytest.mark.parametrize(
    "args, culprit",
    [
        (["--lengths", "0"], "--lengths"),
        (["--lengths", "8,x"], "--lengths"),
        (["--lengths", "3", "--tokens-per-step", "8"], "multiple"),
        (["--repeats", "-1"], "--repeats"),
        (["--d-model", "10", "--num-heads", "4"], "d_model"),
        (["--bogus"], "--bogus"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args, culprit, refused):
    refused(["bench", "model", *args], culprit)
