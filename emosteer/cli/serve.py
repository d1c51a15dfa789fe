"""``emosteer serve`` (vLLM's OpenAI server with the plugin and the /v1/emosteer/* routes)
and ``emosteer schema`` (the request config those servers, and offline requests, take)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from emosteer.cli._common import (engine_env, existing_file, fail, load_bank, model_folder, out,
                                  positive, read_model_info, user_errors)


def schema(
    indent: int = typer.Option(2, help="JSON indent."),
):
    """Print the JSON schema of a request's emosteer config.

    The object goes under extra_args['emosteer'] (offline) or vllm_xargs.emosteer."""
    from emosteer.request.schema import json_schema

    print(json.dumps(json_schema(), indent=indent))


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


def serve(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Model folder, or 'default'."),
    bank: Optional[Path] = typer.Option(None, "--bank", "-b", help="Bank file loaded at start-up."),
    max_slots: Optional[int] = typer.Option(None, "--max-slots", help="Distinct configs resident at once (256)."),
    pool_mib: Optional[int] = typer.Option(None, "--pool-mib", help="Vector pool size in MiB (64)."),
    capture_rows: Optional[int] = typer.Option(None, "--capture-rows", help="Capture buffer rows (8192)."),
    upload_mib: Optional[int] = typer.Option(None, "--upload-mib", help="Largest vector upload (64 MiB)."),
    inline_mib: Optional[int] = typer.Option(None, "--inline-mib",
                                             help="Largest total of a request's inline vectors (16 MiB)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the command and exit."),
):
    """Serve MODEL with vLLM's OpenAI server, the emosteer plugin and its HTTP routes.

    Every option not listed here goes to vLLM unchanged (`--port`, `--api-key`,
    `--dtype`, `--enable-prefix-caching` ...). Requests carry their config in
    `vllm_xargs.emosteer`; vectors are managed at `/v1/emosteer/vectors`, captures are
    fetched at `/v1/emosteer/captures/<key>`, state at `/v1/emosteer/status`.
    SIGTERM stops the server gracefully (it is vLLM's own process)."""
    path = model_folder(model, "MODEL")
    settings = {}
    for key, value in (("max_slots", max_slots), ("pool_mib", pool_mib),
                       ("capture_rows", capture_rows), ("upload_mib", upload_mib),
                       ("inline_mib", inline_mib)):
        if value is not None:
            positive(value, "--" + key.replace("_", "-"))
            settings[key] = int(value)
    if bank is not None:
        existing_file(bank, "--bank")
        try:
            load_bank(bank).validate_against(read_model_info(path)[0])
        except user_errors() as e:
            fail(f"--bank: {e}")
    engine_env(quiet=False)
    argv, env = serve_command(str(path), bank, settings, list(ctx.args))
    if dry_run:
        out.print(" ".join(argv), highlight=False, soft_wrap=True)
        out.print(f"VLLM_PLUGINS={env['VLLM_PLUGINS']}", highlight=False)
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(argv[0], argv, env)  # vLLM's process from here on: its signals, its exit code
