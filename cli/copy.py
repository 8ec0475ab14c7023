"""``kvfs cp``: copy chunks between stores, verifying each, skipping what the destination has."""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor

import click

from ._common import CommandError, echo_json, json_option, open_store, progress, size, warn

READ_AHEAD = 8  # source chunks read (and verified) concurrently while the previous ones are written
HELD_BATCH = 1024  # destination existence checks per batch


@click.command()
@click.argument("src_url", metavar="SRC_URL")
@click.argument("dst_url", metavar="DST_URL")
@click.argument("path", required=False, default="")
@json_option
def cp(src_url: str, dst_url: str, path: str, as_json: bool) -> None:
    """Copy the chunks at or under PATH (default: all) from one store to another.

    Each chunk is read and verified from SRC_URL (checksums, token ids, key
    chain), validated again and written to DST_URL's first tier (and from
    there written back to its lower tiers); the namespace manifests go with
    them. Chunks the destination already holds are skipped. A chunk that
    fails its checks in the source is reported and not copied (exit 1).

    Example: kvfs cp lmdb:///var/cache/kvfs s3://team-bucket/kv llama-3.1-8b
    """
    from kvfs.errors import ChunkFormatError, NotFound

    src = open_store(src_url, read_only=True)
    dst = open_store(dst_url, create=True)
    if path.strip("/"):
        src.stat(path)  # NotFound when the source has nothing there
    recs = src.records(path)
    manifests: dict[str, bytes] = {}
    for ns in sorted({r.namespace for r in recs}):
        try:
            manifests[ns] = src.cat(f"{ns}/manifest.json")
        except NotFound:
            raise CommandError(f"the source holds chunks of {ns} but not its manifest.json; run "
                               f"`kvfs --url SRC_URL fsck` on the source first", 1, "kvfs cp") from None
    # skip only what the destination really holds: its catalog, confirmed by its backends
    held: list[bool] = []
    for i in range(0, len(recs), HELD_BATCH):
        held += dst.held([r.path for r in recs[i : i + HELD_BATCH]])
    todo = [r for r, h in zip(recs, held) if not h]
    skipped = len(recs) - len(todo)
    copied, nbytes, failed = 0, 0, []

    def read(rec):
        try:
            return rec, src.cat(rec.path), None
        except (ChunkFormatError, NotFound) as e:
            return rec, None, str(e)

    with ThreadPoolExecutor(READ_AHEAD, thread_name_prefix="kvfs-cp") as pool, \
            progress(sum(r.size for r in todo), "copying") as update:
        pending: deque = deque()
        it = iter(todo)
        for rec in it:
            pending.append(pool.submit(read, rec))
            if len(pending) >= READ_AHEAD:
                break
        while pending:
            rec, data, err = pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(read, nxt))
            if data is None:
                failed.append({"path": rec.path, "error": err or "not found in the source"})
            else:
                try:
                    if dst.import_chunk(rec.path, data, manifest=manifests[rec.namespace]):
                        copied += 1
                        nbytes += len(data)
                    else:
                        skipped += 1
                except ChunkFormatError as e:
                    failed.append({"path": rec.path, "error": str(e)})
            update(rec.size or (len(data) if data is not None else 0))
    dst.flush()  # write-back to the destination's lower tiers done, or an error here
    if as_json:
        echo_json({"source": src.redacted_url, "destination": dst.redacted_url, "copied": copied,
                   "skipped": skipped, "failed": failed, "bytes": nbytes})
    else:
        click.echo(f"copied {copied} chunk(s) ({size(nbytes)}) to {dst.redacted_url}; "
                   f"skipped {skipped} already there")
        for f in failed:
            warn(f"kvfs cp: not copied: {f['path']}: {f['error']}")
    if failed:
        raise CommandError(f"{len(failed)} chunk(s) failed their checks in the source and were not copied "
                           "(see above; `kvfs verify` on the source tells more)", 1, "kvfs cp")
