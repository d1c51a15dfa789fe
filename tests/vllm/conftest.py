"""Fixtures for the vLLM plugin tests: the tiny Llama, a bank, one engine at a time
(see vllm_support.Engines), and the plain-vLLM reference outputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_support import LONG_PROMPT, MAX_TOKENS, PROMPTS, Engines, make_bank, summarize


# The order of the engine-using modules: one engine lives at a time (Engines), and a
# server pair, once up, stays up to the end of the session. Grouping the modules by
# the engine they use starts each engine once instead of at every switch (a compiled
# start is about 50 s on a 2-core machine, an eager one about 25 s); the shared servers
# come last. Modules not listed keep their place between the groups.
_MODULE_ORDER = {
    # the eager engine, then (test_aligned_patch's last test) the compiled one
    "test_eager": 0, "test_generate": 0, "test_inline_and_modes": 0, "test_aligned_patch": 1,
    "test_compiled": 2, "test_compiled_differential": 2, "test_steer_modes": 2,
    # their own engines (or Ray actors' engines)
    "test_ray": 3,
    # the shared server pair (session-scoped)
    "test_api": 9, "test_playground": 9, "test_readme_server": 9, "test_server": 9,
    "test_server_http": 9, "test_server_soak": 9,
}


def pytest_collection_modifyitems(session, config, items):
    """Sort the tests of this directory by ``_MODULE_ORDER`` (stable: the order inside a
    module, and of modules in one group, is pytest's own)."""
    here = Path(__file__).resolve().parent
    mine = [i for i, it in enumerate(items) if Path(str(it.fspath)).resolve().parent == here]
    if not mine:
        return
    ranked = sorted((items[i] for i in mine), key=lambda it: _MODULE_ORDER.get(Path(str(it.fspath)).stem, 5))
    for i, it in zip(mine, ranked):
        items[i] = it


@pytest.fixture(scope="session")
def tiny_model():
    """The tiny Llama at a stable path keyed by the builder's source: vLLM's compile
    cache is keyed by the model path, so a fixed path lets the compiled engine reload
    its graph instead of compiling again in every session (minutes on a small CPU)."""
    import hashlib
    import inspect
    import tempfile
    from pathlib import Path

    from emosteer.models import tiny as testing

    tag = hashlib.sha256(inspect.getsource(testing).encode()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / "emosteer-test-models" / f"tiny_llama-{tag}"
    return str(testing.build_tiny_llama(path))


@pytest.fixture(scope="session")
def info(tiny_model):
    from transformers import AutoConfig

    from emosteer.request.bank import ModelInfo

    return ModelInfo.from_hf_config(AutoConfig.from_pretrained(tiny_model))


@pytest.fixture(scope="session")
def bank(info):
    """make_bank's vectors plus the probes (and the project-out vector) the residual-mode
    and gate tests draw (differential_support.add_gate_entries)."""
    from differential_support import add_gate_entries

    return add_gate_entries(make_bank(info), info)


@pytest.fixture(scope="session")
def bank_path(bank, tiny_model):
    path = f"{tiny_model}.bank.safetensors"
    bank.save(path)
    return str(path)


@pytest.fixture(scope="session")
def engines(tiny_model, bank_path):
    e = Engines(tiny_model, bank_path)
    yield e
    e.close()


@pytest.fixture(scope="session")
def plain_reference(engines):
    """Token ids and first-token logprobs of plain vLLM (plugin not loaded) per prompt."""
    from vllm import SamplingParams

    llm = engines.get("plain")
    sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=5)
    outs = llm.generate(PROMPTS + [LONG_PROMPT], sp, use_tqdm=False)
    ref = {o.prompt: summarize(o) for o in outs}
    engines.close()
    return ref


@pytest.fixture(scope="module")
def oracle(tiny_model, bank_path):
    """The independent oracle (tests/vllm/oracle.py: plain transformers + hooks, sharing
    no code with the compiler or the engine)."""
    from oracle import Oracle

    return Oracle(tiny_model, bank_path)


@pytest.fixture(scope="session")
def servers(tiny_model, bank_path, tmp_path_factory, engines):
    """Two ``emosteer serve`` servers of the tiny Llama, shared by the server test
    modules: ``cached`` (prefix caching on, max_slots 4) and ``reference`` (prefix
    caching off: the answer a config must get; keep_captures 2)."""
    from vllm_support import Server

    engines.close()  # one engine at a time on this small machine, besides these two
    logs = tmp_path_factory.mktemp("servers")
    cached = Server(tiny_model, bank_path, True, str(logs / "cached.log"), extra=("--upload-mib", "1"))
    # keep_captures 2: test_server_http checks what a client sees when results are dropped.
    reference = Server(tiny_model, bank_path, False, str(logs / "reference.log"),
                       extra=("--additional-config", '{"emosteer": {"keep_captures": 2}}'))
    try:
        cached.wait_ready()
        reference.wait_ready()
        yield cached, reference
    finally:
        cached.close()
        reference.close()
