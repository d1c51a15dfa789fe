"""The ``emosteer`` command.

    emosteer model default                 convert / locate SmolLM2-135M-Instruct
    emosteer model info PATH               shape facts of a model folder
    emosteer extract  --model M --emotion joy --out bank.safetensors
    emosteer attribute --model M --bank B --emotion joy --out DIR
    emosteer generate IN.jsonl OUT.jsonl --model M --bank B
    emosteer demo [--full | --quick]       the whole method end to end, with a report
    emosteer schema                        the request JSON schema
    emosteer bank show FILE                what a vector bank holds
    emosteer bank import F.gguf --name N --model M --out B   a GGUF control vector -> bank
    emosteer bank export B --name N --out F.gguf             a bank entry -> GGUF
    emosteer serve MODEL [--bank B] [vLLM server flags ...]
                                           vLLM's OpenAI server with the plugin and
                                           the /v1/emosteer/* routes

One module per command group: ``model``, ``bank``, ``analysis`` (extract, attribute),
``run`` (generate, demo), ``serve`` (serve, schema); ``_common`` holds what they share.
Bad input (a missing file, an unknown emotion, a malformed config) ends with a one-line
message naming the field and exit code 2, never a traceback.
"""

from __future__ import annotations

from typing import List, Optional

import typer

from emosteer.cli import analysis, bank, model, run, serve

app = typer.Typer(
    name="emosteer",
    help="Per-request emotion steering, head patching and activation capture for vLLM "
    "(VEENA: interpreting and enhancing emotional circuits).",
    rich_markup_mode="markdown",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(model.app, name="model")
app.add_typer(bank.app, name="bank")
app.command()(serve.schema)
app.command()(analysis.extract)
app.command()(analysis.attribute)
app.command()(run.generate)
app.command("demo")(run.demo_cmd)
app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(serve.serve)


def main(argv: Optional[List[str]] = None) -> None:
    """Console entry point (``emosteer``)."""
    app(args=argv, prog_name="emosteer")
