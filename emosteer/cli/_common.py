"""What every ``emosteer`` command shares: the consoles, the one way to fail on bad input
(a one-line message naming the field, exit code 2), the engine environment and the
validators of common options (model folder, files, emotions, banks)."""

from __future__ import annotations

import json
import os
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console

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


def user_errors():
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


def engine_env(quiet: bool = True) -> None:
    """The engine's environment for this process and its children: vLLM-on-CPU defaults
    (``emosteer.analysis.runners.cpu_engine_env``; the user's own settings win).
    ``quiet``: vLLM logs warnings only, so progress bars stay readable."""
    from emosteer.analysis.runners import cpu_engine_env

    cpu_engine_env()
    if quiet:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


# ------------------------------------------------------------------------ validation
def model_folder(model: str, param: str = "--model") -> Path:
    from emosteer.models import resolve_model

    try:
        return resolve_model(model)
    except ValueError as e:
        fail(f"{param}: {e}")
    except RuntimeError as e:  # conversion of the default model failed (download ...)
        fail(f"{param}: could not prepare the default model: {e}", code=1)


def existing_file(path: Path, param: str) -> Path:
    if not path.exists():
        fail(f"{param}: file {str(path)!r} does not exist")
    if path.is_dir():
        fail(f"{param}: {str(path)!r} is a folder, expected a file")
    return path


def out_file(path: Path, param: str) -> Path:
    if path.exists() and path.is_dir():
        fail(f"{param}: {str(path)!r} is a folder, expected a file path")
    if not path.parent.exists():
        fail(f"{param}: folder {str(path.parent)!r} does not exist")
    return path


def parse_emotions(emotion: str, param: str = "--emotion") -> list[str]:
    from emosteer.analysis.emotion import normalize_category

    names = [e.strip() for e in emotion.split(",") if e.strip()]
    if not names:
        fail(f"{param}: name at least one emotion (e.g. joy)")
    try:
        return [normalize_category(n) for n in names]
    except ValueError as e:
        fail(f"{param}: {e}")


def builtin_only(emotions: list[str], param: str = "--emotion") -> None:
    from emosteer.data.builtin import BUILTIN_EMOTIONS

    unknown = [e for e in emotions if e not in BUILTIN_EMOTIONS]
    if unknown:
        fail(f"{param}: no built-in pairs for {unknown}; built-in: {list(BUILTIN_EMOTIONS)} "
             "(or pass your own with --pairs)")


def positive(value: float | int, param: str, upper: float | None = None) -> None:
    if value <= 0 or (upper is not None and value > upper):
        rng = f"in (0, {upper}]" if upper is not None else "> 0"
        fail(f"{param}: must be {rng}, got {value}")


def load_bank(path: Path, param: str = "--bank"):
    from emosteer.request.bank import BankError, VectorBank

    existing_file(path, param)
    try:
        return VectorBank.load(path)
    except BankError as e:
        fail(f"{param}: {e}")


def read_model_info(path: Path):
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
