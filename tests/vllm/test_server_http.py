"""emosteer's HTTP routes on the real server (``emosteer serve``, loopback, API key):
vectors registered, replaced and removed while requests run, captures fetched by key,
GGUF control vectors, and the reliability catalogue (every malformed config and upload
answered 4xx naming the field, after which the server answers plain requests
bit-identically and holds nothing). Shares the two servers of ``test_server.py``."""

from __future__ import annotations

import concurrent.futures as cf
import json
import threading
import uuid

import pytest
import torch
from malformed import CONFIGS, uploads
from vllm_support import PROMPTS, Server


def _text(status_body) -> str:
    status, body = status_body
    assert status == 200, body
    return body["choices"][0]["text"]


def _upload(server: Server, bank_or_bytes, **params):
    from urllib.parse import urlencode

    data = bank_or_bytes if isinstance(bank_or_bytes, bytes) else bank_or_bytes.to_bytes()
    path = "/v1/emosteer/vectors" + (("?" + urlencode(params)) if params else "")
    status, raw = server.request("POST", path, data)
    return status, json.loads(raw or b"{}")


def _residual(info, seed: int, scale: float = 2.0):
    from emosteer.request.bank import VectorBank

    g = torch.Generator().manual_seed(seed)
    return torch.randn(info.num_layers, info.hidden_size, generator=g) * scale


def _bank(info, name: str, tensor, kind: str = "residual"):
    from emosteer.request.bank import VectorBank

    b = VectorBank(info)
    b.add(name, kind, tensor)
    return b


def _steer(name: str) -> dict:
    return {"steer": [{"vector": name, "layers": [0, 1], "scale": 1.0}]}


def _assert_idle(server: Server) -> None:
    a = server.admission()
    assert a["slots_in_use"] == 0 and a["waiting_for_slots"] == 0, a
    assert a["capture_rows_in_use"] == 0 and not any(a["pool_rows_in_use"].values()), a


def _plain(server: Server) -> dict:
    out = {}
    for p in PROMPTS[:4]:
        status, body = server.complete(p, None, logprobs=2)
        assert status == 200, body
        c = body["choices"][0]
        out[p] = (c["text"], c["logprobs"])
    return out


@pytest.fixture(scope="module")
def plain_before(servers):
    """Plain answers (text and logprobs) of the cached server before this module's
    tests, asked twice so both are prefix-cache hits like the answers compared later."""
    cached, _ = servers
    _plain(cached)
    return _plain(cached)


def test_routes_need_the_api_key(servers, plain_before):
    cached, _ = servers
    for method, path in (("GET", "/v1/emosteer/status"), ("GET", "/v1/emosteer/vectors"),
                         ("POST", "/v1/emosteer/vectors"), ("DELETE", "/v1/emosteer/vectors/joy"),
                         ("GET", "/v1/emosteer/captures/abc")):
        status, _ = cached.request(method, path, b"x" if method == "POST" else None, api_key=None)
        assert status == 401, (method, path)
        status, _ = cached.request(method, path, b"x" if method == "POST" else None, api_key="wrong")
        assert status == 401, (method, path)
    status, body = cached.get("/v1/emosteer/status")
    assert status == 200 and "joy" in body["bank"] and body["admission"]["max_slots"] == 4


def test_vector_lifecycle_upload_list_steer_delete(servers, info):
    cached, reference = servers
    bank = _bank(info, "http.up", _residual(info, 1))
    for s in servers:
        status, body = _upload(s, bank)
        assert status == 201 and body["registered"] == ["http.up"], body
    status, listing = cached.get("/v1/emosteer/vectors")
    entry = next(v for v in listing["vectors"] if v["name"] == "http.up")
    assert entry["kind"] == "residual" and entry["shape"] == [info.num_layers, info.hidden_size]
    assert entry["hash"] == bank.content_hash("http.up")
    assert listing["model"]["hidden_size"] == info.hidden_size
    prompt = PROMPTS[0]
    steered = _text(cached.complete(prompt, _steer("http.up")))
    assert steered == _text(reference.complete(prompt, _steer("http.up")))
    assert steered != _text(cached.complete(prompt, None))
    for s in servers:
        status, body = s.request("DELETE", "/v1/emosteer/vectors/http.up")
        assert status == 200, body
    status, body = cached.complete(prompt, _steer("http.up"))
    assert status == 400 and "steer[0].vector" in json.dumps(body)
    status, body = cached.request("DELETE", "/v1/emosteer/vectors/http.up")
    assert status == 404 and b"http.up" in body
    _assert_idle(cached)


def test_replacing_a_vector_under_load_never_mixes_versions(servers, info):
    """Each request runs with exactly the contents registered when it was accepted:
    while ``v1`` is replaced by ``v2`` mid-flood, every answer is v1's or v2's."""
    cached, reference = servers
    v1, v2 = _bank(info, "http.rep", _residual(info, 2)), _bank(info, "http.rep", _residual(info, 3))
    prompts = [f"{p} ({i})" for i, p in enumerate(PROMPTS)] * 3
    assert _upload(reference, v1)[0] == 201
    want1 = {p: _text(reference.complete(p, _steer("http.rep"))) for p in set(prompts)}
    assert _upload(reference, v2)[0] == 201
    want2 = {p: _text(reference.complete(p, _steer("http.rep"))) for p in set(prompts)}
    assert all(want1[p] != want2[p] for p in want1), "the two versions must give other text"
    assert _upload(cached, v1)[0] == 201
    started = threading.Event()

    def send(p):
        started.set()
        return p, cached.complete(p, _steer("http.rep"))

    with cf.ThreadPoolExecutor(max_workers=8) as pool:
        futs = [pool.submit(send, p) for p in prompts]
        started.wait(timeout=60)
        assert _upload(cached, v2)[0] == 201
        got = [f.result(timeout=300) for f in futs]
    for p, answer in got:
        assert _text(answer) in (want1[p], want2[p])
    assert all(_text(cached.complete(p, _steer("http.rep"))) == want2[p] for p in set(prompts))
    _assert_idle(cached)


def test_captures_are_fetched_once_by_key(servers, info):
    cached, reference = servers
    cfg = {"steer": [{"vector": "joy", "layers": [1], "scale": 1.0}],
           "capture": {"heads": [0, 1], "residual": [1], "positions": "all"}}
    got = {}
    for name, s in (("cached", cached), ("reference", reference)):
        key = uuid.uuid4().hex
        _text(s.complete(PROMPTS[1], cfg, key=key))
        status, body = s.get(f"/v1/emosteer/captures/{key}?wait=10")
        assert status == 200 and body["error"] is None, body
        got[name] = body
        status, again = s.get(f"/v1/emosteer/captures/{key}")
        assert status == 404 and key in again["error"]["message"]
    c, r = got["cached"], got["reference"]
    P = len(c["positions"])
    assert c["positions"] == list(range(P)) and P > 3
    heads = torch.tensor(c["heads"]["0"])
    assert heads.shape == (P, info.num_heads, info.head_dim) and heads.abs().sum() > 0
    assert torch.tensor(c["residual"]["1"]).shape == (P, info.hidden_size)
    # a text prompt has no image: an attention-to-image capture is refused naming the field
    status, body = cached.complete(PROMPTS[1], {**cfg, "capture": {"attn_image": [0]}}, key=uuid.uuid4().hex)
    assert status == 400 and "capture.attn_image" in body["error"]["message"], body
    for kind in ("heads", "residual"):
        for layer in c[kind]:
            torch.testing.assert_close(torch.tensor(c[kind][layer]), torch.tensor(r[kind][layer]),
                                       rtol=1e-5, atol=1e-5)
    # safetensors: the same numbers
    from safetensors.torch import load

    key = uuid.uuid4().hex
    _text(cached.complete(PROMPTS[1], cfg, key=key))
    status, raw = cached.request("GET", f"/v1/emosteer/captures/{key}?format=safetensors&wait=10")
    assert status == 200
    tensors = load(raw)
    torch.testing.assert_close(tensors["heads.0"], torch.tensor(c["heads"]["0"]), rtol=1e-5, atol=1e-5)
    _assert_idle(cached)


def test_result_keys_are_checked_and_never_shared(servers):
    cached, _ = servers
    cfg = {"capture": {"residual": [0]}}
    key = uuid.uuid4().hex
    _text(cached.complete(PROMPTS[2], cfg, key=key))
    status, body = cached.complete(PROMPTS[3], cfg, key=key)  # unfetched: still in use
    assert status == 400 and "emosteer_key" in json.dumps(body) and "in use" in json.dumps(body)
    assert cached.get(f"/v1/emosteer/captures/{key}?wait=10")[0] == 200
    _text(cached.complete(PROMPTS[3], cfg, key=key))  # fetched: free again
    status, body = cached.get(f"/v1/emosteer/captures/{key}?wait=10")
    assert status == 200 and len(body["positions"]) == 1
    assert cached.get("/v1/emosteer/captures/..%2F..%2Fetc")[0] in (400, 404)
    assert cached.get("/v1/emosteer/captures/never-sent")[0] == 404
    status, body = cached.get(f"/v1/emosteer/captures/{key}?format=xml")
    assert status == 400 and body["error"]["param"] == "format"


def test_n2_captures_per_sample(servers):
    cached, _ = servers
    key = uuid.uuid4().hex
    status, body = cached.complete(PROMPTS[4], {"capture": {"residual": [1], "positions": "generated"}},
                                   key=key, n=2, temperature=0.9, seed=3)
    assert status == 200 and len(body["choices"]) == 2
    status, got = cached.get(f"/v1/emosteer/captures/{key}?wait=10")
    assert status == 200 and len(got["samples"]) == 2, got
    assert [s["key"] for s in got["samples"]] == [f"{key}#0", f"{key}#1"]
    assert all(len(s["positions"]) >= 1 for s in got["samples"])


def test_dropped_samples_get_an_error_never_a_silent_null(servers):
    """``reference`` keeps 2 unfetched results. A request of n=3 with a key could never
    have all its results fetched: 400 naming ``n``. An n=2 request whose first-parked
    sample is pushed out by a later request: that sample comes back with an error naming
    the limit, the other with its captures."""
    _, reference = servers
    cap = {"capture": {"residual": [1], "positions": "generated"}}
    status, body = reference.complete(PROMPTS[4], cap, key=uuid.uuid4().hex, n=3, temperature=0.9, seed=3)
    assert status == 400 and body["error"]["param"] == "emosteer.n" and "keep_captures" in body["error"]["message"], body
    first, second = uuid.uuid4().hex, uuid.uuid4().hex
    status, _ = reference.complete(PROMPTS[4], cap, key=first, n=2, temperature=0.9, seed=3)
    assert status == 200
    assert reference.complete(PROMPTS[5], cap, key=second)[0] == 200  # a third parked result
    status, got = reference.get(f"/v1/emosteer/captures/{first}?wait=10")
    assert status == 200 and len(got["samples"]) == 2, got
    lost = [s for s in got["samples"] if s["error"]]
    kept = [s for s in got["samples"] if not s["error"]]
    assert len(lost) == 1 and "dropped" in lost[0]["error"] and "keep_captures" in lost[0]["error"]
    assert lost[0]["positions"] == [] and len(kept) == 1 and len(kept[0]["positions"]) >= 1
    status, got = reference.get(f"/v1/emosteer/captures/{second}?wait=10")
    assert status == 200 and got["error"] is None and len(got["positions"]) >= 1


def test_gguf_control_vector_steers_like_the_same_bank_vector(servers, info, tmp_path):
    from emosteer.request.controlvec import save_control_vector

    cached, _ = servers
    vec = _residual(info, 4, scale=2.0)
    vec[0] = 0  # llama.cpp's layout has no direction for layer 0 (docs/CONTROL_VECTORS.md)
    bank = _bank(info, "cv.src", vec)
    path = tmp_path / "cv.gguf"
    save_control_vector(bank, "cv.src", path, model_hint="llama")
    assert _upload(cached, bank)[0] == 201
    status, body = _upload(cached, path.read_bytes(), name="cv.gguf")
    assert status == 201 and body["registered"] == ["cv.gguf"], body
    from_bank = _text(cached.complete(PROMPTS[5], _steer("cv.src")))
    from_gguf = _text(cached.complete(PROMPTS[5], _steer("cv.gguf")))
    assert from_gguf == from_bank != _text(cached.complete(PROMPTS[5], None))
    for name in ("cv.src", "cv.gguf"):
        assert cached.request("DELETE", f"/v1/emosteer/vectors/{name}")[0] == 200


def test_inline_vector_over_http_steers_like_the_registered_one(servers, info):
    """vllm_xargs.emosteer carrying its vector (base64) == the same vector registered; a
    gated relative config runs; a bad inline payload is a 400 naming the field."""
    from emosteer.client import inline_vector

    cached, _ = servers
    vec = _residual(info, 6, scale=2.0)
    assert _upload(cached, _bank(info, "inl.src", vec))[0] == 201
    inline = {"steer": [{"vector": inline_vector(vec[[0, 1]]), "layers": [0, 1], "scale": 1.0}]}
    assert _text(cached.complete(PROMPTS[4], inline)) == _text(cached.complete(PROMPTS[4], _steer("inl.src")))
    status, body = cached.complete(PROMPTS[4], {"steer": [{"vector": {"data": "%%", "dtype": "float32"},
                                                            "layers": [0], "scale": 1.0}]})
    assert status == 400 and "steer[0].vector.data" in json.dumps(body), body
    assert cached.request("DELETE", "/v1/emosteer/vectors/inl.src")[0] == 200
    _assert_idle(cached)


@pytest.mark.parametrize("what,xargs,words", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_malformed_config_is_400_naming_the_field(servers, what, xargs, words):
    cached, _ = servers
    status, body = cached.post("/v1/completions", {"model": cached.model, "prompt": PROMPTS[0],
                                                   "max_tokens": 4, "vllm_xargs": xargs})
    assert status == 400, (what, status, body)
    message = body["error"]["message"]
    assert all(w in message for w in words), (what, message)


def test_malformed_uploads_are_4xx_naming_what(servers, info):
    cached, _ = servers
    before = cached.get("/v1/emosteer/vectors")[1]
    cases = uploads(info)
    assert len(cases) >= 10
    for what, params, body, words in cases:
        status, got = _upload(cached, body, **params)
        assert status == 400, (what, status, got)
        assert all(w in got["error"]["message"] for w in words), (what, got)
    status, got = _upload(cached, bytes(2 * 2**20))  # the server runs with --upload-mib 1
    assert status == 413 and "upload_mib" in got["error"]["message"]
    assert cached.get("/v1/emosteer/vectors")[1] == before


def test_after_the_catalogue_plain_answers_are_bit_identical_and_nothing_is_held(servers, plain_before):
    """Runs after the malformed tests (same module, file order)."""
    cached, _ = servers
    assert _plain(cached) == plain_before
    _assert_idle(cached)
    status, st = cached.get("/v1/emosteer/status")
    assert all(w["requests"] == 0 for w in st["workers"]), st


def test_client_salts_cannot_impersonate_the_plugin(servers):
    """A client ``cache_salt`` can neither write KV under a steered config's cache
    identity (poison) nor read its KV: salts holding the plugin's reserved prefix are
    refused, and the plugin's key is not a salt at all (it lives in the private plan)."""
    cached, reference = servers
    cfg = {"steer": [{"vector": "joy", "layers": "all", "scale": 2.0, "positions": "prompt"}]}
    prompt = " ".join(PROMPTS[:5])  # more than one 32-token block
    for salt in ("emosteer@0:" + "0" * 64, "tenant-3|emosteer@31:abc"):
        for c in (None, cfg):
            status, body = cached.complete(prompt, c, cache_salt=salt)
            assert status == 400, body
            # vLLM's server already refuses "@" in salts; emosteer refuses the prefix on
            # every path (offline too: vllm_checks.check_prefix_cache)
            assert body["error"]["param"] == "cache_salt", body
    want_steered = _text(reference.complete(prompt, cfg))
    want_plain = _text(reference.complete(prompt, None))
    # plain KV under any client salt, then the steered config: its own answer
    for salt in (None, "tenant-1", "emosteer", "0" * 64):
        extra = {} if salt is None else {"cache_salt": salt}
        assert _text(cached.complete(prompt, None, **extra)) == want_plain
    assert _text(cached.complete(prompt, cfg)) == want_steered
    # and the reverse: after the steered request, plain requests read only plain KV
    for salt in (None, "tenant-1"):
        extra = {} if salt is None else {"cache_salt": salt}
        assert _text(cached.complete(prompt, None, **extra)) == want_plain
    assert _text(cached.complete(prompt, cfg, cache_salt="tenant-1")) == want_steered
    _assert_idle(cached)
