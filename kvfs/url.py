"""Store URLs: one backend URL per tier, tiers chained with ``::``, fastest first.

    memory://?capacity=8GiB::lmdb:///nvme/kvfs?capacity=500GiB::s3://bucket/kv?endpoint_url=http://host:9000

Each tier's query holds its options. ``capacity``, ``watermark`` and
``shared`` configure the tier in the store; everything else is passed to the
backend (for ``s3://``, to s3fs: ``endpoint_url``, ``region``, ``key``,
``secret``, ``anon``...). Secrets are never printed: :meth:`TierURL.redacted`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, quote

from .errors import InvalidURL
from .units import parse_bool, parse_size

TIER_SEPARATOR = "::"
STORE_OPTIONS = ("capacity", "watermark", "shared")
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*)://(.*)$", re.S)
_SECRET = re.compile(r"secret|password|passwd|token|credential|key", re.I)
_NOT_SECRET = {"key_prefix"}
_USERINFO = re.compile(r"^((?:[a-zA-Z][a-zA-Z0-9+.\-]*://)?[^/?#@:]*):[^/?#@]*@")  # user:password@ (a location or value)


def _hide_password(text: str) -> str:
    """``user:password@host...`` -> ``user:***@host...`` (a location, or an option value that is a URL)."""
    return _USERINFO.sub(r"\1:***@", text)


@dataclass(frozen=True)
class TierURL:
    raw: str
    scheme: str
    location: str
    backend_options: dict[str, str] = field(default_factory=dict)
    store_options: dict[str, str] = field(default_factory=dict)

    @property
    def capacity(self) -> int | None:
        v = self.store_options.get("capacity")
        if v in (None, ""):
            return None
        n = parse_size(v, "capacity", InvalidURL)
        if n >= 1 << 63:
            raise InvalidURL(f"capacity={v[:40]} is larger than any device; leave capacity out for a tier without "
                             "a limit")
        if n <= 0:
            # not "unlimited": a tier that may hold nothing is a mistake (and 0 read as no limit would be the
            # opposite of what it says)
            raise InvalidURL(f"capacity={v} must be positive; leave capacity out for a tier without a limit")
        return n

    @property
    def watermark(self) -> float:
        v = self.store_options.get("watermark", "0.9")
        try:
            w = float(v)
        except ValueError:
            raise InvalidURL(f"watermark={v!r} is not a number; use a fraction such as 0.9") from None
        if not 0.0 < w <= 1.0:
            raise InvalidURL(f"watermark={v} must be in (0, 1]: the fraction of capacity eviction frees down to")
        return w

    @property
    def shared(self) -> bool | None:
        v = self.store_options.get("shared")
        return None if v is None else parse_bool(v, "shared", InvalidURL)

    @property
    def identity(self) -> str:
        """What names this storage, without options: ``lmdb:///var/cache/kvfs``."""
        loc = self.location
        if self.scheme in ("lmdb", "file") and loc:
            loc = os.path.abspath(os.path.expanduser(loc))
        return f"{self.scheme}://{loc}"

    def redacted(self) -> str:
        """The URL with secret-looking option values replaced by ``***``."""
        opts = {**self.backend_options, **self.store_options}
        loc = self.location if self.scheme in ("lmdb", "file", "memory") else _hide_password(self.location)
        if not opts:
            return f"{self.scheme}://{loc}"
        q = "&".join(
            f"{quote(k, safe='')}="
            f"{'***' if _SECRET.search(k) and k not in _NOT_SECRET else quote(_hide_password(v), safe='/:.,@*')}"
            for k, v in opts.items()
        )
        return f"{self.scheme}://{loc}?{q}"

    def __str__(self) -> str:
        return self.redacted()


def parse_tier(url: str) -> TierURL:
    if not isinstance(url, str):
        raise InvalidURL(f"a store URL is a string, got {type(url).__name__}")
    text = url.strip()
    if "\x00" in text:
        raise InvalidURL("a store URL cannot contain NUL bytes")
    m = _SCHEME.match(text)
    if not m:
        raise InvalidURL(
            f"not a store URL: {text!r}; expected scheme://location, e.g. lmdb:///var/cache/kvfs, "
            "file:///nvme/kvfs, s3://bucket/prefix or memory://"
        )
    scheme, rest = m.group(1).lower(), m.group(2)
    location, _, query = rest.partition("?")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
    except ValueError:
        raise InvalidURL(f"malformed options {query!r} in {scheme}:// URL; use ?name=value&name2=value2") from None
    backend_options: dict[str, str] = {}
    store_options: dict[str, str] = {}
    for k, v in pairs:
        target = store_options if k in STORE_OPTIONS else backend_options
        if k in target:
            raise InvalidURL(f"option {k!r} is given twice in a {scheme}:// URL")
        target[k] = v
    tier = TierURL(text, scheme, location, backend_options, store_options)
    try:
        tier.capacity, tier.watermark, tier.shared  # validate early, with the URL in the message
    except (InvalidURL, ValueError) as e:
        raise InvalidURL(f"{tier.redacted()}: {e}") from None
    if scheme in ("lmdb", "file") and not location:
        raise InvalidURL(f"{scheme}:// needs a directory, e.g. {scheme}:///var/cache/kvfs")
    return tier


def parse_url(url: str) -> list[TierURL]:
    """Split a store URL into its tiers (fastest first)."""
    if not isinstance(url, str) or not url.strip():
        raise InvalidURL("empty store URL; use e.g. lmdb:///var/cache/kvfs (or unset it for the default)")
    parts = url.strip().split(TIER_SEPARATOR)
    if any(not p.strip() for p in parts):
        raise InvalidURL(f"empty tier in {url!r}: tiers are separated by a single '::'")
    tiers = [parse_tier(p) for p in parts]
    seen = set()
    for t in tiers:
        if t.scheme != "memory" or t.location:
            if t.identity in seen:
                raise InvalidURL(f"tier {_hide_password(t.identity)} appears twice in the store URL")
            seen.add(t.identity)
    return tiers


def default_url() -> str:
    """``$KVFS_URL``, else the embedded LMDB store under ``$XDG_CACHE_HOME/kvfs`` (``~/.cache/kvfs``)."""
    env = os.environ.get("KVFS_URL", "").strip()
    if env:
        return env
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return f"lmdb://{os.path.join(cache, 'kvfs')}"
