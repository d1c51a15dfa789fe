"""The real OpenAI server on loopback, under a flood of distinct configs.

Two servers of the tiny Llama with the plugin: ``cached`` (prefix caching on,
``max_slots`` 4) and ``reference`` (prefix caching off, the answer a config must get).
4 x max_slots distinct configs with prompts of several KV blocks are sent at once: every
answer equals the reference's, none is the unsteered text; afterwards each config alone
equals it too (nothing unsteered was cached under a steering salt) and every slot is
free. Bounded: every request and wait has a timeout.
"""

from __future__ import annotations

import concurrent.futures as cf
import json

from vllm_support import LONG_PROMPT, SERVER_SLOTS


def _text(status_body) -> str:
    status, body = status_body
    assert status == 200, body
    return body["choices"][0]["text"]


def test_flood_of_distinct_configs_waits_never_unsteered(servers):
    cached, reference = servers
    n = 4 * SERVER_SLOTS
    cfgs = [{"steer": [{"vector": "joy", "layers": [0, 1], "scale": 1.5 + 0.5 * i}],
             "heads": [{"layer": i % 2, "head": i % 4, "mode": "add", "vector": "joy.h", "scale": 1.0}]}
            for i in range(n)]
    prompts = [f"{LONG_PROMPT} ({i % 2})" for i in range(n)]  # 3+ KV blocks of 32 tokens
    want = [_text(reference.complete(p, c)) for p, c in zip(prompts, cfgs)]
    plain = {p: _text(reference.complete(p, None)) for p in set(prompts)}
    assert all(w != plain[p] for w, p in zip(want, prompts)), "the test's configs must change the text"
    with cf.ThreadPoolExecutor(max_workers=n) as pool:
        got = list(pool.map(lambda pc: cached.complete(*pc), zip(prompts, cfgs)))
    assert [_text(g) for g in got] == want
    # Alone afterwards, with the flood's blocks in the prefix cache: still the same.
    assert [_text(cached.complete(p, c)) for p, c in zip(prompts, cfgs)] == want
    # Plain requests after the flood: bit-identical text to the reference's.
    assert {p: _text(cached.complete(p, None)) for p in set(prompts)} == plain


def test_bad_config_is_400_naming_the_field_and_server_goes_on(servers):
    cached, _ = servers
    status, body = cached.complete("Hello", {"steer": [{"vector": "nope", "layers": [0], "scale": 1.0}]})
    assert status == 400 and "steer[0].vector" in json.dumps(body)
    status, body = cached.post("/v1/completions", {"model": cached.model, "prompt": "Hi", "max_tokens": 2,
                                                   "vllm_xargs": {"emosteer_grant": "{}"}})
    assert status == 400 and "emosteer_grant" in json.dumps(body)
    status, body = cached.complete("Hello", {"capture": {"heads": [0]}})
    assert status == 400 and "capture" in json.dumps(body) and "HTTP" in json.dumps(body)
    assert _text(cached.complete("Hello", None))
