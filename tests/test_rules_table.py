"""The rules table is generated from the cell modules: docs/rules.md and `fwpzoo list`."""

from pathlib import Path

from fwpzoo import cells, cli, rules

RULES_MD = Path(__file__).parents[1] / "docs" / "rules.md"


def test_committed_rules_page_matches_the_generator():
    """Regenerate with: fwpzoo list --rules-md > docs/rules.md"""
    assert RULES_MD.read_text() == rules.markdown()


def test_every_cell_has_a_row_with_its_objective_and_forms():
    rows = {row["rule"]: row for row in rules.rows()}
    assert list(rows) == list(cells.CELLS)
    for name, module in cells.CELLS.items():
        assert rows[name]["objective"] == module.OBJECTIVE.loss
        assert rows[name]["forms"].split(", ") == [
            form for form in ("step", *cells.FORMS) if hasattr(module, form)
        ]


def test_list_prints_the_rules_table(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    table = out.split("rules (docs/rules.md):\n")[1].splitlines()
    assert table[0].split() == ["rule", "step", "state", "size", "forms"]
    assert [line.split()[0] for line in table[1:]] == list(cells.CELLS)
    # and the model.* fields each mixer reads
    line = "\nplastic reads (model.*): d_model, num_heads, key_dim, value_dim, form, chunk_size,"
    assert line + " plastic_on," in out


def test_list_rules_md_prints_the_page(capsys):
    assert cli.main(["list", "--rules-md"]) == 0
    assert capsys.readouterr().out == rules.markdown()
