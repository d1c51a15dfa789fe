"""The prefix cache's identity, on vLLM's own block hasher (no engine).

Block hashes are chained, so a key mixed into block k changes k and everything after it.
These tests hash requests' blocks with vLLM's ``get_request_block_hasher`` (patched by the
plugin) and check which blocks a config shares with which request: the rule of
docs/DESIGN.md §4 ("What the prefix cache shares"), derived from the compiled program.
The engine-level contracts (warm == cold for conversations and longer prompts, no reuse
of a steered reply) are in ``vllm_checks.check_prefix_cache`` and test_compiled_differential.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from emosteer.request.bank import ModelInfo, VectorBank  # noqa: E402
from emosteer.request.compile import compile_request  # noqa: E402
from emosteer.request.positions import block_identity, program_at  # noqa: E402
from emosteer.request.spec import SteerSpec  # noqa: E402
from emosteer.vllm.patches import prefix_cache  # noqa: E402

BS = 16
P = 70  # prompt tokens: blocks 0..3 full (64 tokens), 6 left over
INFO = ModelInfo("LlamaForCausalLM", num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=2, head_dim=16,
                 intermediate_size=64)


@pytest.fixture(scope="module")
def bank() -> VectorBank:
    g = torch.Generator().manual_seed(0)
    b = VectorBank(INFO)
    b.add("joy", "residual", torch.randn(2, 32, generator=g))
    b.add("joy.h", "head", torch.randn(2, 2, 16, generator=g))
    return b


def _identity(cfg, bank, n_prompt: int = P):
    if cfg is None:
        return None
    spec = SteerSpec.parse(cfg)
    spec.validate(bank, INFO, n_prompt)
    return compile_request(spec.resolve(INFO), bank, INFO, n_prompt).cache_identity(n_prompt)


def _hashes(ident, n_tokens: int = P, n_prompt: int = P, salt: str | None = None) -> list:
    """Block hashes of a request whose first ``n_prompt`` of ``n_tokens`` tokens are its
    prompt (the rest generated), with emosteer's cache identity ``ident``."""
    from vllm.utils.hashing import sha256
    from vllm.v1.core import kv_cache_utils as kcu

    kcu.init_none_hash(sha256)
    extra = {} if ident is None else {"emosteer_plan": {"cache": ident}}
    req = SimpleNamespace(lora_request=None, mm_features=[], prompt_embeds=None, cache_salt=salt,
                          all_token_ids=list(range(100, 100 + n_tokens)), num_tokens=n_tokens,
                          num_prompt_tokens=n_prompt, sampling_params=SimpleNamespace(extra_args=extra),
                          block_hashes=[], _prompt_embeds_per_block_hashes={})
    return kcu.get_request_block_hasher(BS, sha256)(req)


@pytest.fixture(autouse=True, scope="module")
def patched():
    prefix_cache.apply()
    yield


def _shared(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def steer(positions):
    return {"steer": [{"vector": "joy", "layers": 0, "scale": 1.0, "positions": positions}]}


@pytest.mark.parametrize("positions,shared_blocks", [
    ("all", 0), ("prompt", 0), ([0], 0), ([15], 0), ([16], 1), ([40, 63], 2), ("last", 4),
    ("generated", 4),
])
def test_blocks_before_the_first_steered_position_are_shared_with_plain(bank, positions, shared_blocks):
    plain = _hashes(None)
    steered = _hashes(_identity(steer(positions), bank))
    assert len(plain) == len(steered) == P // BS
    assert _shared(plain, steered) == shared_blocks


# A conversation: turn B's prompt is turn A's prompt + A's reply + more. A's blocks past
# its prompt were computed as generated tokens; B reads them as prompt tokens.
A_PROMPT, A_TOTAL, B_PROMPT = 38, 38 + 48, 38 + 48 + 5


@pytest.mark.parametrize("cfg,shared_blocks", [
    # the same program on every position: the whole conversation is shared
    (steer("all"), A_TOTAL // BS),
    # "prompt" / "generated": the blocks before A's prompt end are shared, not A's reply
    (steer("prompt"), A_PROMPT // BS),
    (steer("generated"), A_PROMPT // BS),
    # "last": A's last prompt token was steered, B's is elsewhere
    (steer("last"), A_PROMPT // BS),
    # a listed position, then "all": the same everywhere once the list is inside both prompts
    ({"steer": [{"vector": "joy", "layers": 1, "scale": 1.0, "positions": "all"}],
      "heads": [{"layer": 0, "head": 1, "mode": "ablate", "positions": [3]}]}, A_TOTAL // BS),
    # a boost that differs between prefill and decode (the paper's rule) works like
    # "prompt" + "generated" — tested in the unit test of the identity below
])
def test_a_continued_conversation_reuses_only_what_was_computed_under_its_rules(bank, cfg, shared_blocks):
    a = _hashes(_identity(cfg, bank, A_PROMPT), n_tokens=A_TOTAL, n_prompt=A_PROMPT)
    b = _hashes(_identity(cfg, bank, B_PROMPT), n_tokens=B_PROMPT, n_prompt=B_PROMPT)
    assert _shared(a, b) == shared_blocks


def test_a_longer_prompt_does_not_reuse_a_shorter_ones_last_token_block(bank):
    cfg = {"steer": [{"vector": "joy", "layers": 1, "scale": 1.0, "positions": "all"}],
           "heads": [{"layer": 0, "head": 1, "mode": "add", "vector": "joy.h", "scale": 2.0,
                      "positions": "last"}]}
    a = _hashes(_identity(cfg, bank, 32), n_tokens=32, n_prompt=32)
    b = _hashes(_identity(cfg, bank, 42), n_tokens=42, n_prompt=42)
    assert len(a) == 2 and _shared(a, b) == 1  # block 1 holds A's last-token add at 31
    # the same prompt again shares everything
    assert _shared(a, _hashes(_identity(cfg, bank, 32), n_tokens=32, n_prompt=32)) == 2


def test_configs_and_client_salts_stay_apart(bank):
    last = lambda h: _identity({"heads": [{"layer": 0, "head": h, "mode": "ablate",  # noqa: E731
                                           "positions": [40]}]}, bank)
    a, b = _hashes(last(0)), _hashes(last(1))
    assert _shared(a, b) == 2 and a[2] != b[2]  # two configs: same prefix, own blocks from 40 on
    # a client's own cache_salt still isolates from block 0, with or without emosteer
    user = _hashes(None, salt="tenant-7")
    both = _hashes(last(0), salt="tenant-7")
    assert _shared(user, _hashes(None)) == 0
    assert _shared(user, both) == 2 and _shared(both, a) == 0
    # no client salt equals the plugin's key: its key is not a salt at all
    for forged in ("emosteer", f"{block_identity(last(0), 32, 48)}",
                   f"emosteer|{block_identity(last(0), 32, 48)}"):
        assert _shared(_hashes(None, salt=forged), a) == 0


def test_identity_is_the_program_at_each_position(bank):
    cfg = {"steer": [{"vector": "joy", "layers": 0, "scale": 1.0, "positions": "prompt"}],
           "heads": [{"layer": 1, "head": 0, "mode": "ablate", "positions": [5]},
                     {"layer": 1, "head": 1, "mode": "scale", "scale": 2.0, "positions": "generated"}]}
    ident = _identity(cfg, bank, 20)
    fps = {q: program_at(ident, q) for q in (0, 5, 19, 20, 40)}
    assert fps[0] == fps[19] != fps[5] and fps[20] == fps[40] not in (fps[0], fps[5], None)
    key = block_identity(ident, 0, 32)
    assert key == (f"0+5={fps[0]},5+1={fps[5]},6+14={fps[0]},20+12={fps[20]}")
    assert block_identity(ident, 32, 48) == f"0+16={fps[20]}"
    # a decode-only boost-like config: nothing before the prompt ends
    gen = _identity(steer("generated"), bank, 20)
    assert block_identity(gen, 0, 16) is None and block_identity(gen, 16, 32) is not None
    assert _identity({"capture": {"residual": [0]}}, bank) is None  # captures change no KV
