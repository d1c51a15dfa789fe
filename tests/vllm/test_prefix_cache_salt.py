"""The position-placed prefix-cache salt, on vLLM's own block hasher (no engine).

Block hashes are chained, so a salt mixed into block k changes k and everything after it.
These tests hash a prompt's blocks with vLLM's ``get_request_block_hasher`` (patched by
the plugin) and check which blocks an emosteer config shares with the unsteered request.
The engine-level contracts (warm == cold, no reuse of a steered reply) are in
``vllm_checks.check_prefix_sharing_by_position``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from emosteer.spec import SteerSpec  # noqa: E402
from emosteer.vllm.patches import prefix_cache  # noqa: E402

BS = 16
P = 70  # tokens: blocks 0..3 full (64 tokens), 6 left over


def _hashes(salt: str | None, n_tokens: int = P) -> list:
    from vllm.utils.hashing import sha256
    from vllm.v1.core import kv_cache_utils as kcu

    kcu.init_none_hash(sha256)
    req = SimpleNamespace(lora_request=None, mm_features=[], prompt_embeds=None, cache_salt=salt,
                          all_token_ids=list(range(100, 100 + n_tokens)), num_tokens=n_tokens,
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


@pytest.mark.parametrize("positions,shared_blocks", [
    ("all", 0), ("prompt", 0), ([0], 0), ([15], 0), ([16], 1), ([40, 63], 2), ("last", 4),
    ("generated", 4),
])
def test_blocks_before_the_first_affected_position_are_shared(positions, shared_blocks):
    spec = SteerSpec.parse({"steer": [{"vector": "joy", "layers": 0, "scale": 1.0, "positions": positions}]})
    plain = _hashes(None)
    steered = _hashes(spec.cache_salt(None, P))
    assert len(plain) == len(steered) == P // BS
    assert _shared(plain, steered) == shared_blocks


def test_configs_and_client_salts_stay_apart():
    last = lambda h: SteerSpec.parse({"heads": [{"layer": 0, "head": h, "mode": "ablate",  # noqa: E731
                                                 "positions": [40]}]}).cache_salt(None, P)
    a, b = _hashes(last(0)), _hashes(last(1))
    assert _shared(a, b) == 2 and a[2] != b[2]  # two configs: same prefix, own blocks from 40 on
    # a client's own cache_salt still isolates from block 0, with or without emosteer
    user = _hashes("tenant-7")
    both = _hashes("tenant-7|" + last(0))
    assert _shared(user, _hashes(None)) == 0
    assert _shared(user, both) == 2 and _shared(both, a) == 0


def test_a_foreign_salt_is_left_where_vllm_puts_it():
    assert _hashes("emosteer@x:abc")[0] != _hashes(None)[0]
