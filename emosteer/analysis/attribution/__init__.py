"""Layer, head and neuron attribution for one emotion (DESIGN §1.4–1.6), batched as requests.

One module per stage; each one's docstring gives its formulas:

* :mod:`.metrics`: the hit rate and its continuous proxy M, the target-word log-mass
  (``target_token_ids``, ``target_logmass``), and the weights alignment reads;
* :mod:`.layers`: α·S_l injected one layer at a time, the adapt / aggregate / execute
  stages by the half-maximum rule (``layer_attribution``, ``stage_bands``);
* :mod:`.heads`: emotional intention confirmed by activation patching, the full
  patched head map, emotion-general vs sentiment-specific heads (``head_attribution``,
  ``head_map``, ``head_types``);
* :mod:`.attn_image`: attention to the image on image pairs, confirmed by single-head
  VEE (``attention_attribution``);
* :mod:`.neurons`: down_proj alignment refined by attribution patching
  (``neuron_attribution``);
* :mod:`.results`: what each stage returns, attribution.json and the plots.

``attribute`` runs the stages in order on one runner and writes what they found into
the bank: the top heads as the ``"<emotion>.vee"`` head mask (the attention-to-image
heads when part ``"attn"`` ran; the intention heads are then kept as
``"<emotion>.heads"``) and the top-K neurons as the ``"<emotion>.ena"`` neuron mask.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from emosteer.analysis.attribution.attn_image import attention_attribution
from emosteer.analysis.attribution.heads import _pair_captures, head_attribution, head_map, head_types
from emosteer.analysis.attribution.layers import layer_attribution, stage_bands
from emosteer.analysis.attribution.metrics import target_logmass, target_token_ids
from emosteer.analysis.attribution.neurons import neuron_attribution
from emosteer.analysis.attribution.results import (AttnScores, AttributionResult, HeadMap, HeadScores,
                                                    LayerProfile, NeuronScores)
from emosteer.analysis.extract import pair_text
from emosteer.analysis.runners import make_runner
from emosteer.request.bank import VectorBank

__all__ = ["AttributionResult", "LayerProfile", "HeadScores", "NeuronScores", "AttnScores",
           "HeadMap", "attribute", "layer_attribution", "head_attribution", "head_map", "neuron_attribution",
           "attention_attribution", "head_types", "target_token_ids", "stage_bands", "target_logmass"]


def attribute(model: Any = "default", emotion: str = "joy", pairs=None, prompts=None, *,
              bank: VectorBank | str | os.PathLike | None = None, backend: str = "hf",
              tokenizer=None, alpha: float = 0.1, top_heads: int = 5, top_neurons: int = 32,
              n_pairs: int = 8, n_prompts: int = 8, max_new_tokens: int = 32,
              narratives: bool = True, proxy: str = "narrative", profile: str = "auto",
              batch_size: int = 16, beta: float = 2.0,
              progress: bool = True, lexicon=None, parts: Sequence[str] = ("layers", "heads", "neurons"),
              out_dir: str | os.PathLike | None = None) -> AttributionResult:
    """Run layer, head and neuron attribution for ``emotion``; adds ``"<emotion>.vee"``
    (heads mask) and ``"<emotion>.ena"`` (neurons mask) to the bank. ``bank`` must hold
    the residual vector ``"<emotion>"`` (``extract_vectors``); it is extracted here when
    missing. ``prompts``: neutral texts for the layer sweep (default: the neutral sides of
    the pairs). Part ``"attn"`` (image pairs) ranks heads by attention to the image and
    confirms them with single-head VEE at ``beta``; its heads become ``"<emotion>.vee"``.
    With ``out_dir``: attribution.json, layers.png, heads.png, attn.png, bank.safetensors."""
    from emosteer.data import load_builtin
    from emosteer.analysis.extract import extract_vectors

    if isinstance(bank, (str, os.PathLike)):
        bank = VectorBank.load(bank)
    runner = make_runner(model, backend, tokenizer=tokenizer, bank=bank, batch_size=batch_size,
                         progress=progress)
    pairs = load_builtin(emotion) if pairs is None else list(pairs)
    pairs = [p for p in pairs if p.emotion == emotion][:n_pairs] or pairs[:n_pairs]
    if emotion not in runner.bank:
        extract_vectors(runner, pairs, emotion, progress=progress, lexicon=lexicon)
    tids = target_token_ids(runner.tokenizer, emotion, lexicon)
    res = AttributionResult(emotion=emotion, model=runner.name, backend=runner.backend, bank=runner.bank)
    from tqdm.auto import tqdm

    steps = tqdm(list(parts), desc=f"attribution ({emotion})", disable=not progress)
    caps = None
    info = runner.info
    for part in steps:
        if part == "layers":
            if prompts is None:
                prompts = [pair_text(p.neutral, p.query) for p in pairs[:n_prompts]]
            res.layers = layer_attribution(runner, emotion, prompts, alpha=alpha,
                                           max_new_tokens=max_new_tokens, narratives=narratives,
                                           proxy=proxy, lexicon=lexicon, tids=tids, profile=profile)
        elif part == "heads":
            caps = caps or _pair_captures(runner, pairs)
            res.heads = head_attribution(runner, emotion, pairs, top_k=top_heads, lexicon=lexicon,
                                         tids=tids, _captures=caps)
            mask = torch.zeros(info.num_layers, info.num_heads)
            for l, h in res.heads.top:
                mask[l, h] = 1
            runner.bank.add(f"{emotion}.vee", "head_mask", mask, emotion=emotion, method="intention+patching",
                            confirmed=res.heads.confirmed, top=[list(c) for c in res.heads.top])
        elif part == "attn":
            res.attn = attention_attribution(runner, emotion, pairs, top_k=top_heads, beta=beta,
                                             lexicon=lexicon, tids=tids)
            mask = torch.zeros(info.num_layers, info.num_heads)
            for l, h in res.attn.top:
                mask[l, h] = 1
            if f"{emotion}.vee" in runner.bank and res.heads is not None:
                runner.bank.add(f"{emotion}.heads", "head_mask", runner.bank.get(f"{emotion}.vee", "head_mask"),
                                emotion=emotion, method="intention+patching")
            runner.bank.add(f"{emotion}.vee", "head_mask", mask, emotion=emotion, method="attn_image+vee",
                            beta=float(beta), confirmed=res.attn.confirmed, top=[list(c) for c in res.attn.top])
        elif part == "neurons":
            res.neurons = neuron_attribution(runner, emotion, pairs, top_k=top_neurons, lexicon=lexicon,
                                             tids=tids)
            mask = torch.zeros(info.num_layers, info.intermediate_size)
            for l, i in res.neurons.top:
                mask[l, i] = 1
            runner.bank.add(f"{emotion}.ena", "neurons", mask, emotion=emotion, method=res.neurons.method,
                            top_k=top_neurons)
        else:
            raise ValueError(f"unknown attribution part {part!r}; use layers, heads, attn, neurons")
    for name in [n for n in runner.bank.names() if n.startswith("_attr.")]:
        runner.bank.remove(name)
    if out_dir is not None:
        from pathlib import Path

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "attribution.json").write_text(res.to_json())
        if res.layers is not None:
            res.plot_layers(out / "layers.png")
        if res.heads is not None:
            res.plot_heads(out / "heads.png")
        if res.attn is not None:
            res.plot_attn(out / "attn.png")
        runner.bank.save(out / "bank.safetensors")
    return res
