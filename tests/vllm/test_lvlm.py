"""Steering, isolation and captures on tiny LVLMs with an image (vLLM vs HF), one case per
family of emosteer.models.tiny_lvlm.KINDS: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA.

Needs torchvision (vLLM's Qwen-VL models and the processors import it): installed in the
environment, or a ``pip install --no-deps --target DIR torchvision==0.28.0`` named by
``EMOSTEER_TEST_TORCHVISION=DIR``. Each case runs in its own child process (two at a
time, see PARALLEL) whose PYTHONPATH holds the torchvision shim
(emosteer.models.tiny_lvlm.torchvision_env); skipped without torchvision.
"""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
from pathlib import Path

import pytest
from emosteer.models.tiny_lvlm import KINDS, torchvision_env

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
TOL = 1e-4


# Two cases at a time: one case keeps about 1.1 of this machine's 2 cores busy (engine
# start-up, Python), so two side by side take ~40 % less wall time than one after another.
PARALLEL = 2
# The kinds whose case runs vLLM's compiled graph (torch.compile) instead of eager mode:
# VEE's op inside the graph follows the boosted pairs of every step without recompiling.
COMPILED = ("llava",)


@pytest.fixture(scope="module")
def runs(engines, tmp_path_factory):
    """Every kind's case started in its own child process, PARALLEL at a time; kind ->
    future of its CompletedProcess (None without torchvision)."""
    env = torchvision_env(tmp_path_factory.mktemp("tv_shim"), str(HERE.parents[1]))
    if env is None:
        yield None
        return
    engines.close()  # no engine of the test process alongside the cases' engines
    root = tmp_path_factory.mktemp("lvlm")

    def case(kind):
        extra = ["--compiled"] if kind in COMPILED else []
        return subprocess.run([sys.executable, str(HERE / "lvlm_case.py"), str(root / kind), kind, *extra],
                              env=env, capture_output=True, text=True, timeout=900)

    with concurrent.futures.ThreadPoolExecutor(PARALLEL) as pool:
        # the compiled case (the longest) first
        yield {kind: pool.submit(case, kind) for kind in sorted(KINDS, key=lambda k: k not in COMPILED)}


@pytest.mark.parametrize("kind", list(KINDS))
def test_lvlm_with_image(kind, runs):
    if runs is None:
        pytest.skip("torchvision not installed (pip install --no-deps torchvision==0.28.0)")
    proc = runs[kind].result()
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("LVLM_RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    res = json.loads(lines[-1][len("LVLM_RESULT "):])
    assert res["same_prompt_ids"], res
    assert res["empty_equals_plain"] and res["isolation"] and res["no_poison"], res
    assert res["beta1_equals_plain"], res
    assert res["errors"] == [], res
    assert res["changed"] >= 2 and res["vee_changed"] >= 2, res
    m, got, want = res["vee_mass"]
    assert 0.0 < m < got and abs(got - want) < 1e-4, res  # beta*m / (1 + (beta-1)*m)
    assert res["text_refused"] == ["boost", "capture.attn_image"], res  # text-only: no image
    assert all(res["hf_generate_equal"]), res
    assert res["eager_layers"] == 2 and res["image_tokens"] > 0, res
    assert res["eager_mass_diff"] < 1e-5, res
    P = res["prompt_tokens"]
    assert res["capture_shape"] == [P + 5, 4, 32] and res["residual_shape"] == [P + 5, 128], res
    assert res["slots_in_use"] == 0, res
    assert res["compiled"] == (kind in COMPILED), res
    if res["compiled"]:  # compiled once at start-up; the steps changed nothing
        assert res["compiled_graphs"]["dynamo_unique_graphs"] >= 1, res
        assert res["recompiles"] == {}, res
    assert res["hf_max_logprob_diff"] < TOL, res
    # Captures: vLLM == HF at every layer, also the residual of Qwen3-VL's deepstack layers
    # (both taken after the deepstack add, which is large enough to be seen if missed).
    by_layer = res["hf_capture_diff_by_layer"]
    assert by_layer and max(by_layer.values()) < TOL, res
    if res["deepstack_layers"]:
        assert res["deepstack_max_abs"] > 100 * TOL, res
    assert res["hf_max_capture_diff"] < TOL, res
