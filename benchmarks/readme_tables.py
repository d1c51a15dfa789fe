"""Write the README's performance tables from the committed CSVs (never by hand).

Each table sits between markers in README.md::

    <!-- bench:serving -->   ... rendered by benchmarks/serving_table.py (serving.csv)
    <!-- bench:serving_idle --> ... serving_table.py on serving_idle.csv (the long idle run)
    <!-- bench:narratives --> ... bench_narratives.py --table (narratives.csv)
    <!-- bench:sweep -->      ... bench_sweep.py --table (sweep.csv)
    <!-- bench:sweep_aligned --> ... bench_sweep.py --variant aligned --table (sweep_aligned.csv)
    <!-- bench:sustained -->  ... bench_sustained.py --table (sustained.csv + latency.csv)
    <!-- /bench -->           closes each

    python benchmarks/readme_tables.py           # rewrite README.md in place
    python benchmarks/readme_tables.py --check   # exit 1 if README.md is not up to date
"""

from __future__ import annotations

import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(os.path.dirname(HERE), "README.md")
sys.path.insert(0, HERE)


def tables() -> dict[str, str]:
    """name -> table text, for every benchmark whose CSV exists."""
    out = {}
    if os.path.exists(os.path.join(HERE, "results", "serving.csv")):
        import serving_table

        out["serving"] = serving_table.table()
    if os.path.exists(os.path.join(HERE, "results", "serving_idle.csv")):
        import serving_table

        out["serving_idle"] = serving_table.table(os.path.join(HERE, "results", "serving_idle.csv"))
    if os.path.exists(os.path.join(HERE, "results", "narratives.csv")):
        import narratives_report
        from _common import read_csv

        out["narratives"] = narratives_report.table(narratives_report.latest_run(
            read_csv(os.path.join(HERE, "results", "narratives.csv"))))
    if os.path.exists(os.path.join(HERE, "results", "sweep.csv")):
        import bench_sweep

        out["sweep"] = bench_sweep.table(bench_sweep.read_rows())
    if os.path.exists(os.path.join(HERE, "results", "sweep_aligned.csv")):
        import bench_sweep

        out["sweep_aligned"] = bench_sweep.table(
            bench_sweep.read_rows(os.path.join(HERE, "results", "sweep_aligned.csv")), "aligned")
    if os.path.exists(os.path.join(HERE, "results", "sustained.csv")):
        import bench_sustained

        out["sustained"] = bench_sustained.table()
    return out


def render(text: str, tabs: dict[str, str]) -> str:
    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name not in tabs:
            return m.group(0)
        return f"<!-- bench:{name} -->\n{tabs[name].strip()}\n<!-- /bench -->"

    return re.sub(r"<!-- bench:(\w+) -->\n.*?<!-- /bench -->", sub, text, flags=re.S)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(README, encoding="utf-8") as f:
        old = f.read()
    new = render(old, tables())
    if "--check" in argv:
        if new != old:
            print("README.md performance tables are stale: run python benchmarks/readme_tables.py")
            return 1
        return 0
    if new != old:
        with open(README, "w", encoding="utf-8") as f:
            f.write(new)
        print("README.md: performance tables rewritten from benchmarks/results/*.csv")
    else:
        print("README.md: performance tables already match the CSVs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
