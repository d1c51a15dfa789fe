"""benchmarks/bench_serving.py helpers: configs, round order, summary, CSV, plot (no engine)."""

from __future__ import annotations

import csv
import os
import sys

import pytest

from emosteer.request.spec import SteerSpec

_BENCH = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
if _BENCH not in sys.path:
    sys.path.insert(0, _BENCH)
import _common  # noqa: E402
import bench_serving as bs  # noqa: E402


def test_configs_parse_and_fingerprints():
    L, H, n = 30, 9, 40
    assert bs.condition_configs("plain", n, L, H) == [None] * n
    assert bs.condition_configs("idle", n, L, H) == [None] * n
    shared = bs.condition_configs("shared", n, L, H)
    assert len({SteerSpec.parse(c).fingerprint() for c in shared}) == 1
    for cond in ("distinct", "distinct_capture"):
        cfgs = bs.condition_configs(cond, n, L, H)
        specs = [SteerSpec.parse(c) for c in cfgs]
        assert len({s.fingerprint() for s in specs}) == n
        assert (specs[0].capture is not None) == (cond == "distinct_capture")
        assert {c["heads"][0]["head"] for c in cfgs} == set(range(H))
    assert bs.steer_layers(30) == list(range(10, 20))
    assert bs.steer_layers(2) == [0] and bs.steer_layers(3) == [1]
    with pytest.raises(ValueError):
        bs.condition_configs("nope", 1, L, H)


def test_round_order_rotates():
    conds = list(bs.CONDITIONS)
    orders = [bs.round_order(conds, r) for r in range(len(conds))]
    assert all(sorted(o) == sorted(conds) for o in orders)
    assert [o[0] for o in orders] == conds


def test_summarize_ratios():
    plain = [100.0, 110.0, 90.0]
    row = bs.summarize("idle", [99.0, 110.0, 81.0], plain)
    assert row["round_tok_per_s"] == "99.0;110.0;81.0"
    assert row["median_tok_per_s"] == 99.0 and row["min_tok_per_s"] == 81.0
    assert row["ratio_to_plain"] == round(99.0 / 100.0, 4)
    assert row["ratio_min"] == 0.9 and row["ratio_max"] == 1.0
    assert bs.summarize("x", [5.0], None)["ratio_to_plain"] == ""
    # the interval holds the ratio of medians and narrows as rounds agree
    assert row["ratio_ci_low"] <= row["ratio_to_plain"] <= row["ratio_ci_high"]
    tight = bs.summarize("idle", [99.0 + 0.1 * i for i in range(20)], [100.0 + 0.1 * i for i in range(20)])
    assert tight["ratio_ci_high"] - tight["ratio_ci_low"] < 0.005
    assert bs.summarize("idle", [99.0], [100.0])["ratio_ci_low"] == ""  # one round: no interval
    assert bs.same_fraction([[1, 2], [3]], [[1, 2], [4]]) == 0.5


def _rows():
    rows = []
    for dtype in ("float32", "bfloat16"):
        plain = [100.0, 104.0, 98.0]
        for i, cond in enumerate(bs.CONDITIONS):
            tps = [x * (1 - 0.02 * i) for x in plain]
            rows.append({"condition": cond, "model": "m", "dtype": dtype, "mode": "eager",
                         "n_prompts": 8, "max_tokens": 8, "rounds": 3,
                         **bs.summarize(cond, tps, plain), "idle_equals_plain": True,
                         "same_tokens_as_plain": "" if cond == "plain" else 1.0,
                         "core_setting": bs.core_setting({"LD_PRELOAD": "/x/libgomp.so.1:/y/libtcmalloc.so"})})
    return rows


def test_csv_plot_table(tmp_path):
    rows = _rows()
    path = tmp_path / "serving.csv"
    _common.append_csv(rows, str(path), bs.COLUMNS)
    _common.append_csv(rows[:1], str(path), bs.COLUMNS)
    with open(path) as f:
        got = list(csv.DictReader(f))
    assert len(got) == len(rows) + 1 and list(got[0]) == list(bs.COLUMNS)
    assert got[0]["core_setting"].endswith("LD_PRELOAD=libgomp+libtcmalloc")
    png = tmp_path / "serving_test.png"
    bs.plot(rows, str(png), "title")
    assert png.stat().st_size > 1000
    text = bs.table(rows)
    assert "distinct_capture" in text and len(text.splitlines()) == len(rows) + 2


def test_kvcache_gib_bounds(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,'
        ' "hidden_size": 576}')
    fp32 = bs.kvcache_gib(str(tmp_path), "float32", 128, 512)
    bf16 = bs.kvcache_gib(str(tmp_path), "bfloat16", 128, 512)
    assert 1 <= bf16 <= fp32 and fp32 >= 3
    assert bs.kvcache_gib(str(tmp_path / "missing"), "float32", 8, 512) == 4


def test_host_counters_and_disturbed_rounds():
    now = _common.host_counters()
    if os.path.exists("/proc/stat"):
        assert set(now) == {"steal_s", "iowait_s", "major_faults"} and now["steal_s"] >= 0
        assert set(_common.host_delta(now, _common.host_counters())) == set(now)
    assert _common.host_delta({}, now) == {}
    cores = os.cpu_count() or 1
    # 10 s on every core: 2 % of it stolen is the limit
    assert _common.host_disturbed({"steal_s": 0.3 * cores}, 10.0, 0.02)
    assert not _common.host_disturbed({"steal_s": 0.1 * cores}, 10.0, 0.02)
    assert not _common.host_disturbed({"steal_s": 5.0 * cores}, 10.0, 0.0)  # 0: never
    assert not _common.host_disturbed({}, 10.0, 0.02)  # no counters (not Linux)


def test_sweep_medians_leave_disturbed_rounds_out(tmp_path):
    import bench_sweep

    base = {"tokens": "1000", "layers": "2", "heads": "3", "pairs": "1", "requests": "6",
            "max_abs_diff": "1e-5", "machine": "m", "run": "r", "model": "tiny", "max_steal": "0.02"}
    rows = []
    for rnd, (sweep, plain, bad) in enumerate([(10.0, 10.0, 0), (30.0, 10.5, 1), (10.2, 9.8, 0)]):
        for m, sec in (("emosteer_vllm", sweep), ("plain_vllm", plain)):
            rows.append({**base, "method": m, "round": str(rnd), "seconds": str(sec),
                         "disturbed": str(bad), "steal_s": "3.0" if bad else "0.01"})
    rows.append({**base, "method": "hf_hooks", "round": "0", "seconds": "60", "disturbed": "0"})
    med = bench_sweep._medians(rows)
    assert med["emosteer_vllm"] == 10.1 and med["plain_vllm"] == 9.9
    text = bench_sweep.table(rows)
    assert "2 rounds (1 more run again" in text
    assert "Per round (plain seconds ÷ sweep seconds" in text and "1.000, 0.961" in text  # disturbed left out
    fresh = [dict(r, round=int(r["round"]), disturbed=int(r["disturbed"])) for r in rows]  # as a run holds them
    assert bench_sweep._medians(fresh) == med
    bench_sweep.plot(fresh, str(tmp_path / "sweep.png"))
    assert (tmp_path / "sweep.png").stat().st_size > 1000


def test_sweep_pooled_rounds(tmp_path):
    """--pool: the latest run of each CSV, its paired round ratios pooled per variant."""
    import bench_sweep
    from _common import append_csv

    cols = ("run", "method", "round", "seconds", "disturbed")

    def write(name, runs):
        for run, pairs in runs:
            append_csv([{"run": run, "method": m, "round": i, "seconds": s, "disturbed": 0}
                        for i, (sw, pl) in enumerate(pairs) for m, s in (("emosteer_vllm", sw), ("plain_vllm", pl))],
                       str(tmp_path / name), cols)
        return str(tmp_path / name)

    a = write("sweep.csv", [("old", [(20.0, 10.0)] * 3), ("new", [(10.0, 10.0), (10.0, 9.0), (10.0, 11.0)])])
    (tmp_path / "b").mkdir()
    b = write("b/sweep.csv", [("x", [(10.0, 10.5), (10.0, 9.6)])])
    c = write("sweep_aligned.csv", [("y", [(10.0, 9.0), (10.0, 9.4), (10.0, 10.2)])])
    rows = {r["variant"]: r for r in bench_sweep.pooled([a, b, c], boot=500)}
    last, al = rows["last"], rows["aligned"]
    assert (last["runs"], last["rounds"]) == (2, 5) and last["median"] == 1.0  # the old run left out
    assert last["lowest"] == 0.9 and last["highest"] == 1.1 and last["below_095"] == 1
    assert last["median_lo"] <= last["median"] <= last["median_hi"]
    assert 0.1 < last["p_all5_ge_095"] < 0.6  # 4 of 5 rounds reach 0.95: about 0.8^5
    assert (al["runs"], al["rounds"], al["below_095"]) == (1, 3, 2) and al["p_all5_ge_095"] < 0.05
    assert "5 rounds of 2 runs" in bench_sweep.pooled_line(last)
    with pytest.raises(SystemExit, match="not a sweep CSV"):  # the name says the variant
        bench_sweep.pooled([str(tmp_path / "b")])


def test_sweep_table_says_whether_both_conditions_computed_the_same_tokens():
    import bench_sweep

    base = {"tokens": "1000", "layers": "2", "heads": "3", "pairs": "1", "requests": "6",
            "max_abs_diff": "1e-5", "machine": "m", "run": "r", "model": "tiny", "disturbed": "0"}

    def rows(plain_cached):
        out = [{**base, "method": "hf_hooks", "round": "0", "seconds": "60"}]
        for rnd, pc in enumerate(plain_cached):
            out += [{**base, "method": "emosteer_vllm", "round": str(rnd), "seconds": "10", "cached_tokens": "640"},
                    {**base, "method": "plain_vllm", "round": str(rnd), "seconds": "10", "cached_tokens": str(pc)}]
        return out

    assert "served both conditions the same 640 prompt tokens every round" in bench_sweep.table(rows([640, 640]))
    text = bench_sweep.table(rows([640, 576]))
    assert "prefix-cache hits differed" in text and "plain 576–640" in text and "sweep 640," in text
    old = [{k: v for k, v in r.items() if k != "cached_tokens"} for r in rows([640])]  # runs before the column
    assert "prefix cache served" not in bench_sweep.table(old) and "differed" not in bench_sweep.table(old)
