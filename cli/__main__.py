"""``python -m kvfs.cli``: the ``kvfs`` command."""

from kvfs.cli import main

main(prog_name="kvfs")
