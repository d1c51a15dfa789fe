"""The README's performance tables are the ones rendered from the committed CSVs."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_readme_tables_match_the_csvs():
    sys.path.insert(0, str(BENCH))
    try:
        import readme_tables

        assert readme_tables.main(["--check"]) == 0, "run python benchmarks/readme_tables.py"
    finally:
        sys.path.remove(str(BENCH))
