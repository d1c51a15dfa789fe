"""Never silently wrong when the engine is not what emosteer expects (docs/DESIGN.md §5,
"Fail closed"): a worker without emosteer's hooks, vLLM's Model Runner V2, engine
features the plugin does not handle, pool rows that moved under a slot, failures in
worker processes under async scheduling.

Each engine here is started for what it proves (one at a time: the session's shared
engine is closed first).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
from vllm_support import PROMPTS, engine_env, greedy, summarize

pytestmark = pytest.mark.vllm


# -- Model Runner V2 ---------------------------------------------------------------------
def test_plugin_selects_the_v1_runner_where_triton_is_present(tiny_model, monkeypatch):
    """vLLM 0.32 picks Model Runner V2 wherever Triton imports (every CUDA install); the
    plugin's hooks live in V1, so it selects V1 unless the user chose. Here Triton is
    reported present, as on a GPU machine, and the engine config is resolved for real."""
    import vllm.config.vllm as vcfg
    from vllm.engine.arg_utils import EngineArgs

    import emosteer.vllm as plugin

    monkeypatch.setattr(vcfg, "HAS_TRITON", True)
    monkeypatch.delenv(plugin.V2_ENV, raising=False)
    config = EngineArgs(model=tiny_model, dtype="float32", max_model_len=256).create_engine_config()
    monkeypatch.delenv(plugin.V2_ENV, raising=False)  # what vLLM alone would pick
    if not config.use_v2_model_runner:
        pytest.skip("this vLLM build picks V1 on its own here (nothing for the plugin to do)")
    assert plugin.select_model_runner() is True and os.environ[plugin.V2_ENV] == "0"
    assert config.use_v2_model_runner is False
    # a user who forces V2 keeps it (the handshake then refuses steered requests)
    monkeypatch.setenv(plugin.V2_ENV, "1")
    assert plugin.select_model_runner() is False and config.use_v2_model_runner is True


def test_a_v2_runner_is_named_in_the_refusal():
    from emosteer.vllm.patches.worker_base import ready

    class ModelRunner:  # stands for vllm.v1.worker.gpu.model_runner.GPUModelRunner
        pass

    ModelRunner.__module__ = "vllm.v1.worker.gpu.model_runner"
    got = ready(SimpleNamespace(model_runner=ModelRunner(), use_v2_model_runner=True))
    assert got["ok"] is False and "Model Runner V2" in got["why"] and "VLLM_USE_V2_MODEL_RUNNER" in got["why"]
    hooked = SimpleNamespace(_emosteer=object())
    assert ready(SimpleNamespace(model_runner=hooked))["ok"] is True


# -- engine settings the plugin does not handle -----------------------------------------
def _vcfg(**over):
    pc = SimpleNamespace(pipeline_parallel_size=1, data_parallel_size=1, enable_dbo=False, use_ubatching=False)
    base = dict(speculative_config=None, kv_transfer_config=None, ec_transfer_config=None, parallel_config=pc)
    for k, v in over.items():
        if hasattr(pc, k):
            setattr(pc, k, v)
        else:
            base[k] = v
    return SimpleNamespace(**base)


@pytest.mark.parametrize("setting,value,named", [
    ("speculative_config", object(), "speculative_config"),
    ("pipeline_parallel_size", 2, "pipeline_parallel_size"),
    ("data_parallel_size", 2, "data_parallel_size"),
    ("enable_dbo", True, "enable_dbo"),
    ("kv_transfer_config", object(), "kv_transfer_config"),
])
def test_unsupported_engine_settings_are_named(setting, value, named):
    from emosteer.vllm.patches.scheduler import unsupported_engine

    assert unsupported_engine(_vcfg()) is None
    why = unsupported_engine(_vcfg(**{setting: value}))
    assert why is not None and named in why


# -- a real engine whose model runner carries no hooks ------------------------------------
_NO_HOOKS = textwrap.dedent("""
    import json, sys
    if __name__ == "__main__":
        import emosteer.vllm as plugin
        plugin.register()
        from emosteer.vllm.patches import cpu_model_runner, gpu_model_runner
        cpu_model_runner.revert(); gpu_model_runner.revert()  # the worker side left out
        import vllm
        from vllm import SamplingParams
        model, bank = sys.argv[1], sys.argv[2]
        llm = vllm.LLM(model, dtype="float32", max_model_len=256, block_size=32, seed=0,
                       enforce_eager=True)
        sp = SamplingParams(max_tokens=4, temperature=0.0)
        steered = SamplingParams(max_tokens=4, temperature=0.0,
                                 extra_args={"emosteer": {"heads": [{"layer": 0, "head": 1, "mode": "ablate"}]}})
        outs = llm.generate(["a man sits alone", "she shouts in anger"], [sp, steered], use_tqdm=False)
        status = llm.llm_engine.engine_core.engine_core.emosteer_status()  # in-process core
        print("RESULT " + json.dumps({
            "plain": [outs[0].outputs[0].finish_reason, len(outs[0].outputs[0].token_ids)],
            "steered": [outs[1].outputs[0].finish_reason, outs[1].outputs[0].stop_reason,
                        len(outs[1].outputs[0].token_ids)],
            "ready": status["ready"], "refusal": status["refusal"]}))
""")


def test_an_engine_without_runner_hooks_refuses_steered_requests_and_serves_plain(
        tiny_model, bank_path, engines, tmp_path):
    """A real engine (in-process engine core, so the test can leave the runner patches
    out): the start-up handshake finds no hooks in the worker, steered requests finish
    with an error naming the cause, plain requests are served."""
    engines.close()
    engine_env()
    script = tmp_path / "no_hooks.py"
    script.write_text(_NO_HOOKS)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    env.pop("VLLM_PLUGINS", None)
    run = subprocess.run([sys.executable, str(script), tiny_model, bank_path], env=env,
                         capture_output=True, text=True, timeout=600)
    line = next((ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, run.stdout[-3000:] + run.stderr[-3000:]
    got = json.loads(line[len("RESULT "):])
    assert got["plain"][0] in ("length", "stop") and got["plain"][1] > 0
    assert got["ready"] is False and "carries no emosteer hooks" in got["refusal"]
    reason, stop, n_tokens = got["steered"]
    assert reason == "error" and n_tokens == 0
    assert stop.startswith("emosteer: ") and "carries no emosteer hooks" in stop


# -- tensor parallel 2, small pool: worker processes and evictions ------------------------
@pytest.fixture(scope="module")
def tight(engines, tiny_model, bank_path):
    """Tensor parallel 2 (two worker processes, heads and neurons sharded by rank), 2 slots
    and 3 rows per pool kind (evictions all the time), 2 unfetched results kept per
    worker (a call with more capturing requests runs in parts). vLLM's CPU backend binds one
    worker per core here (VLLM_CPU_OMP_THREADS_BIND); it turns async scheduling off, so
    that output wrapper is tested apart below."""
    import emosteer

    engines.close()
    engine_env()
    saved = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    try:
        llm = emosteer.LLM(tiny_model, bank=bank_path, max_slots=2, enforce_eager=True, dtype="float32",
                           max_model_len=256, block_size=32, seed=0, enable_prefix_caching=False,
                           tensor_parallel_size=2,
                           additional_config={"emosteer": {"pool_rows": 3, "keep_captures": 2}})
    finally:
        if saved is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = saved
    yield llm
    try:
        llm.llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass


def test_tensor_parallel_2_matches_the_oracle(tight, tiny_model, bank_path, info):
    """Random configs (heads on both ranks' shards, residual, neurons, captures merged over
    ranks) in one batch on the TP=2 engine == the independent oracle."""
    import differential_support as ds
    from oracle import Oracle

    assert [w["tp"] for w in tight.status()] == [[0, 2], [1, 2]]
    shape = ds.Shape.of(info)
    prompts = ds.token_prompts(tight.get_tokenizer(), PROMPTS[:4])
    from emosteer.request.spec import SpecError

    def fits(case) -> bool:  # within this engine's 2 slots and 3 rows per pool kind
        if not case.config:
            return True
        try:
            n = len(case.prompt_ids)
            tight.frontend.plan(tight.frontend.check(case.config, n), n)
            return True
        except SpecError:
            return False

    cases = [c for c in ds.batch_cases(11, shape, prompts, 24, n_plain=1, n_capture_only=1, max_tokens=8)
             if fits(c)]
    assert len(cases) >= 8
    # few slots: the batch waits for them, each row still gets exactly its config
    verdicts = ds.run_batch(tight, Oracle(tiny_model, bank_path), cases)
    bad = [v for v in verdicts if not v.ok]
    assert not bad, ds.verdict_table(verdicts)


def test_more_captures_than_the_workers_keep_run_in_parts_or_fail_loudly(tight):
    """The workers park at most keep_captures (here 2) unfetched results. A call with 5
    capturing requests runs in parts and every request gets its own captures, equal to
    running it alone. When the front end lets more through than the workers keep (its
    limit raised behind their back), the requests whose captures were dropped come back
    with an error naming it; none comes back with its captures silently missing."""
    from dataclasses import replace

    import torch
    from vllm import SamplingParams

    from emosteer.llm import EmosteerRequestError

    assert tight.frontend.settings.keep_captures == 2
    tok = tight.get_tokenizer()
    prompts = [{"prompt_token_ids": tok(p)["input_ids"]} for p in PROMPTS[:5]]
    spec = {"capture": {"residual": [1], "positions": "last"}}
    sp = SamplingParams(max_tokens=2, temperature=0.0)
    outs = tight.generate(prompts, sp, steer=[spec] * 5, use_tqdm=False, raise_on_error=True)
    alone = [tight.generate([p], sp, steer=spec, use_tqdm=False, raise_on_error=True)[0] for p in prompts]
    for a, b in zip(outs, alone):
        assert a.emosteer_error is None and a.emosteer_captures is not None
        assert list(a.outputs[0].token_ids) == list(b.outputs[0].token_ids)
        assert torch.equal(a.emosteer_captures["residual"][1], b.emosteer_captures["residual"][1])
    saved = tight.frontend.settings
    tight.frontend.settings = replace(saved, keep_captures=100)
    try:
        outs = tight.generate(prompts, sp, steer=[spec] * 5, use_tqdm=False)
        with pytest.raises(EmosteerRequestError, match="dropped"):
            tight.generate(prompts, sp, steer=[spec] * 5, use_tqdm=False, raise_on_error=True)
    finally:
        tight.frontend.settings = saved
    failed = [o for o in outs if o.emosteer_error]
    assert len(failed) >= 3 and all("dropped" in o.emosteer_error for o in failed)
    assert all(o.emosteer_captures is not None for o in outs if not o.emosteer_error)
    # One request of more samples than the workers keep could never be fetched whole.
    with pytest.raises(Exception, match="keep_captures"):
        tight.generate(prompts[:1], SamplingParams(max_tokens=2, n=3, temperature=0.9, seed=1),
                       steer=spec, use_tqdm=False)


def _distinct_configs(rng: random.Random, n: int) -> list[dict]:
    """Configs whose residual pool rows differ (a fold of two vectors on one layer is its
    own row, keyed by the scales)."""
    out = []
    for i in range(n):
        layer = rng.choice([0, 1])
        if i % 3 == 0:
            out.append({"steer": [{"vector": rng.choice(["joy", "sad"]), "layers": [0, 1],
                                   "scale": round(rng.uniform(1, 3), 3)}]})
        else:
            out.append({"steer": [{"vector": "joy", "layers": [layer], "scale": round(rng.uniform(1, 3), 3)},
                                  {"vector": "sad", "layers": [layer], "scale": round(rng.uniform(-2, 2), 3)}]})
    return out


def test_a_slot_granted_again_never_reads_rows_that_moved(tight):
    """A config granted its old slot after the pool evicted its rows gets its own answer:
    the slot's tables are rewritten when the rows they point at changed."""
    rng = random.Random(7)
    x = {"steer": [{"vector": "joy", "layers": [1], "scale": 3.0}]}
    others = _distinct_configs(rng, 24)
    prompt = PROMPTS[1]

    def solo(cfg):
        out = tight.generate([prompt], greedy(), steer=cfg, use_tqdm=False)[0]
        assert out.emosteer_error is None, out.emosteer_error
        return summarize(out)

    want_x = solo(x)
    want = {i: solo(c) for i, c in enumerate(others)}
    wrong = []
    for r in range(8):
        a, b, c = others[3 * r], others[3 * r + 1], others[3 * r + 2]
        assert solo(a)["ids"] == want[3 * r]["ids"]  # churn through slot 0 and the rows
        assert solo(b)["ids"] == want[3 * r + 1]["ids"]
        pair = tight.generate([prompt, prompt], greedy(), steer=[c, x], use_tqdm=False)
        got_c, got_x = summarize(pair[0]), summarize(pair[1])
        if got_x != want_x:
            wrong.append(r)
        assert got_c["ids"] == want[3 * r + 2]["ids"]
    assert not wrong, f"X answered differently from its solo run in rounds {wrong}"
    st = tight.admission_status()
    assert st["pool_rows"]["res"] == 3 and st["slots_in_use"] == 0


def test_worker_failures_reach_the_scheduler_from_worker_processes(tight, info):
    """The workers (processes of their own, two ranks) fail a request whose vector
    contents they no longer hold: the client sees an error, never unsteered text."""
    import vllm_checks as checks

    assert tight.llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend == "mp"
    checks.check_worker_failure_is_an_error(tight, info)


def test_failures_survive_async_outputs_and_pickling():
    """Under async scheduling the runner returns a wrapper and the executor sends its
    ``get_output()`` (pickled to the scheduler's process); vLLM's shared empty output
    is never marked."""
    import pickle

    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, AsyncModelRunnerOutput, ModelRunnerOutput

    from emosteer.vllm.patches.gpu_model_runner import attach_failures

    class Wrapped(AsyncModelRunnerOutput):
        def __init__(self, out):
            self.out = out

        def get_output(self):
            return self.out

    inner = ModelRunnerOutput(req_ids=["a"], req_id_to_index={"a": 0}, sampled_token_ids=[[5]])
    wrapped = attach_failures(Wrapped(inner), {"a": "no longer held"})
    sent = pickle.loads(pickle.dumps(wrapped.get_output()))
    assert sent._emosteer_failed == {"a": "no longer held"} and sent.sampled_token_ids == [[5]]
    empty = attach_failures(EMPTY_MODEL_RUNNER_OUTPUT, {"b": "x"})
    assert empty._emosteer_failed == {"b": "x"}
    assert getattr(EMPTY_MODEL_RUNNER_OUTPUT, "_emosteer_failed", None) is None
    twice = attach_failures(empty, {"c": "y"})
    assert twice._emosteer_failed == {"b": "x", "c": "y"}


def test_a_result_key_claimed_again_never_gets_an_earlier_requests_results(tight):
    """Results are filed under the key bound to its claim: when the front end has
    forgotten a key (fetched, or expired after 2 x capture_ttl_s) while an earlier
    request's results are still parked in the workers, a new request claiming the key
    gets its own results, never the earlier ones."""
    import uuid

    key = uuid.uuid4().hex
    first = greedy(max_tokens=2)
    first.extra_args = {"emosteer": {"capture": {"residual": [1], "positions": "generated"}},
                        "emosteer_key": key}
    tight.llm.generate([PROMPTS[0]], first, use_tqdm=False)  # parked, never fetched
    tight.frontend.release_key(key)  # as if it had expired in the front end
    # A second request under the same key that captures nothing: nothing to hand out.
    second = greedy(max_tokens=4)
    second.extra_args = {"emosteer": {"steer": [{"vector": "joy", "layers": [0], "scale": 1.0}]},
                         "emosteer_key": key}
    tight.llm.generate([PROMPTS[3]], second, use_tqdm=False)
    assert tight._fetch([key]) == {}, "handed the first request's parked captures"
    # and one that captures: its own rows
    tight.frontend.release_key(key)
    third = greedy(max_tokens=6)
    third.extra_args = {"emosteer": {"capture": {"residual": [1], "positions": "all"}},
                        "emosteer_key": key}
    out = tight.llm.generate([PROMPTS[3]], third, use_tqdm=False)[0]
    got = tight._fetch([key])[key]["captures"]
    n = len(out.prompt_token_ids) + len(out.outputs[0].token_ids) - 1
    assert got["positions"] == list(range(n)), got["positions"]
