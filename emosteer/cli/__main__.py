"""``python -m emosteer.cli``: the ``emosteer`` command, for scripts and tests that run it
with a given interpreter (a package runs its ``__main__`` module, not ``__init__``)."""

from emosteer.cli import main

main()
