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
@click.option("--source-key-file", type=click.Path(dir_okay=False), default=None,
              help="signing key the source's chunks must carry (default: $KVFS_SIGNING_KEY[_FILE], if set)")
@click.option("--source-unsigned", is_flag=True,
              help="read the source without signature checks (checksums still apply): publishing a trusted "
                   "unsigned cache into a signed store")
@json_option
def cp(src_url: str, dst_url: str, path: str, source_key_file: str | None, source_unsigned: bool,
       as_json: bool) -> None:
    """Copy the chunks at or under PATH (default: all) from one store to another.

    Each chunk is read and verified from SRC_URL (checksums, token ids, key
    chain), validated again and written to DST_URL's first tier (and from
    there written back to its lower tiers); the namespace manifests go with
    them. Chunks the destination already holds are skipped. A chunk that
    fails its checks in the source is reported and not copied (exit 1).

    Signing: the destination signs what it stores with its key
    ($KVFS_SIGNING_KEY or $KVFS_SIGNING_KEY_FILE) after the source's copy was
    verified with the source's key (--source-key-file, default the same
    environment key) — this is how a deployment key is rotated. Copying from
    an unsigned source into a signed store needs --source-unsigned: kvfs then
    vouches for chunks no key protected, so do it only from a source you trust.

    Example: kvfs cp lmdb:///var/cache/kvfs s3://team-bucket/kv llama-3.1-8b
    """
    from kvfs.errors import ChunkFormatError, NotFound

    if source_key_file and source_unsigned:
        raise click.UsageError("--source-key-file and --source-unsigned contradict each other")
    src_key: bytes | None = None
    if source_key_file:
        try:
            with open(source_key_file, "rb") as f:
                src_key = f.read().strip()
        except OSError as e:
            raise CommandError(f"cannot read --source-key-file {source_key_file}: {e.strerror}", 2,
                               "kvfs cp") from None
    src = open_store(src_url, read_only=True, signing_key=src_key, unsigned=source_unsigned, hint="check SRC_URL")
    if path.strip("/") and src.stat(path).kind == "manifest":  # NotFound when the source has nothing there
        ns = path.strip().strip("/").rsplit("/", 1)[0]
        raise CommandError(f"{path.strip()} is a manifest, not a chunk: copy the namespace ({ns}); its "
                           "manifest.json goes along with its chunks", 1, "kvfs cp")
    recs = src.records(path)
    if not recs and not path.strip("/"):
        warn("kvfs cp: the source's catalog is empty: nothing to copy (if another node wrote the source, run "
             "`kvfs --url SRC_URL fsck` first to rebuild this node's catalog of it)")
    dst = open_store(dst_url, create=True, hint="check DST_URL")
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
                    if dst.import_chunk(rec.path, data, manifest=manifests[rec.namespace], resign=True):
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
        hint = "see above; `kvfs verify` on the source tells more"
        if not source_unsigned and any("is not signed" in f["error"] for f in failed):
            hint = ("the source's chunks are not signed: give --source-unsigned to publish a trusted unsigned "
                    "cache into a signed store, or --source-key-file with the key they were signed with")
        elif any("wrong signature" in f["error"] for f in failed):
            hint = "the source's chunks are signed with another key: give it with --source-key-file"
        raise CommandError(f"{len(failed)} chunk(s) failed their checks in the source and were not copied "
                           f"({hint})", 1, "kvfs cp")
