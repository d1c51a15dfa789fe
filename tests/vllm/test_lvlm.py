"""Steering, isolation and captures on a tiny Qwen2-VL with an image (vLLM vs HF).

Needs torchvision (vLLM's Qwen2-VL imports it): installed in the environment, or a
``pip install --no-deps --target DIR torchvision==0.28.0`` named by
``EMOSTEER_TEST_TORCHVISION=DIR``. The case runs in a child process whose PYTHONPATH
holds the torchvision shim (emosteer.testing_lvlm.torchvision_env); skipped without torchvision.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from emosteer.testing_lvlm import torchvision_env

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

HERE = Path(__file__).resolve().parent


def test_qwen2_vl_with_image(engines, tmp_path_factory):
    env = torchvision_env(tmp_path_factory.mktemp("tv_shim"), str(HERE.parents[1]))
    if env is None:
        pytest.skip("torchvision not installed (pip install --no-deps torchvision==0.28.0)")
    engines.close()  # one engine at a time
    model_dir = tmp_path_factory.mktemp("lvlm") / "qwen2_vl"
    proc = subprocess.run([sys.executable, str(HERE / "lvlm_case.py"), str(model_dir)], env=env,
                          capture_output=True, text=True, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("LVLM_RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    res = json.loads(lines[-1][len("LVLM_RESULT "):])
    assert res["same_prompt_ids"], res
    assert res["empty_equals_plain"] and res["isolation"], res
    assert res["beta1_equals_plain"] and res["text_boost_is_plain"], res
    assert res["errors"] == [], res
    assert res["changed"] >= 2 and res["vee_changed"] >= 2, res
    m, got, want = res["vee_mass"]
    assert 0.0 < m < got and abs(got - want) < 1e-4, res  # beta*m / (1 + (beta-1)*m)
    assert res["text_attn_shape"][1:] == [4, 0], res  # text-only: no image, nothing to pay
    assert all(res["hf_generate_equal"]), res
    assert res["eager_mass_diff"] < 1e-5, res
    P = res["prompt_tokens"]
    assert res["capture_shape"] == [P + 5, 4, 32] and res["residual_shape"] == [P + 5, 128], res
    assert res["slots_in_use"] == 0, res
    assert res["hf_max_logprob_diff"] < 1e-4 and res["hf_max_capture_diff"] < 1e-4, res
