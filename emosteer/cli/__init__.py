"""The ``emosteer`` command.

    emosteer model default                 convert / locate SmolLM2-135M-Instruct
    emosteer model info PATH               shape facts of a model folder
    emosteer extract  --model M --emotion joy --out bank.safetensors
    emosteer attribute --model M --bank B --emotion joy --out DIR
    emosteer generate IN.jsonl OUT.jsonl --model M --bank B
    emosteer demo [--quick]                the whole method end to end, with a report
    emosteer schema                        the request JSON schema
    emosteer bank show FILE                what a vector bank holds
    emosteer bank import F.gguf --name N --model M --out B   a GGUF control vector -> bank
    emosteer bank export B --name N --out F.gguf             a bank entry -> GGUF
    emosteer serve MODEL [--bank B] [vLLM server flags ...]
                                           vLLM's OpenAI server with the plugin and
                                           the /v1/emosteer/* routes

Bad input (a missing file, an unknown emotion, a malformed config) ends with a one-line
message naming the field and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="emosteer",
    help="Per-request emotion steering, head patching and activation capture for vLLM "
    "(VEENA: interpreting and enhancing emotional circuits).",
    rich_markup_mode="markdown",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
model_app = typer.Typer(help="Locate, convert and inspect models.", no_args_is_help=True,
                        rich_markup_mode="markdown")
bank_app = typer.Typer(help="Inspect vector banks; import and export GGUF control vectors.", no_args_is_help=True,
                       rich_markup_mode="markdown")
app.add_typer(model_app, name="model")
app.add_typer(bank_app, name="bank")

out = Console()
err = Console(stderr=True)

USER_ERROR = 2


class Backend(str, Enum):
    auto = "auto"
    vllm = "vllm"
    hf = "hf"


def fail(message: str, code: int = USER_ERROR) -> "typer.Exit":
    """Print ``Error: message`` to stderr and exit with ``code`` (2: bad input)."""
    err.print(f"[bold red]Error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _user_errors():
    """Exception types that are the user's input, not a bug (message, exit 2)."""
    from emosteer.request.bank import BankError
    from emosteer.request.spec import SpecError

    types = [SpecError, BankError, FileNotFoundError, NotADirectoryError, IsADirectoryError]
    try:
        from emosteer.data.format import PairFormatError

        types.append(PairFormatError)
    except ImportError:  # pragma: no cover - data package missing
        pass
    return tuple(types)


def _engine_env(quiet: bool = True) -> None:
    """vLLM-on-CPU defaults (a small KV cache, every core for the model); the user's own
    settings win. ``quiet``: vLLM logs warnings only, so progress bars stay readable."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if quiet:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


# ------------------------------------------------------------------------ validation
def _model_path(model: str, param: str = "--model") -> Path:
    from emosteer.models import resolve_model

    try:
        return resolve_model(model)
    except ValueError as e:
        fail(f"{param}: {e}")
    except RuntimeError as e:  # conversion of the default model failed (download ...)
        fail(f"{param}: could not prepare the default model: {e}", code=1)


def _existing_file(path: Path, param: str) -> Path:
    if not path.exists():
        fail(f"{param}: file {str(path)!r} does not exist")
    if path.is_dir():
        fail(f"{param}: {str(path)!r} is a folder, expected a file")
    return path


def _out_file(path: Path, param: str) -> Path:
    if path.exists() and path.is_dir():
        fail(f"{param}: {str(path)!r} is a folder, expected a file path")
    if not path.parent.exists():
        fail(f"{param}: folder {str(path.parent)!r} does not exist")
    return path


def _emotions(emotion: str, param: str = "--emotion") -> list[str]:
    from emosteer.analysis.emotion import normalize_category

    names = [e.strip() for e in emotion.split(",") if e.strip()]
    if not names:
        fail(f"{param}: name at least one emotion (e.g. joy)")
    try:
        return [normalize_category(n) for n in names]
    except ValueError as e:
        fail(f"{param}: {e}")


def _builtin_only(emotions: list[str], param: str = "--emotion") -> None:
    from emosteer.data.builtin import BUILTIN_EMOTIONS

    unknown = [e for e in emotions if e not in BUILTIN_EMOTIONS]
    if unknown:
        fail(f"{param}: no built-in pairs for {unknown}; built-in: {list(BUILTIN_EMOTIONS)} "
             "(or pass your own with --pairs)")


def _positive(value: float | int, param: str, upper: float | None = None) -> None:
    if value <= 0 or (upper is not None and value > upper):
        rng = f"in (0, {upper}]" if upper is not None else "> 0"
        fail(f"{param}: must be {rng}, got {value}")


def _load_bank(path: Path, param: str = "--bank"):
    from emosteer.request.bank import BankError, VectorBank

    _existing_file(path, param)
    try:
        return VectorBank.load(path)
    except BankError as e:
        fail(f"{param}: {e}")


def _model_info(path: Path):
    from emosteer.request.bank import BankError, ModelInfo

    cfg_path = path / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        fail(f"{cfg_path}: not valid JSON ({e})")
    try:
        return ModelInfo.from_hf_config(cfg), cfg
    except BankError as e:
        fail(f"{cfg_path}: {e}")


# ------------------------------------------------------------------------------ model
@model_app.command("default")
def model_default(
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the path."),
):
    """Convert or locate the default model (SmolLM2-135M-Instruct); print its folder.

    The first call downloads and converts it (~1 min); later calls only print the path."""
    from emosteer.models import ensure_default_model

    try:
        path = ensure_default_model(progress=not quiet)
    except RuntimeError as e:
        fail(f"could not prepare the default model: {e}", code=1)
    print(path)


@model_app.command("info")
def model_info(path: str = typer.Argument(..., help="Model folder, or 'default'.")):
    """Shape facts of a model (layers, heads, dims) as emosteer sees them."""
    folder = _model_path(path, "PATH")
    info, cfg = _model_info(folder)
    t = Table(title=str(folder), show_header=False)
    for k, v in info.to_dict().items():
        t.add_row(k, str(v))
    t.add_row("dtype", str(cfg.get("torch_dtype") or cfg.get("dtype")))
    src = folder / "emosteer_source.json"
    if src.is_file():
        t.add_row("source", json.loads(src.read_text()).get("source", "?"))
    out.print(t)


# ------------------------------------------------------------------------------- bank
@bank_app.command("show")
def bank_show(file: Path = typer.Argument(..., help="A bank .safetensors file.")):
    """List the entries of a vector bank: name, kind, shape, norm, metadata."""
    bank = _load_bank(file, "FILE")
    info = bank.info
    title = f"{file} — {len(bank)} entries"
    if info is not None:
        title += (f" — model {info.architecture} L={info.num_layers} d={info.hidden_size} "
                  f"H={info.num_heads}×{info.head_dim} I={info.intermediate_size}")
    t = Table(title=title)
    for col in ("name", "kind", "shape", "norm / count", "metadata"):
        t.add_column(col, overflow="fold")
    for name in bank.names():
        x, kind = bank.get(name), bank.kind(name)
        size = (f"{int(x.sum().item())} set" if kind in ("neurons", "heads")
                else f"{float(x.float().norm()):.4g}")
        meta = json.dumps(bank.meta(name), sort_keys=True)
        t.add_row(name, kind, "×".join(map(str, x.shape)), size,
                  meta if len(meta) < 160 else meta[:157] + "...")
    out.print(t)


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


@bank_app.command("import")
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
    _existing_file(file, "FILE")
    base = _load_bank(into, "--into") if into is not None else None
    _out_file(out_path, "--out")
    info, _ = _model_info(_model_path(model))
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


@bank_app.command("export")
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
    bank = _load_bank(file, "FILE")
    _out_file(out_path, "--out")
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


# ----------------------------------------------------------------------------- schema
@app.command()
def schema(
    indent: int = typer.Option(2, help="JSON indent."),
):
    """Print the JSON schema of a request's emosteer config.

    The object goes under extra_args['emosteer'] (offline) or vllm_xargs.emosteer."""
    from emosteer.request.spec import json_schema

    print(json.dumps(json_schema(), indent=indent))


# ---------------------------------------------------------------------------- extract
@app.command()
def extract(
    model: str = typer.Option("default", "--model", "-m", help="Model folder or 'default'."),
    emotion: str = typer.Option(..., "--emotion", "-e", help="Emotion(s), comma-separated: joy,sadness."),
    out_path: Path = typer.Option(..., "--out", "-o", help="Bank file to write (.safetensors)."),
    pairs: Optional[Path] = typer.Option(None, "--pairs", help="Pairs JSONL (default: the built-in set)."),
    tau: float = typer.Option(0.5, "--tau", help="Keep pairs whose emotional narrative hit rate is >= tau."),
    max_pairs: int = typer.Option(0, "--max-pairs", help="Use at most this many pairs per emotion (0: all)."),
    backend: Backend = typer.Option(Backend.auto, "--backend", help="vllm, hf, or auto."),
    max_tokens: int = typer.Option(48, "--max-tokens", help="Narrative length for the hit-rate filter."),
):
    """Extract steering vectors into a vector bank (safetensors).

    S_l = mean over kept pairs of h⁺ − h⁻ at the last prompt token, every layer; a pair
    is kept when the model's narrative for its emotional side has hit rate ≥ tau. Also
    writes the head-space vector `EMOTION.h` and an audit JSON beside the bank."""
    emotions = _emotions(emotion)
    if not 0.0 <= tau < 1.0:
        fail(f"--tau: must be in [0, 1), got {tau}")
    if max_pairs < 0:
        fail(f"--max-pairs: must be >= 0, got {max_pairs}")
    _positive(max_tokens, "--max-tokens", 4096)
    if pairs is not None:
        _existing_file(pairs, "--pairs")
    else:
        _builtin_only(emotions)
    _out_file(out_path, "--out")
    folder = _model_path(model)
    _engine_env()
    from emosteer.apps.demo import close_runner, open_runner
    from emosteer.analysis.extract import extract_vectors

    runner, note = open_runner(folder, backend.value)
    err.print(f"backend: {note}", highlight=False)
    try:
        ex = extract_vectors(runner, str(pairs) if pairs else None, emotions,
                             backend=runner.backend, tau=tau, max_new_tokens=max_tokens,
                             limit=max_pairs or None)
    except _user_errors() as e:
        fail(str(e))
    except ValueError as e:  # e.g. no pairs for the emotion in --pairs
        fail(f"--pairs: {e}")
    finally:
        close_runner(runner)
    audit = out_path.with_name(out_path.name + ".extract.json")
    ex.save(out_path, audit)
    for emo, m in ex.meta.items():
        kept = f"{m['n_kept']}/{m['n_pairs']} pairs kept (tau={tau})"
        if m["filter"] != "hit_rate":
            kept = f"no pair passed tau={tau}: all {m['n_pairs']} pairs used"
        out.print(f"[green]{emo}[/]: {kept}; vectors '{emo}' [L, d] and '{emo}.h' [L, H, D]")
    out.print(f"wrote {out_path} and {audit}")


# -------------------------------------------------------------------------- attribute
@app.command()
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
    emo = _emotions(emotion)[0]
    parts = [w.strip() for w in what.split(",") if w.strip()]
    bad = sorted(set(parts) - {"layers", "heads", "neurons", "attn"})
    if bad or not parts:
        fail(f"--what: unknown part(s) {bad or what!r}; use layers, heads, neurons, attn")
    _positive(beta, "--beta", 100)
    _positive(n_prompts, "--n-prompts", 4096)
    _positive(alpha, "--alpha", 100)
    _positive(top_heads, "--top-heads", 100000)
    _positive(top_neurons, "--top-neurons", 10**7)
    _positive(max_tokens, "--max-tokens", 4096)
    b = _load_bank(bank)
    if emo not in b or b.kind(emo) != "residual":
        fail(f"--bank: no residual vector named {emo!r} in {bank} (run emosteer extract); "
             f"it holds {b.names()}")
    if pairs is not None:
        _existing_file(pairs, "--pairs")
    else:
        _builtin_only([emo])
    if out_dir.exists() and not out_dir.is_dir():
        fail(f"--out: {str(out_dir)!r} exists and is not a folder")
    folder = _model_path(model)
    info, _ = _model_info(folder)
    from emosteer.request.bank import BankError

    try:
        b.validate_against(info, check_architecture=False)
    except BankError as e:
        fail(f"--bank: {e}")
    _engine_env()
    from emosteer.analysis.attribution import attribute as run_attribution
    from emosteer.data import read_pairs
    from emosteer.apps.demo import close_runner, open_runner

    ps = None
    if pairs is not None:
        try:
            ps = [p for p in read_pairs(pairs) if p.emotion == emo]
        except _user_errors() as e:
            fail(f"--pairs: {e}")
        if not ps:
            fail(f"--pairs: {pairs} holds no pair for emotion {emo!r}")
    runner, note = open_runner(folder, backend.value)
    err.print(f"backend: {note}", highlight=False)
    try:
        res = run_attribution(runner, emo, ps, bank=b, backend=runner.backend, alpha=alpha,
                              top_heads=top_heads, top_neurons=top_neurons, n_pairs=n_prompts,
                              n_prompts=n_prompts, max_new_tokens=max_tokens, parts=parts,
                              beta=beta, out_dir=out_dir)
    except _user_errors() as e:
        fail(str(e))
    finally:
        close_runner(runner)
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


# --------------------------------------------------------------------------- generate
@app.command()
def generate(
    in_path: Path = typer.Argument(..., help="Input JSONL: {id, prompt|messages, image?, steer?, emotion?} "
                                   "(image: a path, for vision-language models)."),
    out_path: Path = typer.Argument(..., help="Output JSONL (appended; a rerun resumes)."),
    model: str = typer.Option("default", "--model", "-m", help="Model folder or 'default'."),
    bank: Optional[Path] = typer.Option(None, "--bank", "-b", help="Bank the steer configs name."),
    max_tokens: int = typer.Option(64, "--max-tokens", help="New tokens per narrative."),
    batch_size: int = typer.Option(64, "--batch-size", help="Rows per engine call (and per flush)."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    seed: int = typer.Option(0, "--seed"),
    no_chat: bool = typer.Option(False, "--no-chat", help="Do not apply the chat template."),
    eager: bool = typer.Option(False, "--eager", help="vLLM without torch.compile (faster start)."),
    use_ray: bool = typer.Option(False, "--ray", help="Run on Ray Data: one engine per actor."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address",
                                              help="A running Ray cluster (default: start a local one)."),
    workers: int = typer.Option(1, "--workers", help="With --ray: engine actors."),
    preset: Optional[str] = typer.Option(None, "--preset",
                                         help="A request config stored in --bank (e.g. joy.preset, "
                                              "written by emosteer demo) for rows without 'steer'."),
    no_perplexity: bool = typer.Option(False, "--no-perplexity",
                                       help="Skip the perplexity of each narrative under the unsteered "
                                            "model (one teacher-forced pass per batch)."),
):
    """Generate steered narratives for a JSONL file on vLLM (resumable).

    Rows already in OUT (by id) are skipped, so an interrupted run resumes. With --ray
    the same job runs on Ray Data (actors hosting the engine, on one machine or a
    cluster); OUT is written by this process, batch by batch, in input order."""
    from emosteer.apps.generate import GenerateConfig, generate_jsonl, read_rows
    from emosteer.request.spec import SpecError, SteerSpec

    _existing_file(in_path, "IN")
    _out_file(out_path, "OUT")
    _positive(max_tokens, "--max-tokens", 32768)
    _positive(batch_size, "--batch-size", 65536)
    if not 0.0 <= temperature <= 10.0:
        fail(f"--temperature: must be in [0, 10], got {temperature}")
    try:
        rows = read_rows(in_path)
    except ValueError as e:
        fail(f"IN: {e}")
    if not rows:
        fail(f"IN: {in_path} holds no rows")
    needs_bank = False
    for r in rows:
        try:
            spec = SteerSpec.parse(r.get("steer"))
        except SpecError as e:
            fail(f"IN: row {r['id']!r}: steer.{e.field}: {str(e).split(': ', 1)[-1]}")
        needs_bank |= bool(spec.vector_names())
        if r.get("emotion") is not None:
            _emotions(str(r["emotion"]), f"IN: row {r['id']!r}: emotion")
    b = _load_bank(bank) if bank is not None else None
    preset_cfg = None
    if preset is not None:
        if b is None:
            fail("--preset: needs --bank (the bank that stores the preset)")
        from emosteer.request.bank import BankError as _BE

        try:
            preset_cfg = b.preset(preset)
        except _BE as e:
            fail(f"--preset: {e}")
        rows = [r if "steer" in r else {**r, "steer": preset_cfg} for r in rows]
        needs_bank = True
    if needs_bank and b is None:
        fail("--bank: rows name steering vectors; pass the bank that holds them")
    folder = _model_path(model)
    if b is not None:
        info, _ = _model_info(folder)
        from emosteer.request.bank import BankError

        try:
            b.validate_against(info, check_architecture=False)
            for r in rows:
                SteerSpec.parse(r.get("steer")).validate(b, info)
        except BankError as e:
            fail(f"--bank: {e}")
        except SpecError as e:
            fail(f"IN: row {r['id']!r}: steer.{e}")
    _engine_env()
    _positive(workers, "--workers", 1024)
    if (ray_address or workers != 1) and not use_ray:
        fail("--ray-address / --workers need --ray")
    cfg = GenerateConfig(model=str(folder), bank=str(Path(bank).resolve()) if bank else None,
                         max_tokens=max_tokens, batch_size=batch_size,
                         temperature=temperature, seed=seed, chat=not no_chat, enforce_eager=eager,
                         preset=preset, preset_config=preset_cfg, perplexity=not no_perplexity)
    try:
        if use_ray:
            try:
                from emosteer.apps.ray_job import generate_jsonl_ray
            except ImportError as e:
                fail(f"--ray: Ray Data is not installed ({e}); pip install 'emosteer[ray]'")
            n = generate_jsonl_ray(in_path, out_path, cfg, workers=workers, address=ray_address)
        else:
            n = generate_jsonl(in_path, out_path, cfg)
    except _user_errors() as e:
        fail(str(e))
    out.print(f"{n} rows written to {out_path} ({len(rows) - n} were already there)")


# ------------------------------------------------------------------------------- demo
def _demo_lvlm(out_dir: Path, backend: str, quiet: bool) -> None:
    """Run emosteer.apps.demo_lvlm in a child process that can import torchvision (vLLM's
    Qwen2-VL needs it; the CPU install keeps it beside the venv, see scripts/install.sh)."""
    import subprocess
    import tempfile

    from emosteer.models.tiny_lvlm import torchvision_env

    if out_dir.exists() and not out_dir.is_dir():
        fail(f"--out: {str(out_dir)!r} exists and is not a folder")
    _engine_env()
    with tempfile.TemporaryDirectory(prefix="emosteer-tv-") as shim:
        env = torchvision_env(shim)
        if env is None:
            fail("--lvlm needs torchvision (vLLM's vision models import it): "
                 "pip install --no-deps --target <venv>/torchvision-cpu torchvision==0.28.0")
        cmd = [sys.executable, "-m", "emosteer.apps.demo_lvlm", "--out", str(out_dir), "--backend", backend]
        if quiet:
            cmd.append("--quiet")
        rc = subprocess.call(cmd, env=env)
    if rc != 0:
        fail(f"the LVLM demo failed (exit status {rc}); see the messages above")
    out.print(f"[bold green]report:[/] {out_dir / 'report.md'}")


@app.command("demo")
def demo_cmd(
    model: str = typer.Option("default", "--model", "-m", help="Model folder or 'default'."),
    out_dir: Path = typer.Option(Path("emosteer-report"), "--out", "-o", help="Report folder."),
    emotion: str = typer.Option("joy", "--emotion", "-e", help="Emotion(s), comma-separated."),
    backend: Backend = typer.Option(Backend.auto, "--backend", help="vllm, hf, or auto."),
    quick: bool = typer.Option(False, "--quick", help="A much smaller run (smoke test)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    lvlm: bool = typer.Option(False, "--lvlm", help="The method's mechanics on a tiny random "
                              "vision-language model with synthetic image pairs (VEE, ENA, "
                              "attention to the image)."),
):
    """Run the whole method end to end and write a report folder.

    extract → layer attribution → head map + patching → neurons → steered vs unsteered
    narratives on held-out prompts → report.md, plots, results.json, narratives.jsonl,
    bank.safetensors. About 18 min for SmolLM2-135M on 2 CPU cores (vLLM start-up and
    compile, 3–5 min, included); --quick: a few minutes, mostly engine start-up.

    --lvlm: a tiny random Qwen2-VL and synthetic image pairs: extraction, attention-to-image
    attribution confirmed by VEE, ENA, and one mixed batch of image and text prompts with
    VEE / ENA per request (about 3 min; mechanics only: effect sizes need a real LVLM)."""
    if lvlm:
        return _demo_lvlm(out_dir, backend.value if backend.value != "auto" else "vllm", quiet)
    emotions = _emotions(emotion)
    _builtin_only(emotions)
    if out_dir.exists() and not out_dir.is_dir():
        fail(f"--out: {str(out_dir)!r} exists and is not a folder")
    if model.strip().lower() not in ("default", "smollm2"):
        _model_path(model)
    _engine_env()
    from emosteer.apps.demo import run_demo

    try:
        report = run_demo(model=model, out=out_dir, emotions=tuple(emotions),
                          backend=backend.value, quick=quick, progress=not quiet)
    except _user_errors() as e:
        fail(str(e))
    out.print(f"[bold green]report:[/] {report}")


def serve_command(model: str, bank: Optional[Path], settings: dict, extra: list[str],
                  environ: Optional[dict] = None) -> tuple[list[str], dict]:
    """The argv and environment ``emosteer serve`` runs: vLLM's OpenAI server module (the
    ``vllm`` console script of the CPU wheel does not start), with ``VLLM_PLUGINS`` naming
    emosteer for both plugin groups (the general plugin, the HTTP routes) and every other
    general/platform plugin installed, so enabling the routes disables nothing."""
    from importlib.metadata import entry_points

    env = dict(os.environ if environ is None else environ)
    if env.get("VLLM_PLUGINS") is not None:
        names = [n for n in env["VLLM_PLUGINS"].split(",") if n]
    else:
        names = sorted({ep.name for g in ("vllm.general_plugins", "vllm.platform_plugins")
                        for ep in entry_points(group=g)})
    if "emosteer" not in names:
        names.append("emosteer")
    env["VLLM_PLUGINS"] = ",".join(names)
    if bank is not None:
        env["EMOSTEER_BANK"] = str(Path(bank).resolve())
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    additional = {}
    if "--additional-config" in extra:
        i = extra.index("--additional-config")
        try:
            additional = json.loads(extra[i + 1])
        except (IndexError, json.JSONDecodeError) as e:
            fail(f"--additional-config: not valid JSON ({e})")
        extra = extra[:i] + extra[i + 2:]
    if settings:
        additional.setdefault("emosteer", {}).update(settings)
    if additional:
        argv += ["--additional-config", json.dumps(additional)]
    return argv + list(extra), env


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Model folder, or 'default'."),
    bank: Optional[Path] = typer.Option(None, "--bank", "-b", help="Bank file loaded at start-up."),
    max_slots: Optional[int] = typer.Option(None, "--max-slots", help="Distinct configs resident at once (256)."),
    pool_mib: Optional[int] = typer.Option(None, "--pool-mib", help="Vector pool size in MiB (64)."),
    capture_rows: Optional[int] = typer.Option(None, "--capture-rows", help="Capture buffer rows (8192)."),
    upload_mib: Optional[int] = typer.Option(None, "--upload-mib", help="Largest vector upload (64 MiB)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the command and exit."),
):
    """Serve MODEL with vLLM's OpenAI server, the emosteer plugin and its HTTP routes.

    Every option not listed here goes to vLLM unchanged (`--port`, `--api-key`,
    `--dtype`, `--enable-prefix-caching` ...). Requests carry their config in
    `vllm_xargs.emosteer`; vectors are managed at `/v1/emosteer/vectors`, captures are
    fetched at `/v1/emosteer/captures/<key>`, state at `/v1/emosteer/status`.
    SIGTERM stops the server gracefully (it is vLLM's own process)."""
    path = _model_path(model, "MODEL")
    settings = {}
    for key, value in (("max_slots", max_slots), ("pool_mib", pool_mib),
                       ("capture_rows", capture_rows), ("upload_mib", upload_mib)):
        if value is not None:
            _positive(value, "--" + key.replace("_", "-"))
            settings[key] = int(value)
    if bank is not None:
        _existing_file(bank, "--bank")
        try:
            _load_bank(bank).validate_against(_model_info(path)[0])
        except _user_errors() as e:
            fail(f"--bank: {e}")
    _engine_env(quiet=False)
    argv, env = serve_command(str(path), bank, settings, list(ctx.args))
    if dry_run:
        out.print(" ".join(argv), highlight=False, soft_wrap=True)
        out.print(f"VLLM_PLUGINS={env['VLLM_PLUGINS']}", highlight=False)
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(argv[0], argv, env)  # vLLM's process from here on: its signals, its exit code


def main(argv: Optional[List[str]] = None) -> None:
    """Console entry point (``emosteer``)."""
    app(args=argv, prog_name="emosteer")


if __name__ == "__main__":  # pragma: no cover
    main()
