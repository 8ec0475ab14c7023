"""Managing what a store keeps: ``pin``, ``unpin``, ``evict``, ``prefetch``."""

from __future__ import annotations

import click

from ._common import (
    DURATION,
    SIZE,
    CommandError,
    echo_json,
    json_option,
    open_store,
    progress,
    prompt_paths,
    size,
    warn,
)

EVICT_BATCH = 512

tokens_file_option = click.option(
    "--tokens-file", metavar="FILE",
    help="A prompt's token ids (a JSON list of ints, or whitespace-separated ints; '-' reads stdin): "
         "act on the stored chunks of that prompt. Needs --namespace.")
namespace_option = click.option(
    "--namespace", "ns_path", metavar="MODEL/NS",
    help="The namespace the --tokens-file prompt is keyed in (a path from `kvfs ls MODEL`).")


def _no_root(paths, command: str) -> None:
    """An empty path (an unset shell variable: ``kvfs evict "$P"``) would select the whole store; for
    ``evict``, ``/`` too (removing everything takes ``--all``). ``pin /``, ``unpin --reset /`` and
    ``prefetch /`` say what they mean."""
    for p in paths:
        if not p.strip() or (command == "evict" and not p.strip().strip("/")):
            hint = ("to evict every chunk use --all" if command == "evict"
                    else "give a model, namespace or chunk path (see `kvfs ls`), or / for every chunk")
            raise click.UsageError(f"path {p!r} is the whole store; {hint}")


def _targets(store, paths: tuple[str, ...], tokens_file: str | None, ns_path: str | None,
             command: str) -> tuple[list[str], str]:
    """The paths a command acts on, and a note on the prompt's coverage when --tokens-file was given."""
    if tokens_file is None and ns_path is not None:
        raise click.UsageError("--namespace goes with --tokens-file")
    if tokens_file is not None and ns_path is None:
        raise click.UsageError("--tokens-file needs --namespace MODEL/NS (see `kvfs ls MODEL`)")
    out = list(paths)
    note = ""
    if tokens_file is not None:
        chunk_paths, covered, total = prompt_paths(store, tokens_file, ns_path)
        if not chunk_paths:
            raise CommandError(f"none of the prompt's {total} tokens are stored in {ns_path.strip('/')}", 1,
                               f"kvfs {command}")
        out += chunk_paths
        note = f" (the prompt's stored chunks cover {covered} of its {total} tokens)"
    if not out:
        raise click.UsageError("give chunk or directory paths, or --tokens-file with --namespace")
    _no_root(paths, command)
    _check_paths(store, paths, command)
    return out, note


def _check_paths(store, paths, command: str) -> None:
    """A path that is not there is an error; so is a manifest, which holds no chunks to act on (not a silent
    "0 chunk(s)")."""
    for p in paths:
        if store.stat(p).kind == "manifest":
            ns = p.strip().strip("/").rsplit("/", 1)[0]
            raise CommandError(f"{p.strip()} is the manifest of namespace {ns}, not a chunk; give {ns} to {command} "
                               "the namespace's chunks", 1, f"kvfs {command}")


def _outermost(paths: list[str]) -> list[str]:
    """``paths`` without repeats and without paths inside another one given (``NS`` and ``NS/hh/x.safetensors``,
    ``NS`` and ``NS/``): each chunk is pinned or unpinned once, and counted once."""
    parts = {tuple(q for q in p.strip().strip("/").split("/") if q): p for p in paths}
    return [p for k, p in parts.items() if not any(k[:i] in parts for i in range(len(k)))]


@click.command()
@click.argument("paths", nargs=-1)
@tokens_file_option
@namespace_option
def pin(paths: tuple[str, ...], tokens_file: str | None, ns_path: str | None) -> None:
    """Pin chunks so that eviction never removes them.

    PATH is a chunk, or a directory (model, namespace, shard) to pin every
    chunk under it. Pins are counted: each pin needs its own unpin.
    """
    store = open_store()
    targets, note = _targets(store, paths, tokens_file, ns_path, "pin")
    n = sum(store.pin(p) for p in _outermost(targets))
    click.echo(f"pinned {n} chunk(s){note}")


@click.command()
@click.argument("paths", nargs=-1)
@tokens_file_option
@namespace_option
@click.option("--reset", is_flag=True, help="Remove every pin of each chunk, not just one.")
def unpin(paths: tuple[str, ...], tokens_file: str | None, ns_path: str | None, reset: bool) -> None:
    """Remove a pin from chunks (a chunk, a directory, or a prompt's chunks)."""
    store = open_store()
    targets, note = _targets(store, paths, tokens_file, ns_path, "unpin")
    n = sum(store.unpin(p, all_pins=reset) for p in _outermost(targets))
    click.echo(f"unpinned {n} chunk(s){note}")


@click.command()
@click.argument("paths", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Every chunk in the store.")
@click.option("--to-size", type=SIZE, metavar="SIZE",
              help="Least recently used chunks until the store holds at most SIZE (e.g. 100GiB).")
@click.option("--older-than", type=DURATION, metavar="DURATION",
              help="Chunks not read for DURATION (e.g. 7d, 12h, 90m).")
@click.option("--tier", type=int, metavar="INDEX",
              help="Remove copies from this tier only (0 is the fastest); default: every tier.")
@click.option("--dry-run", "-n", is_flag=True, help="Show what would be evicted; change nothing.")
@click.option("--force", is_flag=True, help="Evict pinned chunks too.")
@json_option
def evict(paths: tuple[str, ...], all_: bool, to_size: int | None, older_than: float | None, tier: int | None,
          dry_run: bool, force: bool, as_json: bool) -> None:
    """Remove chunks from the store (pinned ones are refused unless --force).

    Select chunks by PATH (chunks or directories), --all, --older-than or
    --to-size; selections add up. Exits with status 1 when pinned chunks
    were refused, or (with --tier) chunks were kept because that tier holds
    their only copy, not yet written back to the tiers below.
    """
    if not (paths or all_ or to_size is not None or older_than is not None):
        raise click.UsageError("say what to evict: PATH..., --all, --to-size SIZE or --older-than DURATION")
    _no_root(paths, "evict")
    store = open_store(read_only=dry_run)
    _check_paths(store, paths, "evict")
    plan = store.evict(paths, all=all_, to_size=to_size, older_than=older_than, force=force, dry_run=True,
                       tier=tier)
    refused, not_copied = list(plan.refused), list(plan.not_copied)
    if dry_run:
        evicted, freed = plan.evicted, plan.freed_bytes
    else:
        evicted, freed = [], 0
        sizes = {r.path: r.size for p in dict.fromkeys(plan.evicted) for r in _records(store, p)}
        with progress(sum(sizes.values()), "evicting") as update:
            for i in range(0, len(plan.evicted), EVICT_BATCH):
                batch = [p for p in plan.evicted[i : i + EVICT_BATCH] if p in sizes]
                if not batch:
                    continue
                res = _evict_batch(store, batch, force, tier)
                evicted += res.evicted
                refused += res.refused  # pinned since the plan was made
                not_copied += res.not_copied  # its write-back failed since the plan was made
                freed += res.freed_bytes
                update(sum(sizes[p] for p in batch))
    if as_json:
        echo_json({"dry_run": dry_run, "evicted": evicted, "refused": refused, "not_copied": not_copied,
                   "freed_bytes": freed})
    elif dry_run:
        for p in evicted:
            click.echo(f"would evict {p}")
        click.echo(f"would evict {len(evicted)} chunk(s), freeing {size(freed)}")
    else:
        where = f" from tier {tier}" if tier is not None else ""
        click.echo(f"evicted {len(evicted)} chunk(s){where}, freed {size(freed)}")
    problems = []
    if not_copied:
        first = f" (first: {not_copied[0]})" if len(not_copied) > 1 else f": {not_copied[0]}"
        problems.append(f"kept {len(not_copied)} chunk(s) whose only copy is in tier {tier}{first}: they are not yet "
                        "copied to the tiers below (their write-back is failing or still running); retry once the "
                        "tiers below are reachable, or evict without --tier to remove them everywhere")
    if refused:
        first = f" (first: {refused[0]})" if len(refused) > 1 else f": {refused[0]}"
        problems.append(f"refused to evict {len(refused)} pinned chunk(s){first}; unpin them or use --force")
    if problems:
        raise CommandError("; ".join(problems), 1, "kvfs evict")


def _evict_batch(store, paths: list[str], force: bool, tier: int | None):
    """Evict planned chunks; one that someone else evicted meanwhile is skipped, not an error."""
    from kvfs.errors import NotFound
    from kvfs.store import EvictResult

    try:
        return store.evict(paths, force=force, tier=tier)
    except NotFound:
        out = EvictResult()
        for p in paths:
            try:
                r = store.evict([p], force=force, tier=tier)
            except NotFound:
                continue
            out.evicted += r.evicted
            out.refused += r.refused
            out.not_copied += r.not_copied
            out.freed_bytes += r.freed_bytes
        return out


def _records(store, path: str):
    from kvfs.errors import NotFound

    try:
        return store.records(path)
    except NotFound:  # evicted by someone else since the plan was made
        return []


@click.command()
@click.argument("paths", nargs=-1)
@tokens_file_option
@namespace_option
@json_option
def prefetch(paths: tuple[str, ...], tokens_file: str | None, ns_path: str | None, as_json: bool) -> None:
    """Bring chunks from lower tiers into the fastest tier, verifying each.

    PATH is a chunk or a directory; or give a prompt with --tokens-file and
    --namespace to prefetch the chunks it would reuse.
    """
    store = open_store()
    targets, note = _targets(store, paths, tokens_file, ns_path, "prefetch")
    total = sum(r.size for r in {r.key: r for p in targets for r in _records(store, p)}.values())
    with progress(total, "prefetching") as update:
        counts = store.prefetch(targets, progress=update)
    top = store.tiers[0].url.redacted()
    if as_json:
        echo_json({**counts, "tier": top, **({"note": note.strip(" ()")} if note else {})})
    else:
        click.echo(f"fetched {counts['fetched']} chunk(s) ({size(counts['bytes'])}) into {top}; "
                   f"{counts['already']} already there{note}")
        if counts["evicted"]:
            warn(f"kvfs prefetch: {counts['evicted']} of the chunks fetched are not in {top} now: evicted again "
                 "to make room for the others, or kept in a tier below it when it is full of pinned chunks "
                 "(raise its capacity or prefetch less)")
    if counts["failed"]:
        raise CommandError(f"{counts['failed']} chunk(s) could not be read from any lower tier "
                           "(missing or failing their checks; see the warnings above)", 1, "kvfs prefetch")
    if len(store.tiers) == 1 and not as_json:
        warn("kvfs prefetch: this store has one tier: there is nothing faster to prefetch into")
