"""``emosteer bank``: what a vector bank holds, and GGUF control vectors (llama.cpp,
repeng, EasySteer) in and out of a bank."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from emosteer.cli._common import (err, existing_file, fail, load_bank, model_folder, out,
                                  out_file, read_model_info)

app = typer.Typer(help="Inspect vector banks; import and export GGUF control vectors.", no_args_is_help=True,
                  rich_markup_mode="markdown")


@app.command("show")
def bank_show(file: Path = typer.Argument(..., help="A bank .safetensors file.")):
    """List the entries of a vector bank: name, kind, shape, norm (masks: count set;
    probes: best layer and its held-out accuracy), metadata."""
    bank = load_bank(file, "FILE")
    info = bank.info
    title = f"{file} — {len(bank)} entries"
    if info is not None:
        title += (f" — model {info.architecture} L={info.num_layers} d={info.hidden_size} "
                  f"H={info.num_heads}×{info.head_dim} I={info.intermediate_size}")
    t = Table(title=title)
    for col in ("name", "kind", "shape", "norm / count / probe", "metadata"):
        t.add_column(col, overflow="fold")
    for name in bank.names():
        x, kind = bank.get(name), bank.kind(name)
        size = (f"{int(x.sum().item())} set" if kind in ("neurons", "head_mask")
                else _probe_summary(bank.meta(name)) if kind == "probe"
                else f"{float(x.float().norm()):.4g}")
        meta = json.dumps(bank.meta(name), sort_keys=True)
        t.add_row(name, kind, "×".join(map(str, x.shape)), size,
                  meta if len(meta) < 160 else meta[:157] + "...")
    out.print(t)


def _probe_summary(meta: dict) -> str:
    """``best layer 5: 0.875 held-out`` from a probe's metadata (what extract writes)."""
    acc = meta.get("heldout_accuracy")
    if isinstance(acc, list) and acc and all(isinstance(a, (int, float)) for a in acc):
        best = meta.get("best_layer")
        if not isinstance(best, int) or not 0 <= best < len(acc):
            best = max(range(len(acc)), key=acc.__getitem__)
        n = meta.get("n_heldout")
        fit = {"logistic_l2": ", logistic"}.get(meta.get("probe_fit"), "")
        return f"best layer {best}: {acc[best]:.3f} held-out" + (f" ({n} pairs{fit})" if n else fit)
    if isinstance(meta.get("best_layer"), int):
        return f"best layer {meta['best_layer']}: no held-out accuracy"
    return "no held-out accuracy"


def _bank_layers(text: str, param: str) -> list[int]:
    """``"1-3,7"`` -> ``[1, 2, 3, 7]``; a bad list fails naming ``param``."""
    layers: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        lo, sep, hi = part.partition("-")
        try:
            a = int(lo)
            b = int(hi) if sep else a
        except ValueError:
            fail(f"{param}: {part!r} is not a layer or a range like 1-23")
        if a < 0 or b < a:
            fail(f"{param}: {part!r} is not a layer or a range like 1-23")
        layers.extend(range(a, b + 1))
    return layers


def _bank_choice(value: str, choices, param: str) -> str:
    if value not in choices:
        fail(f"{param}: must be one of {', '.join(choices)}; got {value!r}")
    return value


@app.command("import")
def bank_import(
    file: Path = typer.Argument(..., help="A GGUF control vector (llama.cpp, repeng, EasySteer)."),
    name: str = typer.Option(..., "--name", "-n", help="Name of the new residual entry."),
    model: str = typer.Option(..., "--model", "-m", help="Model folder (or 'default') the vector is for."),
    out_path: Path = typer.Option(..., "--out", "-o", help="Bank file to write (.safetensors)."),
    convention: str = typer.Option("llama.cpp", "--convention",
                                   help="How direction.N maps to layers: llama.cpp, repeng, "
                                   "easysteer (all: N = layer) or cvector-generator (N = layer + 1)."),
    scale: float = typer.Option(1.0, "--scale", help="Multiply every direction (llama.cpp's strength)."),
    into: Optional[Path] = typer.Option(None, "--into", help="Existing bank to add the entry to."),
):
    """Import a GGUF control vector as a residual entry [L, d] of a vector bank.

    `direction.N` lands on emosteer layer N (the output of decoder layer N, 0-based), as
    llama.cpp applies it; see docs/CONTROL_VECTORS.md for the conventions."""
    from emosteer.request.bank import BankError
    from emosteer.request.controlvec import CONVENTIONS, load_control_vector

    _bank_choice(convention, CONVENTIONS, "--convention")
    existing_file(file, "FILE")
    base = load_bank(into, "--into") if into is not None else None
    out_file(out_path, "--out")
    info, _ = read_model_info(model_folder(model))
    if base is not None:
        try:
            base.validate_against(info, check_architecture=False)
        except BankError as e:
            fail(f"--into: {e}")
    try:
        bank = load_control_vector(file, info, name, convention=convention, scale=scale)
    except BankError as e:
        fail(f"FILE: {e}")
    meta = bank.meta(name)
    if base is not None:
        replaced = name in base
        try:
            base.add(name, "residual", bank.get(name), **meta)
        except BankError as e:
            fail(f"--into: {e}")
        if replaced:
            err.print(f"note: replaced entry {name!r} of {into}", highlight=False)
        bank = base
    bank.save(out_path)
    from emosteer.request.controlvec import layer_ranges

    hint = meta.get("model_hint")
    if hint is None:
        hint_note = "no model hint"
    elif meta.get("model_hint_matches"):
        hint_note = f"model hint {hint!r}"
    else:
        hint_note = f"[yellow]model hint {hint!r} does not look like {info.architecture}[/]"
    out.print(f"[green]{name}[/]: {len(meta['layers'])} directions from {meta['source_format']} "
              f"on layers {layer_ranges(meta['layers'])} (convention {convention}, scale {scale:g}); "
              f"{hint_note}", highlight=False)
    out.print(f"wrote {out_path} ({len(bank)} entries)", highlight=False)


@app.command("export")
def bank_export(
    file: Path = typer.Argument(..., help="A bank .safetensors file."),
    name: str = typer.Option(..., "--name", "-n", help="The residual entry to export."),
    out_path: Path = typer.Option(..., "--out", "-o", help="GGUF file to write."),
    flavour: str = typer.Option("repeng", "--flavour", help="repeng, or easysteer (adds controlvector.method)."),
    model_hint: Optional[str] = typer.Option(None, "--model-hint", help="controlvector.model_hint (default: the bank's architecture)."),
    method: Optional[str] = typer.Option(None, "--method", help="controlvector.method (easysteer flavour)."),
    convention: str = typer.Option("llama.cpp", "--convention", help="llama.cpp, repeng, easysteer or cvector-generator."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Layers to write, e.g. 1-23 or 4,8 (default: every non-zero row)."),
):
    """Export a residual entry of a bank as a GGUF control vector (repeng's layout).

    llama.cpp cannot steer layer 0: under the llama.cpp convention a non-zero row 0 is
    refused; leave it out with --layers 1-(L-1)."""
    from emosteer.request.bank import BankError
    from emosteer.request.controlvec import CONVENTIONS, FLAVOURS, save_control_vector

    _bank_choice(flavour, FLAVOURS, "--flavour")
    _bank_choice(convention, CONVENTIONS, "--convention")
    if method is not None and flavour != "easysteer":
        fail("--method: only the easysteer flavour writes controlvector.method")
    selected = _bank_layers(layers, "--layers") if layers is not None else None
    bank = load_bank(file, "FILE")
    out_file(out_path, "--out")
    if name in bank and bank.kind(name) == "probe":
        fail(f"--name: {name!r} is a probe (a classifier [L, d+1]), not a steering direction; "
             f"GGUF control vectors hold residual entries only: {bank.names('residual')}")
    if name not in bank or bank.kind(name) != "residual":
        fail(f"--name: no residual entry named {name!r} in {file}; it holds "
             f"{bank.names('residual')}")
    try:
        names = save_control_vector(bank, name, out_path, model_hint=model_hint, flavour=flavour,
                                    method=method, convention=convention, layers=selected)
    except BankError as e:
        fail(f"--{e}" if str(e).startswith("layers:") else str(e))
    out.print(f"[green]{name}[/]: wrote {len(names)} directions ({names[0]} .. {names[-1]}, "
              f"{flavour} layout, convention {convention}) to {out_path}", highlight=False)
