"""What fwpzoo guarantees when things go wrong (README, "What fwpzoo guarantees").

One class of failure per section: malformed configs, workdir faults, concurrent runs, corrupted
checkpoints, signals, divergence, multi-process start-up, data, sampling and memory. Most tests
run in-process on a tiny model; a subprocess is used only where a fresh interpreter, a signal or
a second process is the point.
"""

import dataclasses
import subprocess
import sys
import typing

import pytest

from fwpzoo.config import Config, ConfigError, from_dict, load
from fwpzoo.config_file import MAX_VALUES, apply_overrides

# ---------------------------------------------------------------------------------------------
# Configs: every float finite and in range; the loader refuses what a careful engineer would.


def float_keys(cls=Config, prefix="") -> list[str]:
    """Every float field of the config schema, dotted; new fields are covered as they come."""
    keys = []
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += float_keys(tp, f"{prefix}{name}.")
        elif float in (tp, *typing.get_args(tp)):
            keys.append(f"{prefix}{name}")
    return keys


def nested(key: str, value) -> dict:
    section, name = key.split(".")
    return {section: {name: value}}


@pytest.mark.parametrize("key", float_keys())
def test_every_float_setting_must_be_finite(key):
    for value in ("nan", "inf", "-inf", "1e999"):
        with pytest.raises(ConfigError, match=rf"^{key} must be a finite number, got {value}$"):
            apply_overrides({}, [f"{key}={value}"])  # the file reader's check, before JAX
    for value in (float("nan"), float("inf")):
        with pytest.raises(ConfigError, match=rf"^{key} must be a finite number, got"):
            from_dict(Config, nested(key, value))  # the schema's own check (config.json)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.learning_rate=0", "train.learning_rate must be > 0, got 0.0"),
        ("train.weight_decay=-0.1", "train.weight_decay must be >= 0, got -0.1"),
        ("train.b1=1", "train.b1 must be in [0, 1), got 1.0"),
        ("train.b2=-0.5", "train.b2 must be in [0, 1), got -0.5"),
        ("train.grad_clip=-1", "train.grad_clip must be >= 0, got -1.0"),
        ("train.end_learning_rate_ratio=2", "train.end_learning_rate_ratio must be in [0, 1]"),
        ("model.mlp_ratio=-1", "model.mlp_ratio must be >= 0, got -1.0"),
        ("model.qk_scale=0", "model.qk_scale must be > 0, got 0.0"),
        ("model.rope_base=1", "model.rope_base must be > 1, got 1.0"),
        ("data.power_alpha=0", "data.power_alpha must be > 0, got 0.0"),
    ],
)
def test_float_settings_out_of_range_are_refused_naming_key_and_value(override, message):
    with pytest.raises(ConfigError) as error:
        from_dict(Config, apply_overrides({}, [override]))
    assert message in str(error.value) and "\n" not in str(error.value)


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]\n"
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True)
)
REFUSED_FILES = {
    "bomb": (
        BOMB,
        f"values through YAML aliases; the limit is {MAX_VALUES:,}",
    ),
    "recursive": ("train: &t [1, *t]\n", "recursive alias at line 1"),
    "duplicate": ("train:\n  steps: 3\n  steps: 4\n", "duplicate key 'steps' at line 3 (first"),
    "empty": ("", "is empty"),
    "comments": ("# train:\n#   steps: 3\n", "is empty"),
    "section": ("trian:\n  steps: 3\n", "unknown key trian; valid keys in the config: model"),
    "nan": ("train:\n  learning_rate: .nan\n", "train.learning_rate must be a finite number"),
}


@pytest.mark.parametrize("name", REFUSED_FILES)
def test_the_loader_refuses_malformed_files_in_one_line(tmp_path, name):
    text, fragment = REFUSED_FILES[name]
    (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(ConfigError) as error:
        load(tmp_path / "run.yaml")
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_merge_keys_may_override_but_are_not_duplicates(tmp_path):
    (tmp_path / "run.yaml").write_text(
        "train: &base\n  steps: 3\n  batch_size: 8\neval:\n  <<: {every: 5, batch_size: 4}\n"
        "  batch_size: 8\n"
    )
    assert load(tmp_path / "run.yaml").eval.batch_size == 8


def test_file_refusals_come_before_jax_is_imported(tmp_path):
    """A fresh interpreter: every refusal above, through the CLI, without importing JAX."""
    paths = []
    for name, (text, _) in REFUSED_FILES.items():
        (tmp_path / f"{name}.yaml").write_text(text)
        paths.append(str(tmp_path / f"{name}.yaml"))
    script = (
        "import sys; from fwpzoo import cli\n"
        f"codes = [cli.main(['train', p, '--workdir', {str(tmp_path / 'w')!r}]) for p in {paths}]\n"
        "codes.append(cli.main(['train', sys.argv[1], 'train.learning_rate=inf']))\n"
        "assert codes == [2] * len(codes), codes\n"
        "assert 'jax' not in sys.modules\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, paths[-1]], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert len(done.stderr.splitlines()) == len(paths) + 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "w").exists()


def test_the_cli_reports_a_bad_float_in_one_line(refused, tmp_path):
    workdir = str(tmp_path / "w")
    refused(["train", "configs/mqar.yaml", "--workdir", workdir, "train.b1=nan"], "train.b1")
    assert not (tmp_path / "w").exists()
