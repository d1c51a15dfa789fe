"""`emosteer generate` on a real engine: steered rows, and resuming after a crash."""

from __future__ import annotations

import json

import pytest
from vllm_support import assert_no_slots_held

from emosteer.apps.generate import GenerateConfig, done_ids, generate_jsonl

pytestmark = pytest.mark.vllm

ROWS = [
    {"id": "a", "prompt": "Describe the scene: a child on a sunny beach.", "emotion": "joy"},
    {"id": "b", "prompt": "Describe the scene: a man alone in the rain.", "emotion": "joy",
     "steer": {"steer": [{"vector": "joy", "layers": [0, 1], "scale": 4.0}]}},
    {"id": "c", "prompt": "A person stands in a room.", "emotion": "sadness",
     "steer": {"steer": [{"vector": "sad", "layers": [1], "scale": 2.0, "positions": "generated"}]}},
    {"id": "d", "prompt": "A cup of tea on a table."},
    {"id": "e", "prompt": "The dark forest at night.", "emotion": "fear",
     "steer": {"neurons": {"set": "joy.ena", "gamma": 3.0}}},
]


@pytest.fixture(scope="module")
def llm(engines):
    return engines.get("eager")


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_generate_then_resume_after_torn_write(llm, tmp_path):
    src = tmp_path / "in.jsonl"
    _write(src, ROWS)
    cfg = GenerateConfig(max_tokens=8, batch_size=2)

    full = tmp_path / "full.jsonl"
    assert generate_jsonl(src, full, cfg, llm=llm, progress=False) == len(ROWS)
    rows = [json.loads(x) for x in full.read_text().splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in ROWS]
    for r, src_row in zip(rows, ROWS):
        assert r["prompt"] == src_row["prompt"] and r.get("steer") == src_row.get("steer")
        assert isinstance(r["narrative"], str) and r["n_tokens"] > 0
        assert (r["hit_rate"] is None) or (0.0 <= r["hit_rate"] <= 1.0)
        assert -1.0 <= r["valence"] <= 1.0
        assert 0.0 <= r["repeated_3gram"] <= 1.0 and 0.0 <= r["distinct_2"] <= 1.0
    # Steering changed what the steered rows generated, relative to a plain run.
    plain_src = tmp_path / "plain_in.jsonl"
    _write(plain_src, [{k: v for k, v in r.items() if k != "steer"} for r in ROWS])
    plain = tmp_path / "plain.jsonl"
    generate_jsonl(plain_src, plain, cfg, llm=llm, progress=False)
    plain_rows = [json.loads(x) for x in plain.read_text().splitlines()]
    assert rows[0]["narrative"] == plain_rows[0]["narrative"]  # unsteered row: same text
    assert rows[1]["narrative"] != plain_rows[1]["narrative"]
    # perplexity under the UNSTEERED model: the same text scores the same, steered or not
    for r in rows + plain_rows:
        assert r["perplexity"] is not None and r["perplexity"] >= 1.0
    assert abs(rows[0]["perplexity"] - plain_rows[0]["perplexity"]) <= 1e-4 * plain_rows[0]["perplexity"]
    quiet = tmp_path / "quiet.jsonl"
    generate_jsonl(src, quiet, GenerateConfig(max_tokens=8, batch_size=2, perplexity=False), llm=llm,
                   progress=False)
    assert all(json.loads(x)["perplexity"] is None for x in quiet.read_text().splitlines())

    # A crash after two rows, in the middle of writing the third.
    resumed = tmp_path / "resumed.jsonl"
    lines = full.read_text().splitlines(keepends=True)
    resumed.write_text(lines[0] + lines[1] + lines[2][: len(lines[2]) // 2])
    assert done_ids(resumed) == {"a", "b"}  # the torn row is cut off, not counted
    assert generate_jsonl(src, resumed, cfg, llm=llm, progress=False) == len(ROWS) - 2
    # nothing lost, nothing duplicated (perplexities: floats of a batched pass, 1e-4)
    got_rows = [json.loads(x) for x in resumed.read_text().splitlines()]
    assert [r["id"] for r in got_rows] == [r["id"] for r in rows]
    for g, w in zip(got_rows, rows):
        assert {**g, "perplexity": 0} == {**w, "perplexity": 0}
        assert abs(g["perplexity"] - w["perplexity"]) <= 1e-4 * w["perplexity"]
    assert generate_jsonl(src, resumed, cfg, llm=llm, progress=False) == 0
    assert_no_slots_held(llm)


def test_bad_row_is_refused_before_generation(llm, tmp_path):
    src = tmp_path / "in.jsonl"
    _write(src, ROWS[:1] + [{"id": "x", "prompt": "p", "steer": {"steer": [{"vector": "joy"}]}}])
    out = tmp_path / "out.jsonl"
    with pytest.raises(ValueError, match=r"row 'x'.*steer\[0\]"):
        generate_jsonl(src, out, GenerateConfig(max_tokens=4), llm=llm, progress=False)
    assert not out.exists()


def test_preset_steers_rows_without_steer(llm, tmp_path):
    """A bank preset fills the rows without "steer" (the row records its name); rows with
    their own config keep it; the narratives equal those of the explicit config."""
    cfg_joy = {"steer": [{"vector": "joy", "layers": [0, 1], "scale": 4.0}]}
    rows = [{"id": "p1", "prompt": ROWS[0]["prompt"]}, {"id": "p2", "prompt": ROWS[3]["prompt"]},
            {"id": "own", "prompt": ROWS[2]["prompt"], "steer": ROWS[2]["steer"]}]
    src = tmp_path / "in.jsonl"
    _write(src, rows)
    from emosteer.request.spec import SteerSpec

    preset_cfg = SteerSpec.parse(cfg_joy).to_dict()
    out = tmp_path / "preset.jsonl"
    generate_jsonl(src, out, GenerateConfig(max_tokens=8, preset="joy.preset", preset_config=preset_cfg),
                   llm=llm, progress=False)
    got = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert got["p1"]["preset"] == "joy.preset" and got["p1"]["steer"] == preset_cfg
    assert "preset" not in got["own"] and got["own"]["steer"] == ROWS[2]["steer"]
    explicit = tmp_path / "explicit.jsonl"
    _write(explicit, [{**r, "steer": cfg_joy} if "steer" not in r else r for r in rows])
    ref = tmp_path / "ref.jsonl"
    generate_jsonl(explicit, ref, GenerateConfig(max_tokens=8), llm=llm, progress=False)
    want = {r["id"]: r for r in map(json.loads, ref.read_text().splitlines())}
    assert all(got[k]["narrative"] == want[k]["narrative"] for k in got)
