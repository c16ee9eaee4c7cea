"""The sweep machinery and the quick versions of mqar, state_tracking and charlm, end to end."""

import json
import re
import shlex
import shutil

import pytest

from fwpzoo import cells, cli, reports
from fwpzoo.config import ConfigError, load
from fwpzoo.data.corpora import load_corpus
from fwpzoo.experiments import _sweep, _tuning, charlm, formal_languages, mqar, state_tracking
from fwpzoo.layers.gates import BETA_RANGES
from fwpzoo.reports import write_page

SPELLINGS = {
    "cell": {None, *cells.CELLS},
    "rule": {None, "sum", "delta"},
    "beta_range": {None, *BETA_RANGES},
}


def run_quick(name, tmp_path, *extra):
    argv = ["experiment", name, "--quick", "--workdir", str(tmp_path), "--no-progress", *extra]
    assert cli.main(argv) == 0
    out = tmp_path / name
    records = json.loads((out / f"{name}.json").read_text())
    assert (out / f"{name}.png").stat().st_size > 0
    report = (out / f"{name}.md").read_text()
    assert f"fwpzoo experiment {name} --quick" in report
    return out, records, report


def check_records(records, experiment):
    assert records
    keys = (*experiment.keys, *(k for k in _sweep.RUN_FIELDS if k not in experiment.keys))
    for rec in records:
        assert tuple(rec) == keys
        for key, valid in SPELLINGS.items():
            assert rec.get(key) in valid, (key, rec[key])
        assert isinstance(rec["value"], float)
        trained = rec["stop_reason"] != "compressed"  # charlm's compressors train nothing
        assert (rec["stop_reason"], rec["steps"]) == (
            ("steps", 2) if trained else ("compressed", 0)
        )
        assert rec["seconds"] > 0
        assert {"python", "jax", "flax", "optax", "fwpzoo"} <= set(rec["versions"])
        assert rec["command"].endswith(f"--point {rec['point']}")


def recompute(command, capsys):
    """The metrics the record's command prints on its last stdout line."""
    argv = shlex.split(command)
    assert argv[0] == "fwpzoo"
    capsys.readouterr()
    assert cli.main(argv[1:]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.slow
def test_mqar_quick_records_resume_and_reproduce(tmp_path, capsys):
    out, records, report = run_quick("mqar", tmp_path)
    check_records(records, mqar.EXPERIMENT)
    (rebound,) = [r for r in records if r["rebinds"]]
    records = [r for r in records if not r["rebinds"]]
    assert {r["model"] for r in records} == {"attention", "delta_rule"}
    assert (rebound["model"], rebound["x"], rebound["rebinds"]) == ("delta_rule", 2, 2)
    assert re.search(r"^\| delta_rule \| - \| [0-9.]+ \|$", report, re.M)  # no plain point
    by_model = {r["model"]: r for r in records}
    assert by_model["delta_rule"]["rule"] == "delta"
    assert by_model["attention"]["cell"] is None
    # d_model 16, 2 heads: fast weights 2 x 8 x 8; attention keeps 16 keys and values of 2 x 8
    assert (
        by_model["delta_rule"]["state_size"] == 2 * 8 * 8 and by_model["delta_rule"]["key_dim"] == 8
    )
    assert by_model["attention"]["state_size"] == 16 * 2 * (8 + 8)
    assert by_model["delta_rule"]["decay_init"] is None
    assert all(r["task"] == "mqar" and r["metric"] == "accuracy" for r in records)
    assert all(0.0 <= r["value"] <= 1.0 and r["x"] == 4 and r["seed"] == 0 for r in records)
    assert "Recorded: 3 of 3 points." in report

    # the record's command recomputes its value alone, in a fresh workdir
    rec = by_model["delta_rule"]
    assert recompute(rec["command"], capsys) == {"accuracy": rec["value"]}

    # a recorded point is read back, not recomputed: its record stays byte for byte, even with
    # its run's workdir gone (the record, not the workdir, is what a sweep keeps)
    point_file = out / "points" / f"{rec['point']}.json"
    before = point_file.read_text()
    shutil.rmtree(out / rec["point"])
    run_quick("mqar", tmp_path)
    assert point_file.read_text() == before
    assert not (out / rec["point"]).exists()

    assert cli.main(["experiment", "mqar", "--quick", "--workdir", str(tmp_path), "--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed == [f"done    {r['point']}" for r in [*records, rebound]]


@pytest.mark.slow
def test_a_run_that_meets_its_stop_metric_early_says_so(tmp_path):
    """A point whose valid accuracy reaches train.stop_at at an eval before the last step ends
    there and is recorded as stopped by the metric, not by the budget (the quick sweeps' points,
    which miss the configs' 0.99, are recorded as stopped by "steps")."""
    quick = (*mqar.QUICK_OVERRIDES, "train.steps=4", "eval.every=2")
    met = mqar.mqar_point("delta_rule", 2, 4, 0, (*quick, "train.stop_at=0.0"))
    outcome = _sweep.run_training(met, tmp_path / "met")
    assert (outcome.steps, outcome.stop_reason) == (2, "reached_stop_metric")


@pytest.mark.slow
def test_a_point_that_diverges_before_its_first_save_is_its_initial_model(tmp_path):
    """A run that diverges before any checkpoint is recorded as diverged at step 0 with the
    test metrics of the model as initialised (the last good state), not left to stop the sweep
    with "no checkpoint". The warmup takes the rate from 0 to 1e30: step 2 sends the weights to
    inf."""
    quick = (*mqar.QUICK_OVERRIDES, "train.steps=4", "checkpoint.every=4", "eval.every=4")
    blown = (*quick, "train.learning_rate=1e30", "train.warmup_steps=4")
    outcome = _sweep.run_training(mqar.mqar_point("delta_rule", 2, 4, 0, blown), tmp_path / "d")
    assert (outcome.steps, outcome.stop_reason) == (0, "diverged")
    # a rate of 1e-30 leaves the initial weights as they were, to float32's last bits
    still = (*quick, "train.learning_rate=1e-30")
    untrained = _sweep.run_training(mqar.mqar_point("delta_rule", 2, 4, 0, still), tmp_path / "z")
    assert outcome.metrics == pytest.approx(untrained.metrics, rel=1e-6)


@pytest.mark.slow
def test_a_resumed_point_counts_every_process_and_refuses_another_length(tmp_path):
    """A point whose training an earlier process did counts that training in its record's
    seconds; a workdir holding a shorter run of its config is refused, not extended (a cosine
    schedule resumed at another length would not give what the point's command recomputes)."""
    options = _sweep.parse_options("mqar", ["--quick", "--workdir", str(tmp_path)])
    quick = (*mqar.QUICK_OVERRIDES, "train.steps=2")
    point = mqar.mqar_point("delta_rule", 2, 4, 0, quick)
    first = _sweep.run_training(point, tmp_path / "run")
    record = _sweep.compute_point(point, tmp_path / "run", options, _sweep.run_training)
    assert record["steps"] == 2
    assert record["details"]["train_seconds"] == first.details["train_seconds"]
    assert record["seconds"] >= first.details["train_seconds"]
    longer = mqar.mqar_point("delta_rule", 2, 4, 0, (*quick, "train.steps=3"))
    with pytest.raises(ConfigError, match=r"another config \(train.steps: 2 -> 3\); remove it"):
        _sweep.run_training(longer, tmp_path / "run")


def test_full_grids_are_seeded_and_reach_the_regimes_they_test():
    """The full sweeps (configs only, nothing trained): distinct point names, every setting at
    least three seeds (two for charlm and mqar, whose points cost more than 10 CPU-minutes; the
    compressors of charlm, which train nothing, have none), MQAR pairs up to 4x the key dim per
    head with the vocabulary at 256 or more."""
    for module, seeds in ((mqar, 2), (state_tracking, 3), (charlm, 2), (formal_languages, 3)):
        points = module.make_points(_sweep.parse_options(module.NAME, []))
        assert len({p.name for p in points}) == len(points)
        settings = {}
        trained = [p for p in points if p.config is not None]
        assert all("seed" in p.labels for p in trained)

        def setting(p, leave_out=("seed",)):
            return tuple(sorted((k, str(v)) for k, v in p.labels.items() if k not in leave_out))

        # the tuning protocol's learning-rate grid is seed 0 alone: its other rates, and its
        # point at the config's rate where the sweep has no such setting of its own
        rated = {
            setting(p, ("seed", "learning_rate"))
            for p in trained
            if p.labels.get("learning_rate") is not None
        }
        for p in trained:
            if p.labels.get("learning_rate") is None:
                settings.setdefault(setting(p), set()).add(p.labels["seed"])
        for labels, drawn in settings.items():
            grid_only = (
                drawn == {_tuning.TUNING_SEED}
                and tuple((k, v) for k, v in labels if k != "learning_rate") in rated
            )
            assert len(drawn) >= seeds or grid_only, (module.NAME, labels)
    points = mqar.make_points(_sweep.parse_options("mqar", []))
    assert {p.labels["model"] for p in points} == set(mqar.MODELS)
    assert all(p.labels["vocab_size"] >= 256 for p in points)
    assert max(p.labels["x"] / p.labels["key_dim"] for p in points) >= 4
    assert len({p.labels["state_size"] for p in points if p.labels["model"] == "delta_rule"}) >= 3
    study = [p for p in points if p.labels["decay_init"] == "mamba2"]
    assert {p.labels["model"] for p in study} == set(mqar.GATED) and len(study) == 4
    # every key re-bound, at a point whose plain twin is in the grid, for every model and seed
    rebound = [p for p in points if p.labels["rebinds"]]
    assert len(rebound) == len(mqar.MODELS) * len(mqar.REBIND_GRID) * len(mqar.REBIND_SEEDS)
    assert {(p.labels["key_dim"], p.labels["x"]) for p in rebound} == {
        (8, 8),
        (8, 16),
        (16, 8),
        (16, 16),
    }
    assert all(p.labels["rebinds"] == p.labels["x"] for p in rebound)
    names = {p.name for p in points}
    twins = [p for p in rebound if p.labels["seed"] in mqar.SEEDS]  # the grid's seeds
    assert all(p.name.replace(f"-r{p.labels['rebinds']}", "") in names for p in twins)
    # attention, cheap where it stops early, gets three seeds on the grid; with 4-dim heads, where
    # it runs the whole budget, the two of the other models; and a longer budget where it must
    # pick the later binding
    grid_seeds = {}
    for p in points:
        standard = p.labels["learning_rate"] is None and p.labels["budget"] is None
        if p.labels["model"] == "attention" and not p.labels["rebinds"] and standard:
            grid_seeds.setdefault((p.labels["key_dim"], p.labels["x"]), set()).add(p.labels["seed"])
    assert len(grid_seeds) == 6
    assert all(len(s) == (2 if key_dim == 4 else 3) for (key_dim, _), s in grid_seeds.items())
    steps = {p.labels["model"]: p.spec["settings"].get("train.steps", 4000) for p in rebound}
    assert steps["attention"] > steps["delta_rule"]
    # the write strength study: both delta rules from a low beta, at both key dim 4 grid points,
    # each beside its grid twin (same name less the variant)
    low = [p for p in points if p.labels["beta_init"] is not None and p.labels["budget"] is None]
    studied = {tuple(p.labels[k] for k in ("model", "key_dim", "x", "seed")) for p in low}
    assert studied == {
        (m, 4, n, s) for m in ("delta_rule", "gated_delta_rule") for n in (8, 16) for s in (0, 1)
    }
    assert all(p.spec["settings"]["model.beta_init"] == mqar.LOW_BETA for p in low)
    assert all(p.name.replace(f"-beta{mqar.LOW_BETA}_init", "") in names for p in low)


def test_mqar_beta_table_puts_the_study_beside_the_grid():
    """Rows: the grid's default start, then the low start; columns: the pairs; a cell still
    waiting for a seed says so."""
    options = _sweep.parse_options("mqar", [])
    record = {"model": "delta_rule", "num_heads": mqar.BETA_HEADS}
    records = [
        {**record, "beta_init": None, "x": 8, "value": 0.02},
        {**record, "beta_init": None, "x": 8, "value": 0.03},
        {**record, "beta_init": 0.1, "x": 8, "value": 0.9},
        {**record, "beta_init": 0.1, "x": 16, "value": 0.5},
        {**record, "num_heads": 8, "beta_init": None, "x": 8, "value": 0.95},  # not key dim 4
    ]
    assert mqar.beta_table(records, options).splitlines()[2:] == [
        "| delta_rule | about 0.5 (no bias) | 0.025 (0.020-0.030) | - |",
        "| delta_rule | 0.1 | 0.900 [1/2 seeds] | 0.500 [1/2 seeds] |",
    ]
    assert mqar.beta_table(records[:2], options) == "No point of the study is recorded yet."


def test_a_record_of_another_spec_is_refused(tmp_path, capsys):
    options = _sweep.parse_options("mqar", ["--quick", "--workdir", str(tmp_path)])
    point = mqar.make_points(options)[0]
    stale = {"spec": {**point.spec, "overrides": ["train.steps=7"]}}
    _sweep.write_json(options.points_dir / f"{point.name}.json", stale)
    argv = ["experiment", "mqar", "--quick", "--workdir", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another spec" in err[0] and point.name in err[0]


def test_a_record_goes_stale_when_its_config_file_is_edited(tmp_path):
    """The spec holds the settings of the file and the overrides: a record made before an edit
    of its config is refused, naming the setting that changed."""
    config = tmp_path / "delta_rule.yaml"
    shutil.copy(_sweep.CONFIGS / "mqar" / "delta_rule.yaml", config)
    labels, metrics = {"model": "delta_rule"}, {"accuracy": {}}
    before = _sweep.train_point("p", config, ["data.num_pairs=8"], labels, metrics, seed=0)
    assert before.spec["settings"]["data.num_pairs"] == 8
    assert before.spec["settings"]["train.steps"] == 4000
    _sweep.write_json(tmp_path / "p.json", {"spec": before.spec})
    config.write_text(config.read_text().replace("steps: 4000", "steps: 3000"))
    after = _sweep.train_point("p", config, ["data.num_pairs=8"], labels, metrics, seed=0)
    with pytest.raises(ConfigError, match=r"another spec \(settings train.steps: 4000 -> 3000\)"):
        _sweep.read_point(tmp_path / "p.json", after)
    # a comment or the layout changes no setting: the record stays valid
    config.write_text("# edited\n" + config.read_text().replace("steps: 3000", "steps:   4000"))
    again = _sweep.train_point("p", config, ["data.num_pairs=8"], labels, metrics, seed=0)
    assert _sweep.read_point(tmp_path / "p.json", again) == {"spec": before.spec}


@pytest.mark.slow
def test_state_tracking_quick(tmp_path):
    _, records, _ = run_quick("state_tracking", tmp_path)
    check_records(records, state_tracking.EXPERIMENT)
    assert {(r["task"], r["model"]) for r in records} == {
        ("parity", "delta_rule"),
        ("s3", "delta_product_n2"),
    }
    # one record on the training lengths and one at each test length, per point
    assert sorted((r["metric"], r["x"]) for r in records if r["task"] == "parity") == [
        ("accuracy", "train"),
        ("accuracy@48", 48),
    ]
    assert all(r["beta_range"] == "0,2" and 0.0 <= r["value"] <= 1.0 for r in records)


@pytest.mark.slow
def test_formal_languages_quick(tmp_path, capsys):
    _, records, report = run_quick("formal_languages", tmp_path)
    check_records(records, formal_languages.EXPERIMENT)
    assert sorted((r["model"], r["setting"], r["metric"]) for r in records) == [
        (model, setting, metric)
        for model in ("rdn", "srwm")
        for setting, metric in (("bin0", "sequence_accuracy"), ("bin1", "sequence_accuracy@100"))
    ]
    assert all(r["task"] == "parity" and 0.0 <= r["value"] <= 1.0 for r in records)
    assert "| parity | rdn |" in report and "| parity | srwm |" in report
    # the command of a record recomputes its point: the same metrics, by name
    rdn = [r for r in records if r["model"] == "rdn"]
    metrics = recompute(rdn[0]["command"] + f" --workdir {tmp_path}", capsys)
    assert metrics == {r["metric"]: pytest.approx(r["value"]) for r in rdn}


@pytest.mark.slow
def test_charlm_quick(tmp_path, capsys):
    _, records, report = run_quick("charlm", tmp_path)
    check_records(records, charlm.EXPERIMENT)
    assert all(r["task"] == "text" and r["corpus"] == "fixture" for r in records)
    models = {(r["model"], r["metric"]): r for r in records}
    assert set(models) == {
        *((m, metric) for m in ("delta_rule", "attention") for metric in ("bpc", "bpc@64")),
        *((c, "bpc") for c in charlm.COMPRESSOR_MODELS),
    }
    # the compressor records are the compressors' sizes on the same test bytes as one stream,
    # and their command recomputes them
    test = load_corpus("fixture", charlm.DATA_DIR)["test"].tobytes()
    for name, compress in charlm.COMPRESSORS.items():
        rec = models[name, "bpc"]
        assert rec["value"] == 8 * len(compress(test)) / len(test) and 1.0 < rec["value"] < 8.0
        assert recompute(rec["command"] + f" --workdir {tmp_path}", capsys) == {"bpc": rec["value"]}
    # after the training text: the test bytes' share of the compressed train + test stream
    train = load_corpus("fixture", charlm.DATA_DIR)["train"].tobytes()
    xz = charlm.COMPRESSORS["xz"]
    after = 8 * (len(xz(train + test)) - len(xz(train))) / len(test)
    assert models["xz+train", "bpc"]["value"] == after < models["xz", "bpc"]["value"]
    # a model after two steps: between a good compressor and far above a uniform guess
    assert 1.0 < models["delta_rule", "bpc"]["value"] < 9.0
    assert models["delta_rule", "bpc@64"]["x"] == 64 and models["delta_rule", "bpc"]["x"] == 32
    assert models["delta_rule", "bpc"]["num_params"] > 0
    assert "gzip" in report


def test_notes_survive_a_rewritten_report(tmp_path):
    path = tmp_path / "x.md"
    write_page(path, "# first")
    path.write_text(path.read_text() + "what we learned\n")
    write_page(path, "# second")
    text = path.read_text()
    assert text.startswith("# second") and text.endswith("what we learned\n")
    assert "# first" not in text


def test_spread_cells_and_groups():
    assert reports.spread([0.5, 0.9, 0.7]) == (0.7, 0.5, 0.9)
    assert reports.spread_cell([0.5, 0.9, 0.7]) == "0.700 (0.500-0.900)"
    assert reports.spread_cell([0.5], seeds=3) == "0.500 [1/3 seeds]"
    assert reports.spread_cell([17.46, 15.91], seeds=2, decimals=1) == "16.7 (15.9-17.5)"
    assert reports.spread_cell([]) is None
    records = [{"a": 1, "value": 0.1}, {"a": 2, "value": 0.2}, {"a": 1, "value": 0.3}]
    assert reports.group(records, ["a"]) == {(1,): [0.1, 0.3], (2,): [0.2]}


def test_record_labels_come_from_the_layers_description():
    """A layer names itself (describe()): an rdn, srwm or plastic model is labelled by its mixer,
    not by the default cell; an FWP layer by its cell, rule and feature map; state sizes are what
    the layer keeps (attention's cache at the sequence length asked for)."""
    base = _sweep.CONFIGS / "formal_languages" / "base.yaml"
    hebbff = _sweep.CONFIGS / "familiarity" / "hebbff.yaml"
    programmed = [load(base, [f"model.mixers=[{mixer}]"]) for mixer in ("rdn", "srwm")]
    for cfg in (*programmed, load(hebbff)):
        labels = _sweep.model_labels(cfg)
        assert labels["model"] == labels["mixer"] == cfg.model.layers()[0].mixers[0]
        assert "cell" not in labels and labels["state_size"] > 0
    fwp = ["model.mixers=[fwp]", "model.cell=delta_rule", "model.beta_range=0,2"]
    labels = _sweep.model_labels(load(base, [*fwp, "model.feature_map=dpfp", "model.dpfp_nu=2"]))
    assert (labels["model"], labels["cell"], labels["rule"]) == ("delta_rule",) * 2 + ("delta",)
    assert (labels["feature_map"], labels["beta_range"]) == ("dpfp2", "0,2")
    attention = load(base, ["model.mixers=[attention]"])
    assert (
        _sweep.model_labels(attention, seq_len=10)["state_size"]
        == 10 * (_sweep.model_labels(attention, seq_len=1)["state_size"])
    )


def test_versions_line_names_each_field_once_with_every_value():
    records = [
        {"versions": {"jax": "0.10.2", "fwpzoo": "b2"}},
        {"versions": {"jax": "0.10.2", "fwpzoo": "a1"}},
        {"versions": {"jax": "0.10.2", "fwpzoo": "b2"}},
        {},
    ]
    assert reports.versions_line(records) == "jax 0.10.2, fwpzoo a1 / b2"


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["experiment"], "no experiment named"),
        (["experiment", "nope"], "unknown experiment 'nope'"),
        (["experiment", "mqar", "--bogus"], "unrecognized arguments: --bogus"),
        (["experiment", "mqar", "--quick", "--point", "nope"], "unknown point 'nope'"),
        (["experiment", "mqar", "--point", "x", "--list"], "not allowed with argument"),
        (["experiment", "mqar", "--quick", "--only", "*-s9"], "no point of mqar matches --only"),
    ],
)
def test_bad_experiment_arguments(argv, expected, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0]


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_experiment_help_lists_the_experiments(flag, capsys):
    assert cli.main(["experiment", flag]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fwpzoo experiment NAME")
    assert "experiments: capacity, charlm, deep_memory," in out


@pytest.mark.slow
def test_only_computes_the_pending_points_it_matches(tmp_path):
    """--only GLOB records the matching points and leaves the rest pending, on a page that
    reports what is recorded (how a sweep is split between processes or machines)."""
    _, records, report = run_quick("mqar", tmp_path, "--only", "attention-*")
    assert [r["point"] for r in records] == ["attention-h2-n4-s0"]
    assert "Recorded: 1 of 3 points; pending:" in report


def test_report_only_without_records_says_every_point_is_pending(tmp_path):
    argv = ["experiment", "mqar", "--quick", "--report-only", "--workdir", str(tmp_path)]
    assert cli.main([*argv, "--no-progress"]) == 0
    assert json.loads((tmp_path / "mqar" / "mqar.json").read_text()) == []
    page = (tmp_path / "mqar" / "mqar.md").read_text()
    assert page.startswith(f"# {mqar.TITLE}") and "Recorded: 0 of 3 points; pending:" in page
    assert not (tmp_path / "mqar" / "points").exists()


def test_records_are_written_only_from_a_committed_tree(tmp_path, monkeypatch, capsys):
    """A sweep that records into docs/results refuses, in one line and before computing any
    point, a tree whose code or configs differ from its commit; --allow-dirty records the point
    with the uncommitted paths listed and the commit marked with "+"."""
    state = lambda: ("f" * 40, ("fwpzoo/x.py",))  # noqa: E731
    monkeypatch.setattr(_sweep, "checkout_state", state)  # what the sweep checks
    monkeypatch.setattr(reports, "checkout_state", state)  # what the record names
    monkeypatch.setattr(_sweep, "in_main_history", lambda commit: True)
    argv = ["experiment", "mqar", "--workdir", str(tmp_path), "--no-progress", "--only", "x*"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "uncommitted changes in 1 file(s) under" in err[0]
    assert "fwpzoo/x.py" in err[0]
    options = _sweep.parse_options("mqar", ["--quick", "--workdir", str(tmp_path)])
    point = mqar.make_points(options)[0]
    outcome = _sweep.Outcome({"accuracy": 0.5}, 2, "steps")
    record = _sweep.compute_point(point, tmp_path, options, lambda point, workdir: outcome)
    assert record["versions"]["fwpzoo"] == "f" * 12 + "+"
    assert record["uncommitted"] == ["fwpzoo/x.py"]
    monkeypatch.setattr(_sweep, "in_main_history", lambda commit: False)
    assert cli.main([*argv, "--allow-dirty"]) == 2
    assert "is not in main's history" in capsys.readouterr().err


def test_every_record_names_a_commit_in_main_history():
    """Each recorded point names the commit it was computed from, a commit of main, and a record
    made from an uncommitted tree says so: the code behind every number can be checked out."""
    try:
        history = _sweep.git("rev-list", _sweep.MAIN_BRANCH).split()
    except (OSError, _sweep.subprocess.CalledProcessError):
        pytest.skip("not a git checkout with a main branch")
    short = {commit[:12] for commit in history}
    problems = []
    for path in sorted(_sweep.RESULTS.glob("*/points/*.json")):
        record = json.loads(path.read_text())
        commit = record["versions"]["fwpzoo"] or ""
        if commit.rstrip("+") not in short:
            problems.append(f"{path.name}: {commit or 'no commit'} is not in main's history")
        elif commit.endswith("+") and not record.get("uncommitted"):
            problems.append(f"{path.name}: made from an uncommitted tree, not marked")
    assert not problems, problems


def test_best_rate_keeps_the_configs_rate_unless_another_beats_it_by_the_margin():
    own = 3e-3
    assert _tuning.best_rate({1e-3: 0.9, 3e-3: 0.8}, own) is None  # a rate still pending
    assert _tuning.best_rate({1e-3: 0.9, 3e-3: 0.8, 1e-2: None}, own) is None
    assert _tuning.best_rate({1e-3: 0.805, 3e-3: 0.8, 1e-2: 0.809}, own) == own
    assert _tuning.best_rate({1e-3: 0.85, 3e-3: 0.8, 1e-2: 0.9}, own) == 1e-2
    # bits per character: lower is better
    assert _tuning.best_rate({1e-3: 2.0, 3e-3: 2.1, 1e-2: 2.3}, own, lower_is_better=True) == 1e-3
    assert [p.name for p in mqar.tuning_points()][:2] == [
        "delta_rule-lr0.001-h8-n16-s0",
        "delta_rule-lr0.01-h8-n16-s0",
    ]
