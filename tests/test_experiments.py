"""The experiment runner and the quick versions of mqar, state_tracking and charlm, end to end."""

import json
import math

import pytest

from fwpzoo import cells, cli
from fwpzoo.experiments import _common, charlm
from fwpzoo.reports import write_page

SPELLINGS = {
    "cell": {None, *cells.CELLS},
    "rule": {None, "sum", "delta"},
    "feature_map": {None, "elu1", "dpfp1", "dpfp2", "dpfp3", "favor", "softmax"},
    "beta_range": {None, "0,1", "0,2"},
    "setting": {None, "unique", "overwrite"},
    "metric": {"loss", "accuracy", "bpc"},
}


def run_quick(name, tmp_path):
    code = cli.main(["experiment", name, "--quick", "--workdir", str(tmp_path), "--no-progress"])
    assert code == 0
    out = tmp_path / name
    records = json.loads((out / f"{name}.json").read_text())
    assert (out / f"{name}.png").stat().st_size > 0
    report = (out / f"{name}.md").read_text()
    assert f"fwpzoo experiment {name} --quick" in report
    return out, records, report


def check_records(records):
    assert records
    for rec in records:
        assert tuple(rec) == _common.RECORD_KEYS
        for key, valid in SPELLINGS.items():
            assert rec[key] in valid, (key, rec[key])
        assert isinstance(rec["value"], float)


def test_mqar_quick(tmp_path):
    out, records, report = run_quick("mqar", tmp_path)
    check_records(records)
    assert {r["model"] for r in records} == {"attention", "delta_rule"}
    by_model = {r["model"]: r for r in records}
    assert by_model["delta_rule"]["rule"] == "delta"
    assert by_model["delta_rule"]["cell"] == "delta_rule"
    assert by_model["attention"]["feature_map"] == "softmax"
    assert by_model["attention"]["cell"] is None
    # d_model 16, 2 heads: fast weights 2 x 8 x 8; attention keeps 32 keys and values of 2 x 8
    assert by_model["delta_rule"]["state_size"] == 2 * 8 * 8
    assert by_model["attention"]["state_size"] == 32 * 2 * (8 + 8)
    assert all(r["task"] == "mqar" and r["metric"] == "accuracy" for r in records)
    assert all(0.0 <= r["value"] <= 1.0 and r["x"] == 4 for r in records)

    # a finished sweep is read back, not retrained: the results stay byte for byte
    before = (out / "delta_rule-d16-n4" / "result.json").read_text()
    run_quick("mqar", tmp_path)
    assert (out / "delta_rule-d16-n4" / "result.json").read_text() == before


def test_state_tracking_quick(tmp_path):
    _, records, _ = run_quick("state_tracking", tmp_path)
    check_records(records)
    assert {(r["task"], r["model"]) for r in records} == {
        ("parity", "delta_rule"),
        ("s3", "delta_product_n2"),
    }
    assert all(r["beta_range"] == "0,2" and r["x"] == 48 for r in records)
    assert all(r["metric"] == "accuracy" and 0.0 <= r["value"] <= 1.0 for r in records)


def test_charlm_quick(tmp_path):
    out, records, report = run_quick("charlm", tmp_path)
    check_records(records)
    assert all(r["task"] == "text" and r["metric"] == "bpc" for r in records)
    models = {r["model"]: r for r in records}
    assert set(models) == {"delta_rule", "attention", "gzip", "bz2", "xz"}
    # the compressor records are the compressors' sizes on the same test bytes
    expected = charlm.compressor_bpc("fixture", "data")
    for name in charlm.COMPRESSORS:
        assert models[name]["value"] == pytest.approx(expected[name])
        assert 1.0 < models[name]["value"] < 8.0 and models[name]["state_size"] is None
    # a model after a few steps: between a good compressor and a uniform guess with a margin
    result = json.loads((out / "delta_rule" / "result.json").read_text())
    assert models["delta_rule"]["value"] == pytest.approx(result["test"]["loss"] / math.log(2))
    assert 1.0 < models["delta_rule"]["value"] < 9.0
    assert "tokens/s" in report
    # the run trains for the probed number of steps that fill the CPU budget
    per_step = json.loads((out / "delta_rule" / "steps.json").read_text())["cpu_seconds_per_step"]
    trained = json.loads((out / "delta_rule" / "config.json").read_text())["train"]["steps"]
    assert per_step > 0
    assert trained == max(int(charlm.QUICK_BUDGET_S / per_step), 2)


def test_notes_survive_a_rewritten_report(tmp_path):
    path = tmp_path / "x.md"
    write_page(path, "# first")
    path.write_text(path.read_text() + "what we learned\n")
    write_page(path, "# second")
    text = path.read_text()
    assert text.startswith("# second") and text.endswith("what we learned\n")
    assert "# first" not in text


def test_record_refuses_unknown_keys():
    assert _common.record(model="gzip", metric="bpc", value=2.0)["cell"] is None
    with pytest.raises(KeyError):
        _common.record(modle="gzip")


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["experiment"], "no experiment named"),
        (["experiment", "nope"], "unknown experiment 'nope'"),
        (["experiment", "mqar", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_experiment_arguments(argv, expected, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0]


def test_report_only_needs_finished_runs(tmp_path, capsys):
    argv = ["experiment", "mqar", "--report-only", "--workdir", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 2
    assert "no finished runs" in capsys.readouterr().err
    assert not (tmp_path / "mqar" / "mqar.json").exists()
