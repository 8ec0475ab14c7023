"""The ``kvfs`` command.

Subcommands live in their own modules and are imported only when run, so
``kvfs --help`` and ``kvfs ls`` start fast. To add a command, define a click
command in a module of this package and add one line to ``COMMANDS``.

Every error a command raises becomes one line on stderr and a non-zero exit
status (2 for usage errors); ``kvfs --debug`` shows the traceback instead.
"""

from __future__ import annotations

import importlib
import os

import click

# name -> "module:attribute" (a click.Command)
COMMANDS: dict[str, str] = {
    "ls": "kvfs.cli.listing:ls",
    "stat": "kvfs.cli.listing:stat",
    "tree": "kvfs.cli.listing:tree",
    "du": "kvfs.cli.listing:du",
    "pin": "kvfs.cli.manage:pin",
    "unpin": "kvfs.cli.manage:unpin",
    "evict": "kvfs.cli.manage:evict",
    "prefetch": "kvfs.cli.manage:prefetch",
    "cp": "kvfs.cli.copy:cp",
    "verify": "kvfs.cli.check:verify",
    "fsck": "kvfs.cli.check:fsck",
    "plan": "kvfs.cli.plan:plan",
    "mount": "kvfs.cli.mount:mount",
    "umount": "kvfs.cli.mount:umount",
    "demo": "kvfs.cli.demo:demo",
}


def _debug(ctx: click.Context) -> bool:
    return bool(ctx.find_root().params.get("debug")) or os.environ.get("KVFS_DEBUG", "") not in ("", "0")


def _unavailable(name: str, error: ImportError) -> click.Command:
    """Stands in for a command whose module cannot be imported (a missing optional dependency)."""

    @click.command(name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
                   add_help_option=False, help=f"(unavailable: {error})")
    def stub() -> None:
        from ._common import CommandError

        raise CommandError(f"this command cannot run here: {error}", 1, f"kvfs {name}")

    return stub


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(COMMANDS))

    def get_command(self, ctx: click.Context, name: str):
        cmd = super().get_command(ctx, name)
        if cmd is not None or name not in COMMANDS:
            return cmd
        module, _, attr = COMMANDS[name].partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except ImportError as e:
            if _debug(ctx):
                raise
            return _unavailable(name, e)

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as e:
            from ._common import one_line_usage

            raise one_line_usage(e) from None

    def invoke(self, ctx: click.Context):
        """Run the subcommand; turn any error into one line on stderr and an exit status."""
        try:
            return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as e:
            from ._common import one_line_usage

            raise one_line_usage(e, ctx) from None
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, BrokenPipeError):
            raise  # click reports these itself (a closed pipe, as in `kvfs ls | head`, quietly)
        except KeyboardInterrupt:
            sub = ctx.invoked_subcommand
            click.echo(f"kvfs {sub}: interrupted" if sub else "kvfs: interrupted", err=True)
            raise click.exceptions.Exit(130) from None  # 128 + SIGINT, as shells report it
        except Exception as e:  # noqa: BLE001 - the CLI's one error boundary
            if _debug(ctx):
                raise
            from ._common import translate

            sub = ctx.invoked_subcommand
            raise translate(e, f"kvfs {sub}" if sub else "kvfs") from None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--url",
    metavar="URL",
    default=None,
    help="Store URL, tiers joined by '::' (e.g. lmdb:///var/cache/kvfs, "
    "memory://?capacity=8GiB::s3://bucket/kv). Default: $KVFS_URL, else the embedded store in ~/.cache/kvfs.",
)
@click.option("--debug", is_flag=True, help="Show Python tracebacks and debug logs (also $KVFS_DEBUG=1).")
@click.version_option(package_name="kvfs")
def main(url: str | None, debug: bool) -> None:
    """kvfs: a filesystem for LLM KV caches.

    Paths name the virtual namespace: MODEL, MODEL/NAMESPACE,
    MODEL/NAMESPACE/HH and MODEL/NAMESPACE/HH/HASH.safetensors (a chunk).
    """
    if debug or os.environ.get("KVFS_DEBUG", "") not in ("", "0"):
        import logging

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("kvfs").setLevel(logging.DEBUG)
