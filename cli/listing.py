"""Looking at a store: ``ls``, ``stat``, ``tree``, ``du``."""

from __future__ import annotations

import time
from typing import Any

import click

from ._common import CommandError, age, echo_json, json_option, open_store, size, table, warn

_KIND_SUFFIX = {"model": "/", "namespace": "/", "shard": "/"}


def _pinned(e) -> str:
    if e.kind == "chunk":
        return f"pinned×{e.pins}" if e.pins > 1 else ("pinned" if e.pins else "-")
    return f"{e.pins} pinned" if e.pins else "-"


@click.command()
@click.argument("path", required=False, default="")
@click.option("-l", "long", is_flag=True, help="Long listing: size, tokens, chunks, pins, last access, tiers.")
@click.option("-R", "recursive", is_flag=True, help="Every chunk (and manifest) under PATH, by full path.")
@json_option
def ls(path: str, long: bool, recursive: bool, as_json: bool) -> None:
    """List models, a model's namespaces, a namespace's shards, or chunks.

    PATH is MODEL, MODEL/NAMESPACE, MODEL/NAMESPACE/HH or a chunk path;
    nothing lists the models.
    """
    store = open_store(read_only=True)
    if recursive and path.strip().strip("/"):
        store.stat(path)  # a path that is not there is an error, as without -R, not an empty listing
    entries = store.ls(path, recursive=recursive)
    if as_json:
        echo_json({"url": store.redacted_url, "path": path.strip("/"), "entries": [e.to_dict() for e in entries]})
        return
    if not entries and not path.strip("/"):
        warn("kvfs ls: the store's catalog is empty (if another node wrote this store, run `kvfs fsck` "
             "to rebuild this node's catalog)")
        return
    names = [e.path if recursive else e.name + _KIND_SUFFIX.get(e.kind, "") for e in entries]
    if not long:
        for n in names:
            click.echo(n)
        return
    now = time.time()
    rows = []
    for e, n in zip(entries, names):
        rows.append([
            size(e.size),
            e.tokens if e.kind != "manifest" else "-",
            e.chunks if e.is_dir else "-",
            _pinned(e) if e.kind != "manifest" else "-",
            age(e.last_access, now),
            ",".join(_short_tier(t) for t in e.tiers) or "-",
            n,
        ])
    table(["SIZE", "TOKENS", "CHUNKS", "PINNED", "ACCESSED", "TIERS", "NAME"], rows, right=(0, 1, 2))


def _short_tier(t: str) -> str:
    return t.split("?", 1)[0]


@click.command()
@click.argument("path")
@click.option("--verify", is_flag=True, help="Read the chunk and check its checksums, tokens and key.")
@json_option
def stat(path: str, verify: bool, as_json: bool) -> None:
    """Everything known about a chunk, namespace, shard or model.

    For a chunk: size, tokens, position, parent, pins, hits, access times,
    the tiers holding it, its header, and (with --verify) its checksum state.
    For a namespace: its manifest (the KV configuration) and totals.
    """
    store = open_store(read_only=True)
    if verify:
        kind = store.stat(path).kind
        if kind != "chunk":  # nothing would be read: exit 0 would vouch for chunks never checked
            target = path.strip().strip("/")
            if kind == "manifest":
                target = target.rsplit("/", 1)[0]
            raise click.UsageError(f"--verify checks one chunk, and {path.strip() or '/'} is a {kind}: "
                                   f"`kvfs verify{' ' + target if target else ''}` checks the chunks there")
    info = store.info(path, verify=verify)
    failed = str(info.get("checksum", "")).startswith("failed")
    if as_json:
        echo_json(info)
    else:
        _print_info(store, info)
    if failed and verify:
        raise CommandError(f"{info['path']}: {info['checksum']}", 1, "kvfs stat")


def _print_info(store, info: dict[str, Any]) -> None:
    kind = info["type"]
    rows: list[tuple[str, Any]] = [("path", info["path"] or "/"), ("type", kind)]
    if kind == "manifest":
        rows.append(("size", f"{size(info['size'])} ({info['size']} bytes)"))
    else:
        rows += [
            ("size", f"{size(info['size'])} ({info['size']} bytes)"),
            ("tokens", info["tokens"]),
        ]
        if kind != "chunk":
            rows += [("chunks", info["chunks"]), ("pinned chunks", info["pins"])]
        else:
            rows += [
                ("position", f"tokens {info['start']}..{info['start'] + info['tokens']}"),
                ("kind", "segment (position independent)" if info.get("segment") else "prefix"),
                ("parent", _parent_path(info) or "- (first chunk of its prompt)"),
                ("pins", info["pins"]),
            ]
        rows += [
            ("hits", info["hits"]),
            ("created", _when(info["created"])),
            ("last access", _when(info["last_access"])),
            ("tiers", ", ".join(info["tiers"]) or "-"),
        ]
    if kind == "chunk":
        h = info.get("header")
        if h:
            meta = h.get("metadata", {})
            rows += [
                ("dtype", h["dtype"]),
                ("shape", "[" + ", ".join(str(d) for d in h["shape"]) + "]  (layers, planes, tokens, heads, dim)"),
                ("data offset", h["data_offset"]),
                ("data bytes", h["nbytes"]),
                ("checksum", meta.get("checksum", "-")),
            ]
            toks = meta.get("tokens") or []
            shown = ", ".join(str(t) for t in toks[:8]) + (", ..." if len(toks) > 8 else "")
            rows.append(("token ids", f"[{shown}]"))
        rows.append(("checksum state", info.get("checksum", "-")))
    manifest = info.get("manifest")
    if manifest:
        rows.append(("bytes per token", size(info.get("bytes_per_token"))))
        for k in sorted(manifest):
            rows.append((f"manifest.{k}", manifest[k] if manifest[k] != "" else '""'))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k + ':':<{width + 1}} {v}")


def _parent_path(info: dict[str, Any]) -> str:
    parent = info.get("parent")
    if not parent:
        return ""
    ns = info["path"].rsplit("/", 2)[0]
    return f"{ns}/{parent[:2]}/{parent}.safetensors"


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ts))} ({age(ts)})"


# ------------------------------------------------------------------------------------------ tree
@click.command()
@click.argument("path")
@json_option
def tree(path: str, as_json: bool) -> None:
    """The prefix chains of a namespace (or of every namespace of a model).

    Each line is one chunk: its token range, key, size and pins; a chunk
    below another extends it (its parent). Chains continue on the same
    indentation; a branch (prompts that share a prefix, then differ) indents.
    """
    store = open_store(read_only=True)
    parts = [p for p in path.strip().strip("/").split("/") if p]
    if len(parts) not in (1, 2):
        raise click.BadParameter(f"{path!r}: give a model or a namespace (MODEL or MODEL/NAMESPACE)",
                                 param_hint="PATH")
    if len(parts) == 1:
        namespaces = [e.path for e in store.ls(parts[0]) if e.kind == "namespace"]
    else:
        store.stat(path)  # NotFound when it is not there
        namespaces = ["/".join(parts)]
    docs = []
    for nsp in namespaces:
        recs = store.records(nsp)
        docs.append((nsp, recs, _forest(recs)))
    if as_json:
        echo_json({"path": "/".join(parts), "namespaces": [
            {"path": nsp, "chunks": len(recs), "tokens": sum(r.ntokens for r in recs),
             "roots": [_node_json(n) for n in roots], "segments": [_rec_json(r) for r in recs if r.segment]}
            for nsp, recs, roots in docs]})
        return
    for i, (nsp, recs, roots) in enumerate(docs):
        if i:
            click.echo()
        click.echo(f"{nsp}  ({len(recs)} chunks, {sum(r.ntokens for r in recs)} tokens, "
                   f"{size(sum(r.size for r in recs))})")
        for j, root in enumerate(roots):
            _print_chain(root, "", j == len(roots) - 1, top=True)
        segs = [r for r in recs if r.segment]
        if segs:
            click.echo("segments (position independent):")
            for r in sorted(segs, key=lambda r: r.hex):
                click.echo(f"  {_line(r)}")


class _Node:
    __slots__ = ("rec", "children", "orphan")

    def __init__(self, rec, orphan: bool = False) -> None:
        self.rec = rec
        self.children: list[_Node] = []
        self.orphan = orphan


def _forest(recs) -> list[_Node]:
    prefix = [r for r in recs if not r.segment]
    nodes = {r.hex: _Node(r) for r in prefix}
    roots = []
    for n in nodes.values():
        parent = nodes.get(n.rec.parent) if n.rec.parent else None
        if parent is None:
            n.orphan = bool(n.rec.parent)
            roots.append(n)
        else:
            parent.children.append(n)
    for n in nodes.values():
        n.children.sort(key=lambda c: (c.rec.start, c.rec.hex))
    roots.sort(key=lambda c: (c.rec.start, c.rec.hex))
    return roots


def _line(r) -> str:
    pin = f"  pinned×{r.pins}" if r.pins > 1 else ("  pinned" if r.pins else "")
    return f"{r.start}..{r.start + r.ntokens}  {r.hex[:16]}  {r.ntokens} tokens  {size(r.size)}{pin}"


def _print_chain(node: _Node, indent: str, last: bool, top: bool = False) -> None:
    """Print a chain: single children continue on the same indentation, branches indent."""
    branch = "└── " if last else "├── "
    cont = "    " if last else "│   "
    first = True
    while True:
        note = "  (parent evicted)" if node.orphan else ""
        click.echo(f"{indent}{branch if first else cont}{_line(node.rec)}{note}")
        first = False
        if len(node.children) != 1:
            break
        node = node.children[0]
    for k, child in enumerate(node.children):
        _print_chain(child, indent + cont, k == len(node.children) - 1)


def _rec_json(r) -> dict[str, Any]:
    return {"path": r.path, "start": r.start, "tokens": r.ntokens, "size": r.size, "pinned": r.pins > 0,
            "pins": r.pins, "last_access": r.last_access}


def _node_json(n: _Node) -> dict[str, Any]:
    # chains are iterative in the JSON too (a long prompt is hundreds of chunks deep)
    out = _rec_json(n.rec)
    out["parent_evicted"] = n.orphan
    chain = [out]
    node = n
    while len(node.children) == 1:
        node = node.children[0]
        chain.append(_rec_json(node.rec))
    out["chain"] = chain[1:]
    out["branches"] = [_node_json(c) for c in node.children]
    return out


# ------------------------------------------------------------------------------------------ du
@click.command()
@click.argument("path", required=False, default="")
@json_option
def du(path: str, as_json: bool) -> None:
    """Bytes, tokens and chunks per model, namespace and tier at or under PATH."""
    store = open_store(read_only=True)
    if path.strip("/"):
        store.stat(path)  # a path that is not there is an error, not zeros
    doc = store.du(path)
    usage = {u["tier"]: u for u in store.usage()}
    for name, t in doc["tiers"].items():
        u = usage.get(name, {})
        t["used"] = u.get("used")  # bytes of chunks in the tier (all of it, not only under PATH)
        t["available"] = u.get("available")  # free space of the device or map
        room = t["capacity"] - (t["used"] or 0) if t["capacity"] else None
        frees = [x for x in (room, t["available"]) if x is not None]
        t["free"] = max(0, min(frees)) if frees else None
    if as_json:
        echo_json(doc)
        return
    rows = []
    for model, m in sorted(doc["models"].items()):
        rows.append([model + "/", m["chunks"], m["tokens"], size(m["bytes"])])
        for ns, n in sorted(m["namespaces"].items()):
            rows.append(["  " + ns + "/", n["chunks"], n["tokens"], size(n["bytes"])])
    rows.append(["total", doc["chunks"], doc["tokens"], size(doc["bytes"])])
    # the free-text column is first here: put sizes last, right-aligned
    table(["PATH", "CHUNKS", "TOKENS", "SIZE"], rows, right=(1, 2, 3))
    click.echo()
    trows = []
    for name, t in doc["tiers"].items():
        trows.append([_short_tier(name), t["chunks"], size(t["bytes"]), size(t["capacity"]) if t["capacity"] else "-",
                      size(t["free"]) if t["free"] is not None else "-"])
    table(["TIER", "CHUNKS", "SIZE", "CAPACITY", "FREE"], trows, right=(1, 2, 3, 4))
