"""``emosteer model``: locate or convert the default model, and the shape facts of a model
folder as emosteer sees them."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from emosteer.cli._common import fail, model_folder, out, read_model_info

app = typer.Typer(help="Locate, convert and inspect models.", no_args_is_help=True,
                  rich_markup_mode="markdown")


@app.command("default")
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


@app.command("info")
def model_info(path: str = typer.Argument(..., help="Model folder, or 'default'.")):
    """Shape facts of a model (layers, heads, dims) as emosteer sees them."""
    folder = model_folder(path, "PATH")
    info, cfg = read_model_info(folder)
    t = Table(title=str(folder), show_header=False)
    for k, v in info.to_dict().items():
        t.add_row(k, str(v))
    t.add_row("dtype", str(cfg.get("torch_dtype") or cfg.get("dtype")))
    src = folder / "emosteer_source.json"
    if src.is_file():
        t.add_row("source", json.loads(src.read_text()).get("source", "?"))
    out.print(t)
