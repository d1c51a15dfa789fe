"""``emosteer extract`` and ``emosteer attribute``: steering vectors into a bank, and the
layer / head / neuron attribution of an emotion's circuit, each on one runner
(``emosteer.analysis.runners.make_runner``: vLLM with the plugin, or the transformers
reference backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from emosteer.cli._common import (Backend, builtin_only, engine_env, err, existing_file, fail,
                                  load_bank, model_folder, out, out_file, parse_emotions, positive,
                                  read_model_info, user_errors)


def extract(
    model: str = typer.Option("default", "--model", "-m", help="Model folder or 'default'."),
    emotion: str = typer.Option(..., "--emotion", "-e", help="Emotion(s), comma-separated: joy,sadness."),
    out_path: Path = typer.Option(..., "--out", "-o", help="Bank file to write (.safetensors)."),
    pairs: Optional[Path] = typer.Option(None, "--pairs", help="Pairs JSONL (default: the built-in set)."),
    tau: float = typer.Option(0.5, "--tau", help="Keep pairs whose emotional narrative hit rate is >= tau."),
    max_pairs: int = typer.Option(0, "--max-pairs", help="Use at most this many pairs per emotion (0: all)."),
    backend: Backend = typer.Option(Backend.auto, "--backend", help="vllm, hf, or auto."),
    max_tokens: int = typer.Option(48, "--max-tokens", help="Narrative length for the hit-rate filter."),
    probes: bool = typer.Option(True, "--probes/--no-probes",
                                help="Also fit the linear probes `EMOTION.probe` [L, d+1]."),
    probe_fit: str = typer.Option("mean", "--probe-fit",
                                  help="mean (difference of means, bias at the midpoint) or "
                                       "logistic (L2-regularised logistic regression)."),
):
    """Extract steering vectors into a vector bank (safetensors).

    S_l = mean over kept pairs of h⁺ − h⁻ at the last prompt token, every layer; a pair
    is kept when the model's narrative for its emotional side has hit rate ≥ tau. Also
    writes the head-space vector `EMOTION.h`, the probe `EMOTION.probe` (per layer a unit
    direction and bias from a train part of the kept pairs, w·h + b > 0 reads emotional;
    its accuracy on the held-out pairs goes in the metadata) and an audit JSON beside
    the bank."""
    emotions = parse_emotions(emotion)
    from emosteer.analysis.extract import PROBE_FITS

    if probe_fit not in PROBE_FITS:
        fail(f"--probe-fit: must be one of {', '.join(PROBE_FITS)}, got {probe_fit!r}")
    if not 0.0 <= tau < 1.0:
        fail(f"--tau: must be in [0, 1), got {tau}")
    if max_pairs < 0:
        fail(f"--max-pairs: must be >= 0, got {max_pairs}")
    positive(max_tokens, "--max-tokens", 4096)
    if pairs is not None:
        existing_file(pairs, "--pairs")
    else:
        builtin_only(emotions)
    out_file(out_path, "--out")
    folder = model_folder(model)
    engine_env()
    from emosteer.analysis.extract import extract_vectors
    from emosteer.analysis.runners import make_runner

    runner = make_runner(folder, backend.value, progress=False)
    err.print(f"backend: {runner.note}", highlight=False)
    try:
        ex = extract_vectors(runner, str(pairs) if pairs else None, emotions,
                             backend=runner.backend, tau=tau, max_new_tokens=max_tokens,
                             limit=max_pairs or None, probes=probes, probe_fit=probe_fit)
    except user_errors() as e:
        fail(str(e))
    except ValueError as e:  # e.g. no pairs for the emotion in --pairs
        fail(f"--pairs: {e}")
    finally:
        runner.close()
    audit = out_path.with_name(out_path.name + ".extract.json")
    ex.save(out_path, audit)
    for emo, m in ex.meta.items():
        kept = f"{m['n_kept']}/{m['n_pairs']} pairs kept (tau={tau})"
        if m["filter"] != "hit_rate":
            kept = f"no pair passed tau={tau}: all {m['n_pairs']} pairs used"
        out.print(f"[green]{emo}[/]: {kept}; vectors '{emo}' [L, d] and '{emo}.h' [L, H, D]")
        p = ex.probes.get(emo)
        if p is not None:
            acc = (f"held-out accuracy {p['best_accuracy']:.3f} on {p['n_heldout']} pairs"
                   if p["best_accuracy"] is not None else "no held-out pair")
            out.print(f"  probe '{p['name']}' [L, d+1]: best layer {p['best_layer']}, {acc}",
                      highlight=False)
    out.print(f"wrote {out_path} and {audit}")


# -------------------------------------------------------------------------- attribute
def attribute(
    model: str = typer.Option("default", "--model", "-m", help="Model folder or 'default'."),
    bank: Path = typer.Option(..., "--bank", "-b", help="Bank holding the emotion's steering vector."),
    emotion: str = typer.Option(..., "--emotion", "-e", help="Emotion whose vector is attributed."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder for attribution.json and plots."),
    what: str = typer.Option("layers,heads,neurons", "--what",
                             help="Any of layers,heads,neurons,attn (attn: attention to the image, "
                                  "image pairs; its heads become EMOTION.vee)."),
    pairs: Optional[Path] = typer.Option(None, "--pairs", help="Pairs JSONL (default: built-in)."),
    n_prompts: int = typer.Option(8, "--n-prompts", help="Pairs / neutral prompts per measurement."),
    alpha: float = typer.Option(0.1, "--alpha", help="Injection strength relative to the residual norm."),
    top_heads: int = typer.Option(5, "--top-heads", help="Heads kept (the `EMOTION.vee` mask)."),
    top_neurons: int = typer.Option(32, "--top-neurons", help="Neurons kept (the `EMOTION.ena` mask)."),
    max_tokens: int = typer.Option(32, "--max-tokens", help="Narrative length for hit rates."),
    backend: Backend = typer.Option(Backend.auto, "--backend", help="vllm, hf, or auto."),
    beta: float = typer.Option(2.0, "--beta", help="attn: VEE boost that confirms each candidate head."),
):
    """Layer, head and neuron attribution of an emotion's circuit (JSON + PNG plots).

    Writes attribution.json, layers.png, heads.png and the bank extended with the
    `EMOTION.vee` head mask and `EMOTION.ena` neuron mask into --out."""
    if "," in emotion:
        fail("--emotion: name one emotion")
    emo = parse_emotions(emotion)[0]
    parts = [w.strip() for w in what.split(",") if w.strip()]
    bad = sorted(set(parts) - {"layers", "heads", "neurons", "attn"})
    if bad or not parts:
        fail(f"--what: unknown part(s) {bad or what!r}; use layers, heads, neurons, attn")
    positive(beta, "--beta", 100)
    positive(n_prompts, "--n-prompts", 4096)
    positive(alpha, "--alpha", 100)
    positive(top_heads, "--top-heads", 100000)
    positive(top_neurons, "--top-neurons", 10**7)
    positive(max_tokens, "--max-tokens", 4096)
    b = load_bank(bank)
    if emo not in b or b.kind(emo) != "residual":
        fail(f"--bank: no residual vector named {emo!r} in {bank} (run emosteer extract); "
             f"it holds {b.names()}")
    if pairs is not None:
        existing_file(pairs, "--pairs")
    else:
        builtin_only([emo])
    if out_dir.exists() and not out_dir.is_dir():
        fail(f"--out: {str(out_dir)!r} exists and is not a folder")
    folder = model_folder(model)
    info, _ = read_model_info(folder)
    from emosteer.request.bank import BankError

    try:
        b.validate_against(info, check_architecture=False)
    except BankError as e:
        fail(f"--bank: {e}")
    engine_env()
    from emosteer.analysis.attribution import attribute as run_attribution
    from emosteer.analysis.runners import make_runner
    from emosteer.data import read_pairs

    ps = None
    if pairs is not None:
        try:
            ps = [p for p in read_pairs(pairs) if p.emotion == emo]
        except user_errors() as e:
            fail(f"--pairs: {e}")
        if not ps:
            fail(f"--pairs: {pairs} holds no pair for emotion {emo!r}")
    runner = make_runner(folder, backend.value, progress=False)
    err.print(f"backend: {runner.note}", highlight=False)
    try:
        res = run_attribution(runner, emo, ps, bank=b, backend=runner.backend, alpha=alpha,
                              top_heads=top_heads, top_neurons=top_neurons, n_pairs=n_prompts,
                              n_prompts=n_prompts, max_new_tokens=max_tokens, parts=parts,
                              beta=beta, out_dir=out_dir)
    except user_errors() as e:
        fail(str(e))
    finally:
        runner.close()
    if res.layers is not None:
        st = res.layers.stages
        out.print(f"layers: profile from {res.layers.profile_source}; aggregate band "
                  f"{st['aggregate']}, l_emo={st['l_emo']}")
    if res.heads is not None:
        out.print(f"heads: top {res.heads.top} (confirmed by {res.heads.patching} patching: {res.heads.confirmed})")
    if res.attn is not None:
        out.print(f"attention to the image: VEE heads {res.attn.top} (confirmed by single-head VEE at "
                  f"beta={res.attn.beta}: {res.attn.confirmed})")
    if res.neurons is not None:
        out.print(f"neurons: {len(res.neurons.top)} kept ({res.neurons.method})")
    plots = [n for n, on in (("layers.png", res.layers), ("heads.png", res.heads), ("attn.png", res.attn)) if on]
    out.print(f"wrote {out_dir}/attribution.json, {', '.join(plots)}, bank.safetensors")
