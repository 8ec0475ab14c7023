"""The ``kvfs`` command.

Subcommands live in their own modules and are imported only when run, so
``kvfs --help`` and ``kvfs ls`` start fast. To add a command, define a click
command in a module of this package and add one line to ``COMMANDS``.
"""

from __future__ import annotations

import importlib

import click

# name -> "module:attribute" (a click.Command)
COMMANDS: dict[str, str] = {
    "demo": "kvfs.cli.demo:demo",
    "plan": "kvfs.cli.plan:plan",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(COMMANDS))

    def get_command(self, ctx: click.Context, name: str):
        cmd = super().get_command(ctx, name)
        if cmd is not None or name not in COMMANDS:
            return cmd
        module, _, attr = COMMANDS[name].partition(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kvfs")
def main() -> None:
    """kvfs: a filesystem for LLM KV caches."""
