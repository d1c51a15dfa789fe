"""Steering-vector extraction: difference of means over counterfactual pairs (DESIGN §1.2).

For each emotion and each pair i, the emotional input X⁺ and the neutral input X⁻ (same
query) run through the model; at the last prompt token, per layer l,

    s_{i,l} = h⁺_{i,l} − h⁻_{i,l}          (residual = output of decoder layer l)
    t_{i,l,h} = z⁺_{i,l,h} − z⁻_{i,l,h}    (head output before o_proj)

Pairs are kept when the model's own narrative for X⁺ (greedy) has a hit rate of at least
τ for the emotion (``emosteer.analysis.emotion.hit_rate``); ``S_l = mean_kept s_{i,l}`` is stored
as the residual vector ``"<emotion>"`` [L, d] and ``mean_kept t_{i,l,h}`` as the head
vector ``"<emotion>.h"`` [L, H, D]. When no pair passes (small or untrained models often
name no emotion at all), every pair is used and the metadata says so
(``filter: "fallback_all_pairs"``) with a warning. The same function runs on the "hf"
backend (HFSteerer) or the "vllm" backend (emosteer.LLM): only the captures differ in
where they come from.

Image pairs (``Stimulus.image``) need a vision-language model and its processor (loaded
from the model folder, or passed as ``processor``): the user turn is the image then the
query, built with the processor's chat template (image content item) and expanded by the
processor; ``pixel_values`` / ``image_grid_thw`` go with the ids. On "hf", the X⁺
narratives for the filter come from the model's own unsteered ``generate`` (HFSteerer's
hooked generation takes no image inputs) and the X⁺ captures from a separate forward
pass (same last-prompt-token residual and heads). On "vllm", requests carry the prompt
text and ``multi_modal_data={"image": ...}`` (untested).

Probes (``probes=True``, the default): from the same residuals h⁺ / h⁻ of the same pairs
(the kept ones, or all on the fallback), split into train and held-out pairs by
``emosteer.data.split_pairs`` (seeded, grouped by scene; ungrouped when that holds
nothing out), ``"<emotion>.probe"`` [L, d + 1] holds per layer the unit direction
w_l = (μ⁺ − μ⁻)/‖μ⁺ − μ⁻‖ and the bias b_l = −w_l·(μ⁺ + μ⁻)/2 of the train pairs' class
means: ``w_l·h + b_l > 0`` reads "emotional". Its accuracy on the held-out pairs' 2n
residuals per layer is in the metadata and in ``ExtractResult.probes``. With
``probe_fit="logistic"`` the (w_l, b_l) are an L2-regularised logistic regression on the
same train residuals instead (w_l not unit; ``w_l·h + b_l`` is its logit).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from emosteer.request.bank import VectorBank
from emosteer.analysis.runners import make_runner

__all__ = ["ExtractResult", "extract_vectors", "fit_probe", "pair_text", "CAPTURE_LAST",
           "stack_captures"]

CAPTURE_LAST = {"capture": {"heads": "all", "residual": "all", "positions": "last"}}
METHOD = "diff_of_means"
PROBE_FIT = "diff_of_means_midpoint"
# How a probe is fitted (``extract_vectors(probe_fit=...)``) -> its metadata name.
PROBE_FITS = {"mean": PROBE_FIT, "logistic": "logistic_l2"}
LOGISTIC_L2 = 1e-2  # ridge penalty of the logistic probe, on residuals scaled to norm ~1


def pair_text(stimulus, query: str) -> str:
    """The user turn for one side of a text pair: the scene, then the query."""
    if getattr(stimulus, "kind", "text") != "text":
        raise NotImplementedError(
            "pair_text takes text stimuli only; extract_vectors encodes image pairs through "
            "the runner's processor (runner.encode_images)")
    return f"{stimulus.text} {query}".strip()


def _encode_side(runner, stimuli, queries, chat: bool):
    """Token ids (text) or MMPrompt rows (image) for one side of a group of pairs."""
    kinds = {getattr(s, "kind", "text") for s in stimuli}
    if kinds == {"text"}:
        return runner.encode([pair_text(s, q) for s, q in zip(stimuli, queries)], chat=chat)
    if kinds == {"image"}:
        if not hasattr(runner, "encode_images"):
            raise NotImplementedError(f"runner {type(runner).__name__} takes no images")
        return runner.encode_images([s.image for s in stimuli], list(queries), chat=chat)
    raise ValueError("a group mixes text and image stimuli; extract them separately")


def stack_captures(caps: Sequence[dict], num_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Last captured position of every row: residual ``[N, L, d]``, heads ``[N, L, H, D]``."""
    res = torch.stack([torch.stack([c["residual"][l][-1].float().cpu() for l in range(num_layers)])
                       for c in caps])
    heads = torch.stack([torch.stack([c["heads"][l][-1].float().cpu() for l in range(num_layers)])
                         for c in caps])
    return res, heads


def _logistic(hp: torch.Tensor, hn: torch.Tensor, l2: float, steps: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """(w [L, d], b [L]) of an L2-regularised logistic regression per layer, emotional
    (``hp`` [n, L, d]) = 1 against neutral (``hn``), float64, L-BFGS on every layer at
    once (their losses are independent). Residuals are divided by their mean norm at
    the layer first, so that ``l2`` means the same at every layer; w is returned in the
    residual's own units (``w·h + b`` is the logit)."""
    x = torch.cat([hp, hn])  # [2n, L, d]
    y = torch.cat([torch.ones(hp.shape[0]), -torch.ones(hn.shape[0])]).double()[:, None]
    s = x.norm(dim=-1).mean(0).clamp_min(1e-12)  # [L]
    xs = x / s[None, :, None]
    W = torch.zeros(x.shape[1], x.shape[2], dtype=torch.float64, requires_grad=True)
    B = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, B], lr=1.0, max_iter=steps, tolerance_grad=1e-10,
                            tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        opt.zero_grad()
        logit = torch.einsum("nld,ld->nl", xs, W) + B
        f = torch.nn.functional.softplus(-y * logit).mean(0).sum() + 0.5 * l2 * (W * W).sum()
        f.backward()
        return f

    with torch.enable_grad():
        opt.step(loss)
    return (W / s[:, None]).detach(), B.detach()


def fit_probe(h_pos: torch.Tensor, h_neg: torch.Tensor, train: Sequence[int],
              heldout: Sequence[int], method: str = "mean",
              l2: float = LOGISTIC_L2) -> tuple[torch.Tensor, dict]:
    """Per-layer linear probe ``[L, d + 1]`` (rows ``(w_l, b_l)``) from the ``train`` rows
    of the residuals ``h_pos`` / ``h_neg`` ``[N, L, d]`` (emotional / neutral side).
    ``method="mean"``: ``w_l`` the unit difference of the class means, ``b_l`` puts their
    midpoint at score 0 (a layer whose means coincide gets ``w_l = 0, b_l = 0``);
    ``"logistic"``: an L2-regularised logistic regression (``l2`` on residuals scaled to
    unit mean norm), ``w_l·h + b_l`` its logit. Either way a score above 0 reads
    "emotional". Returns it with its
    per-layer accuracies (train, held-out), scored with the float32 tensor returned:
    ``heldout_margin`` is the mean of ``y·s/‖h‖`` (y = ±1) over the held-out residuals,
    ``best_layer`` the layer of best held-out (else train) accuracy, ties to the larger
    margin (chosen on the held-out pairs: ``best_accuracy`` is slightly optimistic).
    Held-out fields are None when ``heldout`` is empty."""
    if method not in PROBE_FITS:
        raise ValueError(f"probe fit must be one of {sorted(PROBE_FITS)}, got {method!r}")
    hp, hn = h_pos.double(), h_neg.double()
    train = list(train)
    if method == "logistic":
        w, b = _logistic(hp[train], hn[train], l2)
    else:
        mu_p, mu_n = hp[train].mean(0), hn[train].mean(0)  # [L, d]
        diff = mu_p - mu_n
        norm = diff.norm(dim=-1, keepdim=True)
        w = torch.where(norm > 0, diff / norm.clamp_min(1e-300), torch.zeros_like(diff))
        b = -(w * (mu_p + mu_n) / 2).sum(-1)
    probe = torch.cat([w, b[:, None]], dim=-1).to(torch.float32)
    w32, b32 = probe[:, :-1].double(), probe[:, -1].double()

    def scores(rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = torch.cat([hp[rows], hn[rows]])  # [2n, L, d]
        y = torch.cat([torch.ones(len(rows)), -torch.ones(len(rows))]).double()[:, None]
        return torch.einsum("nld,ld->nl", h, w32) + b32, y, h.norm(dim=-1).clamp_min(1e-12)

    def accuracy(rows: list[int]) -> list[float]:
        s, y, _ = scores(rows)
        return [round(float(a), 6) for a in ((s > 0) == (y > 0)).double().mean(0)]

    held = list(heldout)
    info: dict[str, Any] = {"train_accuracy": accuracy(train), "heldout_accuracy": None,
                            "heldout_margin": None}
    rows = held or train
    s, y, hnorm = scores(rows)
    margin = [round(float(m), 6) for m in (y * s / hnorm).mean(0)]
    if held:
        info["heldout_accuracy"], info["heldout_margin"] = accuracy(held), margin
    acc = info["heldout_accuracy"] or info["train_accuracy"]
    best = max(range(len(acc)), key=lambda l: (acc[l], margin[l]))
    info["best_layer"] = best
    info["best_accuracy"] = info["heldout_accuracy"][best] if held else None
    return probe, info


def _probe_split(pool: list, holdout: float, seed: int) -> tuple[list[int], list[int], str]:
    """Indices (train, held-out) into ``pool`` by ``split_pairs``: grouped by scene, or
    pair by pair when grouping holds nothing out; a single pair trains alone."""
    from types import SimpleNamespace

    from emosteer.data import split_pairs

    if len(pool) < 2:
        return list(range(len(pool))), [], "none (a single pair: fitted on it, nothing held out)"
    # split_pairs reads .emotion and .meta; the stand-ins carry their index into pool
    rows = [SimpleNamespace(emotion=p.emotion, meta=p.meta or {}, i=i) for i, p in enumerate(pool)]
    for key in ("scene", None):
        train, test = split_pairs(rows, holdout, seed, group_key=key)
        if test:
            break
    how = f"split_pairs(test_fraction={holdout}, seed={seed}, group_key={key!r})"
    return [r.i for r in train], [r.i for r in test], how


def _probe_entry(emotion, group, keep, h_pos, h_neg, holdout, seed,
                 method: str = "mean") -> tuple[torch.Tensor, dict, dict]:
    """The ``<emotion>.probe`` tensor, its bank metadata and its report (with pair ids)."""
    kept = [i for i, k in enumerate(keep) if k]
    train, held, how = _probe_split([group[i] for i in kept], holdout, seed)
    train, held = [kept[i] for i in train], [kept[i] for i in held]
    probe, fit = fit_probe(h_pos, h_neg, train, held, method)
    meta = {"component": "probe", "probe_fit": PROBE_FITS[method],
            **({"l2": LOGISTIC_L2} if method == "logistic" else {}),
            "score": "w.h + b > 0: emotion present (h: output residual of decoder layer l)",
            **fit, "n_train": len(train), "n_heldout": len(held), "split": how,
            "few_pairs": len(held) < 4}
    if meta["few_pairs"]:
        meta["note"] = (f"only {len(held)} held-out pair(s) ({2 * len(held)} residuals): "
                        "the held-out accuracy is coarse" if held else
                        "no held-out pair: heldout_accuracy is null")
    report = {**meta, "name": f"{emotion}.probe", "train_ids": [group[i].id for i in train],
              "heldout_ids": [group[i].id for i in held]}
    return probe, meta, report


@dataclass
class ExtractResult:
    """The bank plus everything needed to audit the filter."""

    bank: VectorBank
    emotions: list[str]
    hit_rates: dict[str, list[float | None]] = field(default_factory=dict)
    kept: dict[str, list[bool]] = field(default_factory=dict)
    narratives: dict[str, list[str]] = field(default_factory=dict)
    pair_ids: dict[str, list[str]] = field(default_factory=dict)
    meta: dict[str, dict] = field(default_factory=dict)
    # emotion -> the probe's metadata plus its train / held-out pair ids
    probes: dict[str, dict] = field(default_factory=dict)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps({
            "emotions": self.emotions, "meta": self.meta, "hit_rates": self.hit_rates,
            "kept": self.kept, "pair_ids": self.pair_ids, "narratives": self.narratives,
            "probes": self.probes,
        }, indent=indent)

    def save(self, bank_path: str | os.PathLike, report_path: str | os.PathLike | None = None) -> None:
        self.bank.save(bank_path)
        if report_path is not None:
            with open(report_path, "w") as f:
                f.write(self.to_json())


def _load_pairs(pairs, emotions):
    from emosteer.data import load_builtin, read_pairs

    if pairs is None:
        return load_builtin(emotions)
    if isinstance(pairs, (str, os.PathLike)):
        return read_pairs(pairs)
    return list(pairs)


def extract_vectors(
    model: Any = "default",
    pairs=None,
    emotions: str | Sequence[str] | None = None,
    *,
    backend: str = "hf",
    tau: float = 0.5,
    max_new_tokens: int = 48,
    limit: int | None = None,
    tokenizer=None,
    bank: VectorBank | None = None,
    chat: bool = True,
    batch_size: int = 16,
    progress: bool = True,
    lexicon=None,
    hit_rate_fn: Callable[[str, str], float | None] | None = None,
    processor=None,
    probes: bool = True,
    probe_holdout: float = 0.25,
    probe_seed: int = 0,
    probe_fit: str = "mean",
) -> ExtractResult:
    """Extract ``"<emotion>"`` (residual) and ``"<emotion>.h"`` (head) vectors, and with
    ``probes`` the ``"<emotion>.probe"`` probes (``probe_holdout`` of the pairs, split
    with ``probe_seed``, measure their accuracy; ``probe_fit`` "mean" (difference of
    means, the default) or "logistic"; see the module docstring and ``fit_probe``).

    ``model``: "default", a model folder, a transformers model (+ ``tokenizer``), an
    HFSteerer, an ``emosteer.LLM`` (backend "vllm") or a runner. ``pairs``: Pair objects,
    a JSONL path, or None for the built-in text pairs. ``emotions`` restricts the pairs
    (default: every emotion present); ``limit`` takes the first pairs per emotion.
    ``hit_rate_fn(text, emotion)`` replaces ``emosteer.analysis.emotion.hit_rate`` (called once per
    pair, in pair order). ``processor``: the vision-language processor for image pairs
    (default: AutoProcessor from the model folder). Returns the bank (new, or ``bank``
    extended) and the audit.
    """
    from emosteer.analysis.emotion import hit_rate

    if not 0.0 < probe_holdout < 1.0:
        raise ValueError(f"probe_holdout must be in (0, 1), got {probe_holdout}")
    if probe_fit not in PROBE_FITS:
        raise ValueError(f"probe_fit must be one of {sorted(PROBE_FITS)}, got {probe_fit!r}")
    runner = make_runner(model, backend, tokenizer=tokenizer, batch_size=batch_size,
                         progress=progress, processor=processor)
    info = runner.info
    if isinstance(emotions, str):
        emotions = [emotions]
    all_pairs = _load_pairs(pairs, emotions)
    groups: dict[str, list] = {}
    for p in all_pairs:
        if emotions is None or p.emotion in emotions:
            groups.setdefault(p.emotion, []).append(p)
    if not groups:
        raise ValueError(f"no pairs for emotions {emotions}")
    score = hit_rate_fn or (lambda text, emo: hit_rate(text, emo, lexicon))
    out = bank if bank is not None else VectorBank(info)
    result = ExtractResult(bank=out, emotions=sorted(groups))
    L = info.num_layers

    from tqdm.auto import tqdm

    for emotion in tqdm(result.emotions, desc="extract", disable=not progress):
        group = groups[emotion][:limit] if limit else groups[emotion]
        queries = [p.query for p in group]
        ids_pos = _encode_side(runner, [p.emotional for p in group], queries, chat)
        ids_neg = _encode_side(runner, [p.neutral for p in group], queries, chat)
        specs = [CAPTURE_LAST] * len(group)
        if runner.backend == "hf" and getattr(group[0].emotional, "kind", "text") == "image":
            # unsteered narratives by the model's own generate, captures by a forward pass
            _, texts, _ = runner.generate(ids_pos, [None] * len(group),
                                          max_new_tokens=max_new_tokens,
                                          desc=f"{emotion}: X+ narratives")
            _, caps_pos = runner.forward(ids_pos, specs, desc=f"{emotion}: X+ captures")
        else:
            _, texts, caps_pos = runner.generate(ids_pos, specs, max_new_tokens=max_new_tokens,
                                                 desc=f"{emotion}: X+ narratives")
        _, caps_neg = runner.forward(ids_neg, specs, desc=f"{emotion}: X- captures")
        h_pos, z_pos = stack_captures(caps_pos, L)
        h_neg, z_neg = stack_captures(caps_neg, L)

        rates = [score(t, emotion) for t in texts]
        keep = [r is not None and r >= tau for r in rates]
        status = "hit_rate"
        if not any(keep):
            warnings.warn(
                f"extract: no {emotion!r} pair reaches hit rate >= {tau} on the model's own "
                f"narratives ({sum(r is not None for r in rates)}/{len(rates)} narratives "
                "name any emotion); using every pair (metadata filter='fallback_all_pairs')",
                stacklevel=2,
            )
            keep, status = [True] * len(group), "fallback_all_pairs"
        k = torch.tensor(keep)
        S = (h_pos - h_neg)[k].mean(0)  # [L, d]
        Sh = (z_pos - z_neg)[k].mean(0)  # [L, H, D]
        meta = {
            "model": runner.name, "emotion": emotion, "method": METHOD, "backend": runner.backend,
            "n_pairs": len(group), "n_kept": sum(keep) if status == "hit_rate" else 0,
            "tau": tau, "filter": status, "max_new_tokens": max_new_tokens,
            "position": "last_prompt_token",
            "residual_norm": [round(float(x), 6) for x in h_neg.norm(dim=-1).mean(0)],
        }
        out.add(emotion, "residual", S.to(torch.float32), **meta)
        out.add(f"{emotion}.h", "head", Sh.to(torch.float32), **{**meta, "component": "head_out"})
        if probes:
            probe, pmeta, report = _probe_entry(emotion, group, keep, h_pos, h_neg,
                                                probe_holdout, probe_seed, probe_fit)
            out.add(f"{emotion}.probe", "probe", probe, **{**meta, **pmeta})
            result.probes[emotion] = report
        result.hit_rates[emotion] = rates
        result.kept[emotion] = keep
        result.narratives[emotion] = texts
        result.pair_ids[emotion] = [p.id for p in group]
        result.meta[emotion] = meta
    runner.register(out)
    return result
