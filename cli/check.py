"""Checking a store: ``verify`` (every copy's checksums) and ``fsck`` (rebuild the catalog)."""

from __future__ import annotations

import click

from ._common import CommandError, echo_json, json_option, open_store, progress, progress_enabled, size, table, warn


@click.command()
@click.argument("path", required=False, default="")
@click.option("--quarantine", is_flag=True, help="Remove copies that fail from their tier (logged in the catalog).")
@json_option
def verify(path: str, quarantine: bool, as_json: bool) -> None:
    """Read every copy of every chunk at or under PATH and check it.

    Checks the header, the namespace and key, the token ids against the key
    chain, and the xxh3-64 checksums of the data and of each layer. Exits
    with status 1 when a copy fails.
    """
    store = open_store(read_only=not quarantine)
    if path.strip("/"):
        store.stat(path)
    recs = store.records(path)
    mask = getattr(store, "mask", -1)  # this store's tiers among those sharing its catalog
    total = sum(r.size * bin(r.tiers & mask).count("1") for r in recs)
    with progress(total, "verifying") as update:
        results = store.verify_chunks(path, quarantine=quarantine, progress=update)
    bad = [r for r in results if not r["ok"]]
    # only copies that were read and failed their checks are quarantined: not a copy gone from its tier or one
    # that could not be read (nothing to remove, or nothing known to be wrong with it), nor one in a newer format
    # or without a valid signature for this node's key (other nodes may read it)
    kinds = [r["problem"] for r in bad]
    corrupt, gone, unread = kinds.count("corrupt"), kinds.count("missing"), kinds.count("io")
    unsigned, newer = kinds.count("unsigned"), kinds.count("newer")
    if as_json:
        echo_json({"path": path.strip("/"), "checked": len(results), "failed": len(bad),
                   "quarantined": quarantine and corrupt > 0, "results": results})
    else:
        if bad:
            table(["TIER", "PATH", "PROBLEM"], [[r["tier"].split("?", 1)[0], r["path"], r["error"]] for r in bad])
        click.echo(f"checked {len(results)} cop{'y' if len(results) == 1 else 'ies'} of {len(recs)} chunk(s) "
                   f"({size(sum(r.size for r in recs))}): {len(results) - len(bad)} ok, {len(bad)} failed"
                   + (f"; {corrupt} failing cop{'y' if corrupt == 1 else 'ies'} quarantined"
                      if quarantine and corrupt else ""))
    if bad:
        hints = []
        if corrupt and not quarantine:
            hints.append("run with --quarantine to remove the failing copies")
        if gone:
            hints.append(f"{gone} missing from their tier: run `kvfs fsck` to drop them from the catalog")
        if unread:
            hints.append(f"{unread} could not be read: check the tier and run `kvfs verify` again")
        if unsigned:
            hints.append(f"{unsigned} without a valid signature for this node's key, left in place: if that is "
                         "every chunk, $KVFS_SIGNING_KEY is not the key they were written with")
        if newer:
            hints.append(f"{newer} in a newer chunk format, left in place: upgrade kvfs to read them")
        hint = f" ({'; '.join(hints)})" if hints else ""
        raise CommandError(f"{len(bad)} cop{'y' if len(bad) == 1 else 'ies'} failed verification{hint}", 1,
                           "kvfs verify")


@click.command()
@click.option("--verify", is_flag=True, help="Also read every chunk in full and check its checksums (slow).")
@click.option("--dry-run", "-n", is_flag=True, help="Report what is wrong; change nothing.")
@json_option
def fsck(verify: bool, dry_run: bool, as_json: bool) -> None:
    """Rebuild this node's catalog from what the store's tiers hold.

    Adds chunks present in a tier but missing from the catalog (written by
    another node, or copied in by hand), drops entries whose chunk is gone,
    and quarantines corrupt or foreign chunks. Pins and access times of
    chunks still present are kept. Exits with status 1 when corrupt or
    foreign chunks were found.
    """
    store = open_store(read_only=dry_run)
    if progress_enabled():
        click.echo("scanning the tiers...", err=True)
    report = store.fsck(verify=verify, repair=not dry_run)
    doc = report.to_dict()
    doc["dry_run"] = dry_run
    if as_json:
        echo_json(doc)
    else:
        add, drop, fix = ("would add", "would drop", "would fix") if dry_run else ("added", "dropped", "fixed")
        click.echo(f"{report.chunks} chunk(s) in {report.namespaces} namespace(s); "
                   + ("catalog is up to date" if report.clean else
                      f"catalog entries: {add} {len(report.added)}, {drop} {len(report.stale)} stale, "
                      f"{fix} {report.size_fixed} size(s)"
                      + (f", {fix} the usage counter of {report.usage_fixed} tier(s)" if report.usage_fixed else "")))
        for label, items in (("corrupt", report.corrupt), ("foreign", report.foreign)):
            for item in items:
                warn(f"kvfs fsck: {label}: {item}" + ("" if dry_run else " (quarantined)"))
        if report.newer:
            warn(f"kvfs fsck: {len(report.newer)} chunk(s) in a newer chunk format than this kvfs reads were left "
                 f"alone (a newer kvfs reads them; upgrade to use them here; first: {report.newer[0]})")
        if report.unsigned:
            warn(f"kvfs fsck: {len(report.unsigned)} chunk(s) without a valid signature for this node's key were left "
                 f"in place, kept in the catalog and never served here (unsigned, another deployment's key, or "
                 f"altered; first: {report.unsigned[0]}); if that is every chunk, $KVFS_SIGNING_KEY is not the key "
                 "they were written with")
        if report.unmanifested:
            nss = sorted({k.split(":", 1)[1].rsplit("/", 2)[0] for k in report.unmanifested})
            warn(f"kvfs fsck: {len(report.unmanifested)} chunk(s) in {len(nss)} namespace(s) with no manifest.json in "
                 f"any tier were left alone and are not in the catalog (first: {nss[0]}); copy each namespace's "
                 "manifest.json from the store that wrote its chunks, then run `kvfs fsck` again")
        if report.orphans:
            warn(f"kvfs fsck: {len(report.orphans)} object(s) that are not kvfs chunks were left alone "
                 f"(first: {report.orphans[0]})")
    if report.corrupt or report.foreign:
        raise CommandError(f"{len(report.corrupt)} corrupt and {len(report.foreign)} foreign chunk(s) "
                           + ("found" if dry_run else "found and quarantined"), 1, "kvfs fsck")
