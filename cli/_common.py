"""What every ``kvfs`` subcommand shares: opening the store, errors, tables, progress, token files.

Only click and the standard library are imported here; the store (numpy,
LMDB) is imported by :func:`open_store` when a command runs, so that
``kvfs --help`` stays instant.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from typing import Any, Callable, Iterator, Sequence

import click

# exit statuses (documented in docs/cli.md)
EXIT_FAILED = 1  # the command ran and something failed or was refused
EXIT_USAGE = 2  # bad arguments: options, sizes, durations, URLs, token files


class CommandError(click.ClickException):
    """An error shown as one line, ``kvfs <command>: <message>``, with an exit status."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED, command: str = "kvfs") -> None:
        super().__init__(" ".join(str(message).split()))  # one line, whatever the message held
        self.exit_code = exit_code
        self.command = command

    def show(self, file: Any = None) -> None:
        click.echo(f"{self.command}: {self.message}", file=file or sys.stderr)


class OneLineUsageError(click.UsageError):
    """A usage error on one line (click's default spreads it over four)."""

    def show(self, file: Any = None) -> None:
        path = getattr(self, "command", None) or (self.ctx.command_path if self.ctx is not None else "kvfs")
        msg = " ".join(self.format_message().split())
        click.echo(f"{path}: {msg} (see '{path} --help')", file=file or sys.stderr)


def one_line_usage(e: click.UsageError, ctx: click.Context | None = None) -> OneLineUsageError:
    """``e`` shown on one line; ``ctx`` is the context to name when ``e`` carries none."""
    if isinstance(e, OneLineUsageError):
        return e
    out = OneLineUsageError(e.format_message(), e.ctx or ctx)
    out.exit_code = EXIT_USAGE
    if e.ctx is None and ctx is not None and ctx.invoked_subcommand:
        out.command = f"{ctx.command_path} {ctx.invoked_subcommand}"
    return out


def translate(e: BaseException, command: str) -> click.ClickException:
    """A kvfs (or backend, or OS) exception as a one-line CLI error with the right exit status."""
    from kvfs.errors import BackendUnavailable, InvalidInput, InvalidURL

    if isinstance(e, InvalidURL):
        return CommandError(f"bad store URL: {e} (check --url or $KVFS_URL)", EXIT_USAGE, command)
    if isinstance(e, InvalidInput):
        return CommandError(str(e), EXIT_USAGE, command)
    if isinstance(e, BackendUnavailable):
        return CommandError(str(e), EXIT_FAILED, command)
    if isinstance(e, OSError):
        msg = str(e.strerror) if e.strerror else str(e)
        msg = re.sub(r"\[Errno -?\d+\] ", "", msg)  # people read the words, not the number
        if e.filename and str(e.filename) not in msg:
            msg = f"{msg}: {e.filename}"
        return CommandError(msg, EXIT_FAILED, command)
    if isinstance(e, (ValueError, KeyError)):
        text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        return CommandError(text, EXIT_FAILED, command)
    return CommandError(
        f"internal error: {type(e).__name__}: {e} (run `kvfs --debug ...` for the traceback and report it)",
        EXIT_FAILED,
        command,
    )


# ------------------------------------------------------------------------------------------ stores
def _local_dirs(url: str) -> list[tuple[str, str]]:
    """(scheme, directory) of each tier stored in a local directory."""
    from kvfs.url import parse_url

    return [(t.scheme, os.path.expanduser(t.location)) for t in parse_url(url) if t.scheme in ("lmdb", "file")]


def refuse_missing_store(url: str, command: str, hint: str) -> None:
    """A store kept only in local directories (and process memory, which holds nothing yet), none of which
    exists, is a typo, not a store: a :class:`CommandError`. A missing directory next to existing tiers is a
    tier being added."""
    from kvfs.url import parse_url

    local = _local_dirs(url)
    kept = [t for t in parse_url(url) if t.scheme != "memory"]
    if local and len(local) == len(kept) and not any(os.path.isdir(d) for _, d in local):
        scheme, directory = local[0]
        raise CommandError(f"no kvfs store at {scheme}://{directory}: the directory does not exist ({hint})",
                           EXIT_FAILED, command)


def open_store(url: str | None = None, *, read_only: bool = False, create: bool = False,
               signing_key: bytes | None = None, unsigned: bool = False, hint: str = "check --url or $KVFS_URL"):
    """Open a store for the running command; it is closed (and flushed) when the command ends.

    ``url=None`` is the global ``--url`` (``$KVFS_URL``, else the embedded
    default). A local tier whose directory does not exist is an error unless
    ``create`` or the URL is the embedded default: a mistyped path must not
    silently become a new, empty store. ``hint``: where the URL came from, for
    errors (``kvfs cp`` takes its URLs as arguments, not from ``--url``).
    """
    from kvfs.errors import InvalidURL

    ctx = click.get_current_context()
    explicit = True
    if url is None:
        url = ctx.find_root().params.get("url")
    if url is None:
        from kvfs.url import default_url

        explicit = bool(os.environ.get("KVFS_URL", "").strip())
        url = default_url()
    from kvfs.store import Store

    try:
        if explicit and not create:
            refuse_missing_store(url, ctx.command_path, hint)
        # unsigned: no signatures required (checksums still apply)
        store = Store(url, read_only=read_only, signing_key=False if unsigned else signing_key)
    except InvalidURL as e:
        raise CommandError(f"bad store URL: {e} ({hint})", EXIT_USAGE, ctx.command_path) from None
    except TypeError as e:  # a backend given an option it does not take
        from kvfs.url import parse_url

        shown = "::".join(t.redacted() for t in parse_url(url))
        raise CommandError(f"bad option in store URL {shown}: {e}", EXIT_USAGE, ctx.command_path) from e
    return ctx.with_resource(store)


# ------------------------------------------------------------------------------------------ output
def echo_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=False, default=_json_default))


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def size(n: int | float | None) -> str:
    if n is None:
        return "-"
    from kvfs.units import format_size

    return format_size(n)


def age(ts: float | None, now: float | None = None) -> str:
    """``3d ago`` for a timestamp (seconds since the epoch); ``-`` when unknown."""
    if not ts:
        return "-"
    from kvfs.units import format_duration

    delta = (now or time.time()) - ts
    if delta < 1:
        return "just now"
    return f"{format_duration(delta)} ago"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> None:
    """Print an aligned table; columns whose index is in ``right`` are right-aligned. The last column is free."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for r in cells:
        parts = []
        for i, c in enumerate(r):
            if i == len(r) - 1:
                parts.append(c.rjust(widths[i]) if i in right else c)
            else:
                parts.append(c.rjust(widths[i]) if i in right else c.ljust(widths[i]))
        click.echo("  ".join(parts).rstrip())


def warn(message: str) -> None:
    click.echo(message, err=True)


# ------------------------------------------------------------------------------------------ progress
def progress_enabled() -> bool:
    """Progress bars only for people: stdout and stderr both terminals."""
    try:
        return sys.stdout.isatty() and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def progress(total_bytes: int, label: str, enabled: bool | None = None) -> Iterator[Callable[[int], None]]:
    """A byte-counting progress bar on stderr; yields ``update(nbytes)`` (a no-op when off)."""
    if enabled is None:
        enabled = progress_enabled()
    if not enabled or total_bytes <= 0:
        yield lambda n: None
        return
    from kvfs.units import format_size

    with click.progressbar(
        length=total_bytes,
        label=label,
        file=sys.stderr,
        show_eta=True,
        show_percent=True,
        item_show_func=None,
        info_sep="  ",
    ) as bar:
        done = [0]

        def update(n: int) -> None:
            done[0] += n
            bar.label = f"{label} {format_size(done[0])}/{format_size(total_bytes)}"
            bar.update(n)

        yield update


# ------------------------------------------------------------------------------------------ tokens
def read_tokens_file(path: str) -> list[int]:
    """Token ids from a file (``-``: stdin): a JSON list of ints, or ints separated by whitespace."""
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except OSError as e:
        raise click.BadParameter(f"cannot read {path}: {e.strerror or e}", param_hint="'--tokens-file'") from e
    except UnicodeDecodeError as e:
        raise click.BadParameter(f"{path} is not text: write the token ids as a JSON list or "
                                 "whitespace-separated integers", param_hint="'--tokens-file'") from e
    text = text.strip()
    if not text:
        raise click.BadParameter(f"{path} holds no token ids", param_hint="'--tokens-file'")
    if text[0] in "[{":
        try:
            toks = json.loads(text)
        except ValueError as e:
            raise click.BadParameter(f"{path} is not a JSON list of integers ({e})",
                                     param_hint="'--tokens-file'") from e
        if not isinstance(toks, list):
            raise click.BadParameter(f"{path}: expected a JSON list of integers", param_hint="'--tokens-file'")
    else:
        toks = text.split()
    out = []
    for i, t in enumerate(toks):
        if isinstance(t, bool) or not isinstance(t, (int, str)):
            raise click.BadParameter(f"{path}: token {i} is {t!r}, not an integer", param_hint="'--tokens-file'")
        try:
            v = int(t)
        except ValueError:
            raise click.BadParameter(f"{path}: token {i} is {t!r}, not an integer",
                                     param_hint="'--tokens-file'") from None
        if not 0 <= v < 2**32:
            raise click.BadParameter(f"{path}: token {i} = {v} is out of range (0 to 2**32-1)",
                                     param_hint="'--tokens-file'")
        out.append(v)
    return out


def namespace_of(store, ns_path: str):
    """The :class:`kvfs.Namespace` at ``<model>/<ns-id>``, from the manifest the store holds."""
    nsp = ns_path.strip().strip("/")
    if nsp.count("/") != 1:
        raise click.BadParameter(f"{ns_path!r} is not a namespace path; use <model>/<namespace-id> "
                                 "(see `kvfs ls MODEL`)", param_hint="'--namespace'")
    spec = store.spec_of(nsp)
    if spec is None:
        raise CommandError(f"namespace {nsp} is not in this store (no manifest); see `kvfs ls` for what is stored",
                           EXIT_FAILED, click.get_current_context().command_path)
    return store.namespace(spec)


def prompt_paths(store, tokens_file: str, ns_path: str) -> tuple[list[str], int, int]:
    """The stored chunks of a prompt: (chunk paths, tokens covered, prompt length)."""
    toks = read_tokens_file(tokens_file)
    ns = namespace_of(store, ns_path)
    plan = ns.plan(toks)
    covered = plan[-1].end if plan else 0
    return [p.key.path for p in plan], covered, len(toks)


# ------------------------------------------------------------------------------------------ param types
class SizeType(click.ParamType):
    """``512MiB``, ``8GiB``, ``2TB`` or bytes."""

    name = "SIZE"

    def convert(self, value: Any, param, ctx) -> int:
        if isinstance(value, int):
            return value
        from kvfs.errors import InvalidInput
        from kvfs.units import parse_size

        try:
            return parse_size(value)
        except InvalidInput as e:
            self.fail(str(e), param, ctx)


class DurationType(click.ParamType):
    """``90s``, ``30m``, ``12h``, ``7d``, ``2w``, ``1h30m`` or seconds."""

    name = "DURATION"

    def convert(self, value: Any, param, ctx) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        from kvfs.errors import InvalidInput
        from kvfs.units import parse_duration

        try:
            return parse_duration(value)
        except InvalidInput as e:
            self.fail(str(e), param, ctx)


SIZE = SizeType()
DURATION = DurationType()

json_option = click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout, for scripts.")
