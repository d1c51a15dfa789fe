"""The spec compiler: from a parsed request config to slot programs and pool rows.

One translation, used by every backend (the vLLM worker, the vLLM scheduler's admission,
the front end and the transformers reference backend in ``emosteer/hf/plan.py``)::

    SteerSpec ──resolve──► phase_spec(spec, "prompt" | "generated")
              ──compile_phase──► SlotProgram   (small: scalars + pool keys)
    pool key  ──materialize──►   one pool row   (a tensor, read from the bank)

A request's interventions can differ between its prompt and its generated positions, so
it holds up to two *slots*, one per phase. A slot holds only scalars and pool-row
indices; the vectors themselves live once in a *vector pool* (see
``emosteer/vllm/pool.py``), one row per (vector contents, layer):

    residual  ["res", [[name, hash, scale], ...], layer]  row [d] = sum scale*vec[layer]
              ["res", [[name, hash, scale], ...], layer, "unit"]
                                                          row [d] = sum scale*unit(vec[layer])
              ["res", [[name, hash, 1.0], ...], layer, "basis", j]
                                                          row [d] = the j-th vector of an
                                                          orthonormal basis of their span
                                                          (zeros past its rank)
    probe     ["probe", name, hash, layer]                row [d] = w of the probe at layer
    head      ["head", name, hash, layer]                 row [H, D] = vec[layer]
              ["head", name, hash, layer, k]              row [H, D] = vec[k, layer] (per position)
              ["head", name, hash, layer, "run", N]       N consecutive rows [N, H, D] =
                                                          vec[:, layer] (a position-aligned
                                                          patch in one slot: its k-th listed
                                                          position reads row base + k through
                                                          the head op's per-token row_off)
    neurons   ["neu", name, hash, layer]                  row [I] = mask[layer] (0/1)

Running example: ``{"steer": [{"vector": "joy", "layers": [3], "scale": 4}],
"heads": [{"layer": 5, "head": 2, "mode": "add", "vector": "joy.h", "scale": 0.5}]}``
compiles (phase "prompt") to ``res = {3: (4.0, '["res",[["joy","9f..",1.0]],3]')}`` and
``heads = {(5, 2): (1.0, 0.5, 0.0, '["head","joy.h","c1..",5]')}``. Two requests steering
with "joy" at different scales share the pool row and hold different slots.

Keys carry the content hash of the bank entry, so replacing a vector under the same name
makes new keys: a running request keeps reading the rows it was admitted with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

import torch

from emosteer.request import inline as inline_vec
from emosteer.request import positions as pos_model
from emosteer.request.bank import ModelInfo, VectorBank, shard_entry
from emosteer.request.positions import PHASES
from emosteer.request.spec import BOOST_MODES, BoostItem, SpecError, SteerSpec, head_norm

POOL_KINDS = ("res", "head", "neu", "probe")
# ``HeadItem.at`` of a position-aligned item in a group that reads its vector's rows as
# one run: the row of a token is given per token (``RequestProgram.row_off``), so the
# item, and the group's fingerprint, do not depend on the position.
ALIGNED = -1
MAX_RES_TERMS = 8  # residual terms (add / clamp / project-out rows) per slot and layer
# The term modes of the residual op (the same numbers as ``emosteer.ops.reference.RES_*``;
# tests/test_spec.py holds them equal): the rule, plus RES_RELATIVE for a scale relative
# to the residual's norm.
RES_MODES = {"add": 0, "clamp": 1, "project_out": 2}
RES_RELATIVE = 4

__all__ = [
    "PHASES",
    "POOL_KINDS",
    "SlotProgram",
    "RequestProgram",
    "phase_spec",
    "compile_phase",
    "compile_request",
    "key_kind",
    "key_rows",
    "materialize",
    "ALIGNED",
]


def phase_spec(spec: SteerSpec, phase: str) -> SteerSpec:
    """The interventions of ``spec`` in effect at every ``phase`` token (no capture;
    items at "last" or listed positions act only in their position groups)."""
    keep = lambda item: pos_model.in_phase(item.positions, phase)  # noqa: E731
    neurons = spec.neurons if spec.neurons is not None and keep(spec.neurons) else None
    return SteerSpec(
        steer=tuple(s for s in spec.steer if keep(s)),
        heads=tuple(h for h in spec.heads if keep(h)),
        neurons=neurons,
        boost=_phase_boost(spec.boost, phase),
        when=spec.when,
    )


def _phase_boost(boost: BoostItem | None, phase: str) -> BoostItem | None:
    """The boost acting in ``phase``; a phase-cut boost holds that phase's layers in
    both selections (so its fingerprint names only what acts)."""
    if boost is None:
        return None
    sel = boost.layers_for(phase)
    if sel == ():
        return None
    return replace(boost, prefill_layers=sel, decode_layers=sel)


def _key(*parts) -> str:
    return json.dumps(list(parts), separators=(",", ":"))


def key_kind(key: str) -> str:
    """"res", "head", "neu" or "probe" for a pool key."""
    kind = json.loads(key)[0]
    if kind not in POOL_KINDS:
        raise ValueError(f"not a pool key: {key!r}")
    return kind


def key_rows(key: str) -> int:
    """How many consecutive pool rows ``key`` holds: N for a run key
    (``["head", name, hash, layer, "run", N]``), else 1."""
    if '"run"' not in key:  # (the admission path asks for every key: no parse)
        return 1
    parts = json.loads(key)
    return int(parts[5]) if parts[0] == "head" and len(parts) == 6 and parts[4] == "run" else 1


@dataclass
class SlotProgram:
    """One slot's contents: scalars and pool keys (no tensors).

    ``res[layer] = ((coef, mode, key), ...)``: the terms of ``residual_steer`` (mode:
    ``ops.reference.RES_*``), e.g. ``((4.0, 0, key),)`` = ``r += 4 * pool_res[row(key)]``;
    ``heads[(layer, head)] = (a, b, c, key | None)``: ``z = a*z + (b + c*|z|)*v`` with
    ``v = pool_head[row(key)][head]`` (``c = scale / |v|`` for a relative add, else 0);
    ``neu[layer] = (gamma, key)``: ``m *= 1 + (gamma-1) * pool_neu[row(key)]``;
    ``boost[layer] = {head: beta}``: attention to image keys boosted by beta (VEE), the
    way ``boost_mode`` says (0 = softmax weights, 1 = logits);
    ``gate = (layer, key, bias, threshold, gmode)``: the probe gate (``ops.probe_gate``).
    """

    fingerprint: str
    res: dict[int, tuple[tuple[float, int, str], ...]] = field(default_factory=dict)
    heads: dict[tuple[int, int], tuple[float, float, float, str | None]] = field(default_factory=dict)
    neu: dict[int, tuple[float, str]] = field(default_factory=dict)
    boost: dict[int, dict[int, float]] = field(default_factory=dict)
    boost_mode: int = 0
    gate: tuple[int, str, float, float, int] | None = None

    def keys(self) -> list[str]:
        """Every pool key this slot reads (unique, stable order)."""
        out = [k for terms in self.res.values() for _, _, k in terms]
        out += [k for *_, k in self.heads.values() if k is not None]
        out += [k for _, k in self.neu.values()]
        if self.gate is not None:
            out.append(self.gate[1])
        return list(dict.fromkeys(out))

    def layers(self) -> dict[str, set[int]]:
        """Layers each op kind touches (the per-layer activity flags)."""
        return {
            "res": set(self.res),
            "head": {layer for layer, _ in self.heads},
            "neu": set(self.neu),
            "boost": set(self.boost),
            "gate": {self.gate[0]} if self.gate is not None else set(),
        }


def compile_phase(spec: SteerSpec, bank: VectorBank | None, info: ModelInfo) -> SlotProgram | None:
    """The slot program of an already phase-cut, resolved spec; None if it does nothing.

    Residual items on one layer become at most ``MAX_RES_TERMS`` terms: absolute adds
    fold into one (one item keeps ``coef = scale`` over the row ``vec[layer]``, shared
    across scales; several fold into ``sum(scale_i * vec_i[layer])`` with ``coef = 1``),
    relative adds into another (over unit vectors), then one term per clamp and one per
    basis vector of each project-out.
    """
    if not spec.intervenes():
        return None
    h = (lambda name: bank.content_hash(name)) if bank is not None else (lambda name: "")
    prog = SlotProgram(fingerprint=spec.fingerprint(bank))
    adds: dict[tuple[int, bool], list[tuple[str, float]]] = {}
    others: dict[int, list[tuple[float, int, str]]] = {}
    for s in spec.steer:
        if s.layers is None:
            raise SpecError("steer.layers", "resolve the spec (SteerSpec.resolve) before compiling")
        rel = s.scale_mode == "relative"
        for layer in s.layers:
            if s.mode == "add":
                adds.setdefault((layer, rel), []).append((s.vector, float(s.scale)))
            elif s.mode == "clamp":
                mode = RES_MODES["clamp"] | (RES_RELATIVE if rel else 0)
                coef = float(s.scale) if rel else float(s.value)
                others.setdefault(layer, []).append(
                    (coef, mode, _key("res", [[s.vector, h(s.vector), 1.0]], layer, "unit")))
            else:  # project_out: one term per basis vector of the items' span
                terms = [[n, h(n), 1.0] for n in s.names()]
                for j in range(len(terms)):
                    others.setdefault(layer, []).append(
                        (0.0, RES_MODES["project_out"], _key("res", terms, layer, "basis", j)))
    res: dict[int, list[tuple[float, int, str]]] = {}
    for (layer, rel), items in sorted(adds.items()):
        tail = ("unit",) if rel else ()
        mode = RES_MODES["add"] | (RES_RELATIVE if rel else 0)
        if len(items) == 1:
            name, scale = items[0]
            res.setdefault(layer, []).append((scale, mode, _key("res", [[name, h(name), 1.0]], layer, *tail)))
        else:
            terms = sorted([name, h(name), scale] for name, scale in items)
            res.setdefault(layer, []).append((1.0, mode, _key("res", terms, layer, *tail)))
    for layer, terms in others.items():
        res.setdefault(layer, []).extend(terms)
    for layer, terms in sorted(res.items()):
        if len(terms) > MAX_RES_TERMS:
            raise SpecError("steer", f"layer {layer} needs {len(terms)} residual terms (adds, clamps, "
                            f"project-out vectors); at most {MAX_RES_TERMS} per layer")
        prog.res[layer] = tuple(terms)
    if spec.when is not None:
        g = spec.when
        bias = 0.0
        if bank is not None:
            bias = float(bank.get(g.probe, "probe")[g.layer, -1])
        prog.gate = (g.layer, _key("probe", g.probe, h(g.probe), g.layer), bias, float(g.threshold),
                     int(g.below) | (2 if g.latch else 0))
    for item in spec.heads:
        a, b = item.affine()
        c = 0.0
        if item.relative:
            if bank is None:
                raise SpecError("heads.scale_mode", "a relative head add needs the bank (|v|)")
            c = float(item.scale) / head_norm(bank, item)
        key = None
        if item.reads_vector:
            if item.at == ALIGNED:  # every position's vector, consecutive rows (row_off)
                n = int(bank.get(item.vector, "head_positions").shape[0])
                key = _key("head", item.vector, h(item.vector), item.layer, "run", n)
            elif item.at is not None:  # one vector per listed position: row `at` of the entry
                key = _key("head", item.vector, h(item.vector), item.layer, item.at)
            else:
                key = _key("head", item.vector, h(item.vector), item.layer)
        prog.heads[(item.layer, item.head)] = (float(a), float(b), c, key)
    if spec.neurons is not None:
        name = spec.neurons.set
        mask = bank.get(name, "neurons") if bank is not None else None
        for layer in range(info.num_layers):
            if mask is not None and not bool(mask[layer].any()):
                continue
            prog.neu[layer] = (float(spec.neurons.gamma), _key("neu", name, h(name), layer))
    if spec.boost is not None:
        bo = spec.boost
        if bo.prefill_layers is None:
            raise SpecError("boost.prefill_layers", "resolve the spec (SteerSpec.resolve) before compiling")
        mask = bank.get(bo.heads, "head_mask") if bank is not None else None
        for layer in bo.prefill_layers:  # (phase-cut: both selections are this phase's)
            heads = (range(info.num_heads) if mask is None
                     else [int(x) for x in torch.nonzero(mask[layer] > 0).flatten()])
            if heads:
                prog.boost[layer] = {hd: float(bo.beta) for hd in heads}
        prog.boost_mode = BOOST_MODES.index(bo.mode)
    return prog


@dataclass
class RequestProgram:
    """Both phases of one request: ``phases[p]`` is None where nothing acts.

    ``row_off[p]``: the head op's pool-row offset at prompt position p, for the groups
    that read a position-aligned vector as one run of rows (its index among the listed
    positions); 0 (absent) elsewhere."""

    phases: dict[str, SlotProgram | None]
    row_off: dict[int, int] = field(default_factory=dict)

    def positions(self) -> dict[int, str]:
        """Prompt position -> its group name, for the groups that intervene."""
        return {int(p[1:]): p for p, prog in self.phases.items() if p.startswith("@") and prog is not None}

    def fingerprints(self) -> dict[str, str | None]:
        return {p: (prog.fingerprint if prog is not None else None) for p, prog in self.phases.items()}

    def cache_identity(self, num_prompt: int | None) -> dict | None:
        """What the KV cache of each position depends on, for the prefix cache (msgpack
        safe; None when no position is intervened on). ``positions.program_at`` reads it.

        ``{"P": prompt length, "prompt": fp, "generated": fp, "at": [[position, fp], ...]}``
        with ``fp`` the fingerprint of the program in effect (None = no intervention);
        at a position that reads its slot's rows at an offset k (``row_off``) it is
        ``"<fp>#<k>"``: the slot is the same at every listed position, the vector is not.
        A prompt of unknown length gets ``P = -1``; the block hasher then takes the
        request's own prompt length (``patches/prefix_cache.identity_of``)."""
        fps = self.fingerprints()
        at = sorted(self.positions().items())
        if all(fp is None for fp in fps.values()):
            return None
        return {
            "P": -1 if num_prompt is None else int(num_prompt),
            "prompt": fps.get("prompt"),
            "generated": fps.get("generated"),
            "at": [[pos, fps[name] if pos not in self.row_off else f"{fps[name]}#{self.row_off[pos]}"]
                   for pos, name in at],
        }

    def to_plan(self, capture_rows: int = 0, num_prompt: int | None = None) -> dict:
        """The msgpack-safe summary the scheduler admits by: fingerprints and pool keys
        per slot, the capture rows the request can fill in one step, and the cache
        identity of its positions (``cache_identity``)."""
        return {
            "slots": {
                p: {"fp": prog.fingerprint, "keys": prog.keys()}
                for p, prog in self.phases.items()
                if prog is not None
            },
            "capture_rows": int(capture_rows),
            "cache": self.cache_identity(num_prompt),
        }


def position_specs(spec: SteerSpec, bank: VectorBank | None, num_prompt: int | None) -> dict[int, SteerSpec]:
    """Prompt position -> the spec in effect there, for every position named by an item
    ("last" = ``num_prompt - 1``; -1 while the prompt length is unknown) or listed.

    Each group holds the items of every prompt token plus those naming the position, all
    as ``positions: "all"``, so a group's fingerprint does not depend on where it acts:
    a patch listing 40 positions with one vector is one slot. So is one with a
    "head_positions" vector (one per position): where the group's head items that read a
    vector all read "head_positions" vectors listing the same positions, they read them
    as one run of pool rows (``HeadItem.at = ALIGNED``) at the per-token offset
    ``position_groups`` gives; otherwise each position reads its own row
    (``HeadItem.at`` = its index). The probe gate (``when``) gates a group's later layers
    as it does the phases'."""
    return {p: group for p, (group, _) in position_groups(spec, bank, num_prompt).items()}


def position_groups(spec: SteerSpec, bank: VectorBank | None,
                    num_prompt: int | None) -> dict[int, tuple[SteerSpec, int]]:
    """``position_specs`` with each group's head-pool row offset (0 unless it reads a run)."""
    items = [*spec.steer, *spec.heads, *([spec.neurons] if spec.neurons is not None else [])]
    covers = pos_model.covers
    out: dict[int, tuple[SteerSpec, int]] = {}
    # a group's head items that read one run of rows are the same at every position
    # (only the offset moves): made once per set of source items
    aligned: dict[tuple[int, ...], tuple[list, dict[int, int]]] = {}
    for p in pos_model.groups((it.positions for it in items), num_prompt):
        steer = tuple(replace(s, positions="all") for s in spec.steer if covers(s.positions, p, num_prompt))
        heads = []
        seen: dict[tuple[int, int], int] = {}
        for i, hd in enumerate(spec.heads):
            if not covers(hd.positions, p, num_prompt):
                continue
            if (hd.layer, hd.head) in seen:
                raise SpecError(
                    f"heads[{i}].positions",
                    f"layer {hd.layer} head {hd.head} is also set by heads[{seen[(hd.layer, hd.head)]}] "
                    f"at prompt position {p}; one intervention per head and position",
                )
            seen[(hd.layer, hd.head)] = i
            heads.append(hd)
        ids = tuple(map(id, heads))
        if ids in aligned:  # the same items as at an earlier position, read as one run
            heads, index = aligned[ids]
            off = index[p]
        else:
            heads, off = _aligned_heads(heads, bank, p)
            if any(hd.at == ALIGNED for hd in heads):
                listed = next(hd.positions for hd in spec.heads if id(hd) in ids and hd.reads_vector)
                index: dict[int, int] = {}
                for k, q in enumerate(listed):
                    index.setdefault(q, k)  # (as list.index: the first listing)
                aligned[ids] = (heads, index)
        neurons = spec.neurons
        if neurons is not None:
            if covers(neurons.positions, p, num_prompt):
                neurons = replace(neurons, positions="all")
            else:
                neurons = None
        out[p] = (SteerSpec(steer=steer, heads=tuple(heads), neurons=neurons,
                            boost=_phase_boost(spec.boost, "prompt"), when=spec.when), off)
    return out


def _aligned_heads(heads: list, bank: VectorBank | None, p: int):
    """The head items of the group at prompt position ``p`` (as ``positions: "all"``)
    and the group's row offset. Items with a "head_positions" vector read row ``k`` of
    it, k = the index of p among their listed positions: as one run of rows at offset k
    (``at = ALIGNED``) when every item of the group that reads a vector is such an item
    listing the same positions (the offset is one per token), else row k itself."""
    def per_position(hd) -> bool:
        return (isinstance(hd.positions, tuple) and hd.vector is not None and bank is not None
                and hd.vector in bank and bank.kind(hd.vector) == "head_positions")

    readers = [hd for hd in heads if hd.reads_vector]
    lists = {hd.positions if per_position(hd) else None for hd in readers}
    if readers and len(lists) == 1 and None not in lists:
        at = ALIGNED
        off = next(iter(lists)).index(p)
    else:
        at = off = None
    out = []
    for hd in heads:
        if per_position(hd) and hd.reads_vector:
            out.append(replace(hd, positions="all", at=at if at is not None else hd.positions.index(p)))
        else:  # (an add of scale 0 reads no row: the same item at every position)
            out.append(replace(hd, positions="all", at=None))
    return out, (off or 0)


def compile_request(
    spec: SteerSpec, bank: VectorBank | None, info: ModelInfo, num_prompt: int | None = None
) -> RequestProgram:
    """Slot programs of a resolved spec: ``"prompt"`` (every prompt token), ``"generated"``
    and ``"@<p>"`` for each prompt position p named by "last" or a position list."""
    bank = inline_vec.overlay(bank, info, spec.inline_items())
    phases = {p: compile_phase(phase_spec(spec, p), bank, info) for p in PHASES}
    row_off: dict[int, int] = {}
    # Groups are often equal (a position-aligned patch's groups differ only in their row
    # offset): each distinct group compiles once (programs are never mutated after).
    done: dict[SteerSpec, SlotProgram | None] = {}
    for pos, (group, off) in position_groups(spec, bank, num_prompt).items():
        try:
            prog = done[group] if group in done else done.setdefault(group, compile_phase(group, bank, info))
        except TypeError:  # a field that does not hash: compile it as it is
            prog = compile_phase(group, bank, info)
        phases[f"@{pos}"] = prog
        if any(hd.at == ALIGNED for hd in group.heads):
            row_off[pos] = off
    return RequestProgram(phases, row_off)


def materialize(
    key: str, bank: VectorBank, info: ModelInfo, tp_size: int = 1, tp_rank: int = 0
) -> torch.Tensor:
    """The float32 pool row of ``key`` for one tensor-parallel rank, read from ``bank``.

    Raises ``KeyError`` naming the vector when the bank no longer holds the contents the
    key was made from (the name was removed or replaced since)."""
    parts = json.loads(key)
    kind = parts[0]

    def entry(name: str, want_hash: str, kind_name: str) -> torch.Tensor:
        if name not in bank or (want_hash and bank.content_hash(name) != want_hash):
            raise KeyError(
                f"vector {name!r} was removed or replaced after this request was admitted; "
                "send the request again"
            )
        return bank.get(name, kind_name)

    if kind == "res":
        _, terms, layer, *form = parts
        if form and form[0] == "basis":
            vecs = [entry(name, hsh, "residual")[layer] for name, hsh, _ in terms]
            return orthonormal_basis(vecs)[form[1]]
        unit = bool(form) and form[0] == "unit"
        row = torch.zeros(info.hidden_size)
        for name, hsh, scale in terms:
            vec = entry(name, hsh, "residual")[layer].float()
            if unit:
                vec = unit_vector(vec, name, layer)
            row = vec.clone() if (len(terms) == 1 and scale == 1.0) else row + scale * vec
        return row
    if kind == "probe":
        _, name, hsh, layer = parts
        return entry(name, hsh, "probe")[layer, :-1].float()
    if kind == "head":
        if len(parts) == 6:  # a per-position entry [N, L, H, D] as one run: [N, H, D]
            _, name, hsh, layer, _, n = parts
            vec = shard_entry(entry(name, hsh, "head_positions"), "head_positions", tp_size, tp_rank)
            if vec.shape[0] != n:
                raise KeyError(f"vector {name!r} holds {vec.shape[0]} positions, not {n}")
            return vec[:, layer].float()
        if len(parts) == 5:  # a per-position entry [N, L, H, D]: row `at`
            _, name, hsh, layer, at = parts
            vec = shard_entry(entry(name, hsh, "head_positions"), "head_positions", tp_size, tp_rank)
            return vec[at, layer].float()
        _, name, hsh, layer = parts
        vec = shard_entry(entry(name, hsh, "head"), "head", tp_size, tp_rank)
        return vec[layer].float()
    if kind == "neu":
        _, name, hsh, layer = parts
        mask = shard_entry(entry(name, hsh, "neurons"), "neurons", tp_size, tp_rank)
        return mask[layer].float()
    raise ValueError(f"not a pool key: {key!r}")


def unit_vector(vec: torch.Tensor, name: str, layer: int) -> torch.Tensor:
    """``vec / |vec|`` (float32, normalised in float64)."""
    v = vec.double()
    n = float(v.norm())
    if not n > 0:
        raise SpecError("steer", f"vector {name!r} is zero at layer {layer}: it has no direction")
    return (v / n).float()


def orthonormal_basis(vecs: list[torch.Tensor], rtol: float = 1e-6) -> torch.Tensor:
    """``[k, d]`` float32: an orthonormal basis of the span of ``vecs`` (modified
    Gram-Schmidt in float64, twice), rows past the span's rank are zeros."""
    out = torch.zeros(len(vecs), vecs[0].numel(), dtype=torch.float64)
    scale = max(float(v.double().norm()) for v in vecs)
    j = 0
    for v in vecs:
        w = v.double().flatten().clone()
        for _ in range(2):
            for i in range(j):
                w -= (w @ out[i]) * out[i]
        n = float(w.norm())
        if n > rtol * scale and n > 0:
            out[j] = w / n
            j += 1
    return out.float()
