"""Every table in docs/figures is what `bildexp figures` and `bildexp plot` make from the committed CSVs today: a
number in a generated table comes from a committed row (through the one baseline rule of bildexp/plots.py), never
from an uncommitted run or an older version of the code."""

from __future__ import annotations

from pathlib import Path

import pytest

from bildexp import PROJECT_ROOT, plots
from bildexp.figures import make_figures

DOCS = PROJECT_ROOT / "docs" / "figures"


def _same_tables(made: list[Path], committed: Path, out: Path) -> int:
    tables = [p for p in made if p.suffix == ".md"]
    for p in tables:
        ours = committed / p.relative_to(out)
        assert ours.is_file(), f"{ours} is made from the committed CSVs but not committed"
        assert p.read_text() == ours.read_text(), f"{ours} differs from what the committed CSVs give: run make reproduce-figures"
    return len(tables)


@pytest.mark.parametrize("results, out", [("offline", "reproduction"), ("offline_compiled", "reproduction_compiled")])
def test_reproduction_tables_come_from_the_committed_csvs(results, out, tmp_path):
    assert _same_tables(make_figures(PROJECT_ROOT / "results" / results, tmp_path), DOCS / out, tmp_path) >= 3


def test_baselines_tables_come_from_the_committed_csv(tmp_path):
    made = plots.make_all(PROJECT_ROOT / "results" / "offline" / "baselines_t5_multi30k.csv", tmp_path, "t5_multi30k")
    assert _same_tables(made, DOCS, tmp_path) == 2
