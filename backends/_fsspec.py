"""Any fsspec URL as a kvfs tier: ``s3://bucket/prefix`` (s3fs), ``gs://``, ``az://``, ``fsspec+memory://``...

The shared tier: several nodes and clusters may read and write one bucket
(``shared = True``), each with its own local tiers and catalog. Keys map to
objects ``<bucket>/<prefix>/<key>``.

Batches run concurrently on fsspec's event loop (one coroutine per key,
``_cat_file``/``_pipe_file``/``DeleteObjects``..., at most ``concurrency`` in
flight), never as a loop of blocking requests. Each key's operation has a
deadline (``timeout``, retries included): a server that is unreachable or
stops answering gives a clear :class:`~kvfs.errors.Timeout` or
:class:`~kvfs.errors.ConnectionFailed`, never a hang, and the first key of a
batch that fails for good cancels the rest of the batch. Throttling and
transient failures are retried with exponential backoff and jitter,
classified by exception type or S3 error code (:func:`classify`).

Options (URL query or keyword; keywords win):

``concurrency`` (32)
    requests in flight per batch (and the HTTP connection pool size for S3).
``timeout`` (30 s)
    deadline of one key's operation, retries included.
``retries`` (4)
    retries of retryable errors within that deadline.

Everything else is a storage option of the filesystem, passed through as one
would give it to fsspec (for S3, s3fs): ``endpoint_url``, ``key``,
``secret``, ``token``, ``anon``, ``profile``, ``requester_pays``,
``client_kwargs``, ``config_kwargs`` (JSON in a URL), and ``region`` (kvfs's
shorthand for ``client_kwargs={"region_name": ...}``). URL query values are
converted to the type of the filesystem's own default (``anon=true`` is a
bool). Secrets never appear in the backend's URL, repr or messages.

Puts are atomic per key: S3, GCS, Azure and memory object puts are; on other
filesystems (``fsspec+file://``, sftp...) a value is written to a temporary
name and moved into place.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import json
import logging
import math
import os
import random
import threading
import time
import uuid
from typing import Any, Awaitable, Callable, Iterator, Mapping, Sequence

from kvfs.errors import BackendUnavailable, InvalidURL, StoreError, oserror
from kvfs.units import parse_bool

from ._base import Backend, Buffer, ByteRange, ObjectInfo, check_key

log = logging.getLogger("kvfs")

TMP_SUFFIX = ".kvfs-tmp"
ATOMIC_PUT_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "memory", "oci", "oss", "r2", "tos"}
_KVFS_OPTIONS = ("concurrency", "timeout", "retries")
_MISSING = object()


# ------------------------------------------------------------------------------------ errors
#: S3 error code (or HTTP status) -> (errno, retryable). A missing key (NoSuchKey, 404) is not an error.
S3_ERRORS: dict[str, tuple[int, bool]] = {
    # throttling: retry with backoff
    **{c: (errno.EAGAIN, True) for c in (
        "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
        "RequestLimitExceeded", "TooManyRequests", "TooManyRequestsException", "BandwidthLimitExceeded",
        "ProvisionedThroughputExceededException", "429")},
    # transient server trouble: retry
    **{c: (errno.EIO, True) for c in ("InternalError", "ServiceUnavailable", "500", "502", "503", "504",
                                       "OperationAborted", "PriorRequestNotComplete")},
    **{c: (errno.ETIMEDOUT, True) for c in ("RequestTimeout", "RequestTimeoutException")},
    # credentials and permissions
    **{c: (errno.EACCES, False) for c in (
        "AccessDenied", "403", "AccountProblem", "AllAccessDisabled", "InvalidAccessKeyId",
        "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "RequestTimeTooSkewed",
        "InvalidObjectState", "NotSignedUp", "InvalidPayer")},
    "NoSuchBucket": (errno.ENOENT, False),  # an error, unlike a missing key: the bucket must exist
    "InvalidBucketName": (errno.EINVAL, False),
    "KeyTooLongError": (errno.ENAMETOOLONG, False),
    "EntityTooLarge": (errno.EFBIG, False),
    "InvalidRange": (errno.EINVAL, False),
    "416": (errno.EINVAL, False),
    "NotImplemented": (errno.ENOSYS, False),
    "501": (errno.ENOSYS, False),
    **{c: (errno.ENOSPC, False) for c in ("QuotaExceeded", "XMinioStorageFull", "InsufficientStorage", "507")},
}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound", "NoSuchVersion"}
_RETRYABLE_ERRNOS = {errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
                     errno.ECONNABORTED, errno.EPIPE, errno.EHOSTUNREACH, errno.ENETUNREACH}


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen = set()
    while e is not None and id(e) not in seen and len(seen) < 10:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _s3_code(e: BaseException) -> str | None:
    for x in _chain(e):
        resp = getattr(x, "response", None)
        if isinstance(resp, dict) and isinstance(resp.get("Error"), dict):
            code = resp["Error"].get("Code")
            status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code:
                return str(code)
            if status:
                return str(status)
    return None


_type_table: list[tuple[type, int, bool]] | None = None


def _types() -> list[tuple[type, int, bool]]:
    """Exception types -> (errno, retryable), most specific first; client libraries only if installed."""
    global _type_table
    if _type_table is not None:
        return _type_table
    table: list[tuple[type, int, bool]] = []
    try:
        from botocore import exceptions as bx, parsers as bp

        named = [
            (bx, "ConnectTimeoutError", errno.ETIMEDOUT, True),
            (bx, "ReadTimeoutError", errno.ETIMEDOUT, True),
            (bx, "EndpointConnectionError", errno.ECONNREFUSED, True),
            (bx, "ConnectionClosedError", errno.ECONNRESET, True),
            (bx, "ProxyConnectionError", errno.ECONNREFUSED, True),
            (bx, "IncompleteReadError", errno.EIO, True),
            (bx, "ResponseStreamingError", errno.EIO, True),
            (bp, "ResponseParserError", errno.EIO, True),  # throttling responses sometimes carry bad XML
            (bx, "HTTPClientError", errno.EIO, True),
            (bx, "NoCredentialsError", errno.EACCES, False),
            (bx, "PartialCredentialsError", errno.EACCES, False),
            (bx, "NoRegionError", errno.EINVAL, False),
            (bx, "ParamValidationError", errno.EINVAL, False),
        ]
        table += [(getattr(m, n), no, r) for m, n, no, r in named if isinstance(getattr(m, n, None), type)]
    except ImportError:
        pass
    try:
        import aiohttp

        table += [
            (aiohttp.ServerTimeoutError, errno.ETIMEDOUT, True),
            (aiohttp.ClientPayloadError, errno.EIO, True),
            (aiohttp.ClientConnectionError, errno.ECONNRESET, True),
        ]
    except ImportError:
        pass
    from http.client import IncompleteRead

    table += [
        (asyncio.TimeoutError, errno.ETIMEDOUT, True),
        (TimeoutError, errno.ETIMEDOUT, True),
        (IncompleteRead, errno.EIO, True),
        (ConnectionRefusedError, errno.ECONNREFUSED, True),
        (ConnectionResetError, errno.ECONNRESET, True),
        (BrokenPipeError, errno.EPIPE, True),
        (ConnectionError, errno.ECONNRESET, True),
        (PermissionError, errno.EACCES, False),
    ]
    _type_table = table
    return table


def classify(e: BaseException) -> tuple[str, int]:
    """``("missing" | "retry" | "fail", errno)`` for an exception raised by fsspec or its client library.

    By S3 error code first (the ``ClientError`` anywhere in the chain), then by
    exception type; never by message text.
    """
    code = _s3_code(e)
    if code is not None:
        if code in _MISSING_CODES:
            return "missing", errno.ENOENT
        if code in S3_ERRORS:
            no, retry = S3_ERRORS[code]
            return ("retry" if retry else "fail"), no
    for x in _chain(e):
        if isinstance(x, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
            return "missing", errno.ENOENT
        for typ, no, retry in _types():
            if isinstance(x, typ):
                return ("retry" if retry else "fail"), no
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno:
            return ("retry" if x.errno in _RETRYABLE_ERRNOS else "fail"), x.errno
    return "fail", errno.EIO


# ------------------------------------------------------------------------------------ options
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(name: str, value: str, default: Any) -> Any:
    """A URL query string converted to the type of the filesystem's default for that option."""
    v = value.strip()
    if isinstance(default, bool):
        return parse_bool(v, f"option {name}", InvalidURL)
    if isinstance(default, int) and not isinstance(default, bool):
        try:
            return int(v)
        except ValueError:
            raise InvalidURL(f"option {name}={value!r} must be an integer") from None
    if isinstance(default, float):
        try:
            return float(v)
        except ValueError:
            raise InvalidURL(f"option {name}={value!r} must be a number") from None
    if (default is None or isinstance(default, dict)) and v.startswith("{"):
        try:
            return json.loads(v)
        except ValueError:
            raise InvalidURL(f"option {name}: {value!r} is not valid JSON") from None
    if default is None and v.lower() in _TRUE | _FALSE and name not in ("key", "secret", "token", "password"):
        return v.lower() in _TRUE
    return value


def _positive(name: str, value: Any, kind: type) -> Any:
    try:
        v = kind(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidURL(f"option {name}={value!r} must be a positive {'integer' if kind is int else 'number'}") from None
    if not math.isfinite(v) or v <= 0:
        raise InvalidURL(f"option {name}={value!r} must be a positive, finite {'integer' if kind is int else 'number'}")
    return v


def _retries(value: Any) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidURL(f"option retries={value!r} must be an integer (0 for no retries)") from None
    if isinstance(value, float) and v != value or v < 0:
        raise InvalidURL(f"option retries={value!r} must be a whole number, 0 or more (0 for no retries)")
    return v


def _check_kwargs_option(name: str, value: Any) -> None:
    """``client_kwargs``, ``config_kwargs``... are JSON objects in a URL (dicts as keywords)."""
    if value is not None and not isinstance(value, dict):
        raise InvalidURL(f"option {name}={value!r} must be a JSON object, e.g. {name}={{\"name\": \"value\"}} "
                         "(percent-encode it in a URL)")


def _check_endpoint(value: Any) -> None:
    from urllib.parse import urlsplit

    if value is None:
        return
    parts = urlsplit(value) if isinstance(value, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidURL(f"option endpoint_url={value!r} must be an http:// or https:// URL with a host, "
                         "e.g. endpoint_url=http://minio:9000")


def _fs_params(fs_cls: type) -> tuple[dict[str, Any], bool]:
    """The filesystem constructor's named options with their defaults, and whether it takes ``**kwargs``."""
    params: dict[str, Any] = {}
    var_kw = False
    for klass in fs_cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            sig = inspect.signature(init)
        except (TypeError, ValueError):
            continue
        for p in sig.parameters.values():
            if p.kind == p.VAR_KEYWORD:
                var_kw = True
            elif p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                params.setdefault(p.name, None if p.default is p.empty else p.default)
        break  # the most derived __init__ is the one that decides
    return params, var_kw


def _fs_class(protocol: str) -> type:
    """fsspec's filesystem class for a protocol; a missing client library is BackendUnavailable with a hint."""
    import fsspec

    try:
        return fsspec.get_filesystem_class(protocol)
    except ValueError as e:
        raise InvalidURL(f"unknown fsspec protocol {protocol!r}: {e}") from None
    except ImportError as e:
        from . import _FSSPEC_HINTS

        hint = _FSSPEC_HINTS.get(protocol, "")
        raise BackendUnavailable(
            f"the {protocol}:// backend needs a library that is missing ({e})"
            + (f"; install it with: {hint}" if hint else "")
        ) from e


# ------------------------------------------------------------------------------------ unreachable servers
BREAKER_FIRST_S = 2.0  # after an operation timed out or could not connect, others fail fast this long...
BREAKER_MAX_S = 30.0  # ...doubling while the server stays unreachable, up to this


class _Breaker:
    """Fails operations fast while the server is unreachable (a circuit breaker).

    An operation that timed out or could not connect opens it: for the next ``BREAKER_FIRST_S`` seconds every
    operation raises at once, instead of each waiting out ``timeout`` (a lookup of every new prompt would stall
    an engine that long while a bucket is down; a read is a miss either way). Then one operation at a time
    tries the server: if it answers (with anything, an error included), the breaker closes; if not, it opens
    again for twice as long, up to ``BREAKER_MAX_S``.
    """

    __slots__ = ("_lock", "_until", "_window", "_trying", "_why", "_since")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._until = 0.0  # monotonic time before which operations fail fast; 0: closed
        self._window = 0.0
        self._trying = False  # one operation is trying the server after the window
        self._why: BaseException | None = None
        self._since = 0.0

    def enter(self, where: str) -> bool:
        """Raises while open; returns whether this operation is the one trying the server again."""
        if not self._until:  # closed (read without the lock: the common case costs nothing)
            return False
        with self._lock:
            if not self._until:
                return False
            now = time.monotonic()
            if now >= self._until and not self._trying:
                self._trying = True  # this operation tries the server; the others keep failing fast
                return True
            wait = max(0.0, self._until - now)
            why, since = self._why, now - self._since
        code = getattr(why, "errno", None) or errno.ETIMEDOUT
        again = f"in {wait:.0f} s" if wait else "once the operation trying it ends"
        raise oserror(code, f"{where} is not answering ({os.strerror(code).lower()}, for {since:.0f} s); failing "
                            f"fast, kvfs tries it again {again}", why)

    def leave(self, e: BaseException | None, trying: bool) -> None:
        """An operation ended (``e``: its error); ``trying``: what :meth:`enter` returned for it."""
        unreachable = isinstance(e, (TimeoutError, ConnectionError))
        if not unreachable and not self._until:
            return
        with self._lock:
            if not unreachable:  # the server answered
                self._until = self._window = 0.0
                self._trying = False
                self._why = None
                return
            if self._until and not trying:
                # an operation started before the breaker opened, failing with the others of that outage: one
                # failure (operations in flight would each double the window, to BREAKER_MAX_S at once)
                return
            now = time.monotonic()
            if not self._until:
                self._since = now
            self._window = min(BREAKER_MAX_S, self._window * 2 if self._window else BREAKER_FIRST_S)
            self._until = now + self._window
            self._trying = False
            self._why = e


# ------------------------------------------------------------------------------------ backend
class FsspecBackend(Backend):
    """A kvfs tier over any fsspec filesystem; s3fs for ``s3://``. The tier shared across nodes."""

    parallel_puts = True
    scheme = "fsspec"
    shared = True

    def __init__(self, location: str, *, protocol: str = "s3", concurrency: int | str = 32,
                 timeout: float | str = 30.0, retries: int | str = 4, **storage_options: Any) -> None:
        self.protocol = protocol.lower()
        self.concurrency = _positive("concurrency", concurrency, int)
        self.timeout = _positive("timeout", timeout, float)
        self.retries = _retries(retries)
        fs_cls = _fs_class(self.protocol)
        self._is_s3 = self.protocol in ("s3", "s3a")
        options = self._storage_options(fs_cls, dict(storage_options))
        try:
            fs = fs_cls(skip_instance_cache=True, **options)
        except TypeError as e:
            raise InvalidURL(f"bad option for {self.protocol}://: {e}") from None
        if self._is_s3:
            fs.retries = 1  # one try per s3fs call: kvfs retries, within its deadline
        self.fs = fs
        if getattr(fs, "async_impl", False):
            self._afs = fs
        else:
            from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

            self._afs = AsyncFileSystemWrapper(fs, asynchronous=False)
        self._loop = self._afs.loop
        root = fs._strip_protocol(f"{self.protocol}://{location}").rstrip("/")
        if not root and self._is_s3:
            raise InvalidURL("s3:// needs a bucket: s3://bucket/prefix")
        self.root = root
        self.url = f"{'fsspec+' if self.protocol in ('memory', 'file') else ''}{self.protocol}://{location}"
        self.endpoint = options.get("endpoint_url") or (options.get("client_kwargs") or {}).get("endpoint_url")
        self._atomic = self.protocol in ATOMIC_PUT_PROTOCOLS
        self._closed = False
        self._breaker = _Breaker()

    @classmethod
    def from_url(cls, tier: Any, **options: Any) -> "FsspecBackend":
        """Build from a tier URL: the scheme is the protocol (``fsspec+NAME://`` selects fsspec's NAME)."""
        protocol = tier.scheme[len("fsspec+"):] if tier.scheme.startswith("fsspec+") else tier.scheme
        fs_cls = _fs_class(protocol)
        params, _ = _fs_params(fs_cls)
        opts: dict[str, Any] = {}
        for k, v in tier.backend_options.items():
            if k in _KVFS_OPTIONS or k == "region":
                opts[k] = v
            else:
                opts[k] = _coerce(k, v, params.get(k))
        opts.update(options)
        return cls(tier.location, protocol=protocol, **opts)

    def _storage_options(self, fs_cls: type, options: dict[str, Any]) -> dict[str, Any]:
        params, var_kw = _fs_params(fs_cls)
        region = options.pop("region", None)
        for name in [k for k in options if k.endswith("_kwargs")]:
            _check_kwargs_option(name, options[name])
        if self._is_s3:
            _check_endpoint(options.get("endpoint_url"))
            client_kwargs = dict(options.pop("client_kwargs", None) or {})
            if region:
                client_kwargs.setdefault("region_name", region)
            options["client_kwargs"] = client_kwargs
            config = dict(options.pop("config_kwargs", None) or {})
            # kvfs owns retries and deadlines; the pool must admit `concurrency` requests at once
            config.setdefault("retries", {"max_attempts": 0, "mode": "standard"})
            config.setdefault("connect_timeout", min(5.0, self.timeout))
            config.setdefault("read_timeout", self.timeout)
            config.setdefault("max_pool_connections", max(10, self.concurrency))
            options["config_kwargs"] = config
            options.setdefault("use_listings_cache", False)  # other nodes write the bucket
            known = set(params) | {"use_listings_cache", "listings_expiry_time", "max_paths", "profile"}
            unknown = [k for k in options if k not in known]
            if unknown:
                raise InvalidURL(
                    f"unknown option(s) {', '.join(sorted(unknown))} for s3://; s3fs takes "
                    f"{', '.join(sorted(k for k in known if not k.startswith('_')))}, and kvfs "
                    f"{', '.join(_KVFS_OPTIONS)}, region"
                )
        elif region:
            options["region"] = region
        if not var_kw:
            unknown = [k for k in options if k not in params]
            if unknown:
                raise InvalidURL(f"unknown option(s) {', '.join(sorted(unknown))} for {self.protocol}://")
        else:
            # the filesystem takes any keyword (fsspec's own filesystems ignore the ones they do not know): an
            # option that is a near miss of a known one is a typo that would otherwise be ignored in silence
            import difflib

            known = set(params) | set(_KVFS_OPTIONS) | {"region"}
            for k in options:
                if k in known:
                    continue
                near = difflib.get_close_matches(k, sorted(known), n=1, cutoff=0.8)
                if near:
                    raise InvalidURL(f"unknown option {k} for {self.protocol}://; did you mean {near[0]}?")
        return options

    # ---------------------------------------------------------------------------------- plumbing
    def _full(self, key: str) -> str:
        check_key(key)
        return f"{self.root}/{key}" if self.root else key

    def _where(self) -> str:
        return self.url + (f" (endpoint {self.endpoint})" if self.endpoint else "")

    def _error(self, e: BaseException, what: str, key: str, code: int | None = None) -> StoreError:
        """The one place fsspec/S3 failures become kvfs ``OSError``s (with ``__cause__`` kept)."""
        if code is None:
            code = classify(e)[1]
        s3code = _s3_code(e)
        detail = f"S3 error {s3code}" if s3code else (type(e).__name__ + (f": {e}" if str(e) else ""))
        if code == errno.ETIMEDOUT:
            msg = (f"timed out after {self.timeout:g} s {what} {key} on {self._where()} ({detail}); "
                   "is the server up and reachable? (raise ?timeout= for slow links)")
        elif code in (errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH, errno.ENETUNREACH):
            msg = f"cannot connect to {self._where()} {what} {key} ({detail}); is the server up and reachable?"
        elif code == errno.EACCES:
            msg = f"access denied {what} {key} on {self._where()} ({detail}); check the credentials and bucket policy"
        elif s3code == "NoSuchBucket":
            msg = f"the bucket of {self.url} does not exist ({what} {key}); create it first"
        elif code == errno.EAGAIN:
            msg = f"throttled {what} {key} on {self._where()} ({detail}) after {self.retries} retries"
        else:
            msg = f"{what} {key} on {self._where()} failed ({detail})"
        err = oserror(code, msg, e)
        err.filename = key
        return err

    def _run(self, coro_fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        if self._closed:
            raise StoreError(errno.EBADF, f"{self.url} is closed")
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            raise RuntimeError(f"{self.url}: a blocking call from inside fsspec's event loop would deadlock")
        trying = self._breaker.enter(self._where())
        try:
            # not fsspec.asyn.sync: it turns every TimeoutError (our Timeout too) into a bare FSTimeoutError
            out = asyncio.run_coroutine_threadsafe(coro_fn(*args), self._loop).result()
        except BaseException as e:
            self._breaker.leave(e, trying)
            raise
        self._breaker.leave(None, trying)
        return out

    async def _attempt(self, what: str, key: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        """One key's operation: retries with backoff on retryable errors, all within ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        delay = 0.05
        attempt = 0
        while True:
            remaining = deadline - loop.time()
            try:
                if remaining <= 0:
                    raise asyncio.TimeoutError()
                return await asyncio.wait_for(fn(), remaining)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - classified below
                pause = min(delay * (1 + random.random()), 2.0)
                if self._failed(e, what, key, attempt < self.retries and loop.time() + pause < deadline):
                    return _MISSING
                attempt += 1
                delay *= 2
                log.debug("kvfs: retrying %s %s on %s after %s", what, key, self.url, type(e).__name__)
                await asyncio.sleep(pause)

    def _failed(self, e: BaseException, what: str, key: str, may_retry: bool) -> bool:
        """An operation's error: True if it means the key is missing, False if it is worth retrying (when
        ``may_retry``); anything else is raised as kvfs's own error."""
        kind, code = classify(e)
        if kind == "missing" and _s3_code(e) != "NoSuchBucket":
            return True
        if kind == "retry" and may_retry:
            return False
        if isinstance(e, asyncio.TimeoutError):
            code = errno.ETIMEDOUT
        raise self._error(e, what, key, code) from e

    async def _batch(self, what: str, jobs: Sequence[tuple[str, Callable[[], Awaitable[Any]]]]) -> list[Any]:
        """Run ``(key, coroutine function)`` jobs, ``concurrency`` at a time; the first failure cancels the rest."""
        if not jobs:
            return []
        sem = asyncio.Semaphore(self.concurrency)

        async def one(key, fn):
            async with sem:
                return await self._attempt(what, key, fn)

        tasks = [asyncio.ensure_future(one(k, fn)) for k, fn in jobs]
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        if pending:
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        first: BaseException | None = None
        for t in tasks:  # in order: the first key's error is the one reported; every one is retrieved
            if t.done() and not t.cancelled():
                exc = t.exception()
                if exc is not None and first is None:
                    first = exc
        if first is not None:
            raise first
        return [t.result() for t in tasks]

    # ---------------------------------------------------------------------------------- reads
    def _cat(self, path: str, start: int | None = None, end: int | None = None):
        if self._is_s3:  # one GET: s3fs would first HEAD the object to decide on parallel ranges
            return lambda: self._afs._cat_file(path, start=start, end=end, max_concurrency=1)
        return lambda: self._afs._cat_file(path, start=start, end=end)

    def get_many(self, keys: Sequence[str]) -> list[Buffer | None]:
        paths = [self._full(k) for k in keys]

        async def go():
            return await self._batch("reading", [(k, self._cat(p)) for k, p in zip(keys, paths)])

        return [None if v is _MISSING else v for v in self._run(go)]

    def get_ranges(self, ranges: Sequence[ByteRange]) -> list[Buffer | None]:
        paths = [self._full(r.key) for r in ranges]

        def job(path: str, r: ByteRange):
            if r.end is not None and r.end <= r.start:
                return lambda: self._empty_range(path)
            start = r.start or None
            return lambda: self._ranged(path, start, r.end)

        async def go():
            return await self._batch("reading a range of", [(r.key, job(p, r)) for p, r in zip(paths, ranges)])

        return [None if v is _MISSING else v for v in self._run(go)]

    async def _ranged(self, path: str, start: int | None, end: int | None):
        try:
            return await self._cat(path, start, end)()
        except Exception as e:  # noqa: BLE001
            if _s3_code(e) in ("InvalidRange", "416"):
                return b""  # the object exists but starts before `start`: a short (empty) range
            raise

    async def _empty_range(self, path: str):
        return b"" if await self._exists(path) else _MISSING

    async def _head(self, path: str) -> dict | None:
        """Size and modification time of one object, ``None`` if missing (one HEAD for S3)."""
        if self._is_s3:
            bucket, key, _ = self.fs.split_path(path)
            try:
                out = await self.fs._call_s3("head_object", Bucket=bucket, Key=key)
            except Exception as e:  # noqa: BLE001
                if classify(e)[0] == "missing" and _s3_code(e) != "NoSuchBucket":
                    return None
                raise
            mtime = out.get("LastModified")
            return {"size": out["ContentLength"], "mtime": mtime.timestamp() if hasattr(mtime, "timestamp") else None}
        try:
            info = await self._afs._info(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if info.get("type", "file") != "file":
            return None
        mtime = info.get("mtime") or info.get("LastModified") or info.get("created")
        if hasattr(mtime, "timestamp"):
            mtime = mtime.timestamp()
        return {"size": int(info.get("size") or 0), "mtime": mtime if isinstance(mtime, (int, float)) else None}

    async def _exists(self, path: str) -> bool:
        return await self._head(path) is not None

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        paths = [self._full(k) for k in keys]

        async def go():
            return await self._batch("checking", [(k, lambda p=p: self._exists(p)) for k, p in zip(keys, paths)])

        return [v is True for v in self._run(go)]

    def stat(self, key: str) -> ObjectInfo | None:
        path = self._full(key)

        async def go():
            return await self._batch("checking", [(key, lambda: self._head(path))])

        (info,) = self._run(go)
        if info is None or info is _MISSING:
            return None
        return ObjectInfo(key, info["size"], info["mtime"])

    def list(self, prefix: str = "") -> Iterator[str]:
        """Every key under ``prefix`` (one recursive listing below the prefix's directory)."""
        head, _, tail = prefix.rpartition("/")
        base = "/".join(p for p in (self.root, head) if p)
        strip = len(self.root) + 1 if self.root else 0

        async def find():
            return await self._afs._find(base)

        async def go():
            if self._is_s3 and hasattr(self._afs, "_iterdir"):
                # (s3fs's page-by-page listing; an s3fs without it lists through _find, the timeout bounding all)
                return [await self._list_s3(base, tail, prefix or "/")]
            return await self._batch("listing", [(prefix or "/", find)])

        (found,) = self._run(go)
        if found is _MISSING:
            return iter([])
        keys = []
        for name in found:
            name = name.lstrip("/") if not self.root.startswith("/") else name
            if not name.startswith(self.root):
                continue
            k = name[strip:]
            if k.startswith(prefix) and not k.endswith(TMP_SUFFIX) and k:
                keys.append(k)
        return iter(keys)

    async def _list_s3(self, base: str, tail: str, what: str) -> list[str] | object:
        """Every object name under ``base``/``tail``, page by page. ``timeout`` bounds each page, not the whole
        listing (a bucket of a million chunks takes a thousand pages); a retryable failure starts it again."""
        bucket, _, path = base.partition("/")
        key_prefix = (path + "/" if path else "") + tail
        attempt, delay = 0, 0.05
        while True:
            names: list[str] = []
            try:
                pages = self._afs._iterdir(bucket, delimiter="", prefix=key_prefix).__aiter__()
                while True:
                    try:
                        info = await asyncio.wait_for(pages.__anext__(), self.timeout)
                    except StopAsyncIteration:
                        return names
                    names.append(info["name"])
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - classified below
                if self._failed(e, "listing", what, attempt < self.retries):
                    return _MISSING
                attempt += 1
                await asyncio.sleep(min(delay * (1 + random.random()), 2.0))
                delay *= 2

    # ---------------------------------------------------------------------------------- writes
    def put_many(self, items: Mapping[str, Buffer]) -> None:
        staged = [(k, self._full(k), v) for k, v in items.items()]  # every key checked before any write

        def job(path: str, value: Buffer):
            if self._is_s3:
                # botocore takes bytes, bytearray or a file; anything else is copied once (memcpy is
                # two orders of magnitude faster than the network)
                data = value if isinstance(value, (bytes, bytearray)) else bytes(memoryview(value).cast("B"))
                return lambda: self._afs._pipe_file(path, data)
            data = bytes(memoryview(value).cast("B"))  # the filesystem may keep it: never the caller's buffer
            if self._atomic:
                return lambda: self._afs._pipe_file(path, data)
            return lambda: self._put_via_tmp(path, data)

        async def go():
            await self._batch("writing", [(k, job(p, v)) for k, p, v in staged])

        self._run(go)

    async def _put_via_tmp(self, path: str, data: bytes) -> None:
        tmp = f"{path}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}"
        parent = path.rpartition("/")[0]
        if parent:
            await self._afs._makedirs(parent, exist_ok=True)
        await self._afs._pipe_file(tmp, data)
        try:
            await self._afs._mv(tmp, path)
        except BaseException:
            try:
                await self._afs._rm_file(tmp)
            except Exception:  # noqa: BLE001
                pass
            raise

    def delete_many(self, keys: Sequence[str]) -> None:
        paths = [self._full(k) for k in keys]
        if not paths:
            return
        if self._is_s3:
            groups = [paths[i : i + 1000] for i in range(0, len(paths), 1000)]  # DeleteObjects takes 1000
            jobs = [(keys[i], lambda g=g: self._delete_s3(g)) for i, g in zip(range(0, len(paths), 1000), groups)]
        else:
            jobs = [(k, lambda p=p: self._afs._rm_file(p)) for k, p in zip(keys, paths)]

        async def go():
            await self._batch("deleting", jobs)

        self._run(go)

    async def _delete_s3(self, paths: Sequence[str]) -> None:
        """One ``DeleteObjects`` request. It answers 200 even when keys could not be deleted (no
        ``s3:DeleteObject`` permission, object lock...), listing them under ``Errors``, which s3fs's
        ``_bulk_delete`` ignores: the first such error is raised here (a missing key is not one), so that an
        eviction never reports as freed what is still in the bucket."""
        bucket = self.fs.split_path(paths[0])[0]
        out = await self.fs._call_s3("delete_objects", Bucket=bucket, Delete={
            "Objects": [{"Key": self.fs.split_path(p)[1]} for p in paths], "Quiet": True})
        failed = [e for e in out.get("Errors") or () if str(e.get("Code")) not in _MISSING_CODES]
        if failed:
            from botocore.exceptions import ClientError

            first = failed[0]
            raise ClientError({"Error": {"Code": str(first.get("Code")), "Message": (
                f"{len(failed)} of {len(paths)} object(s) not deleted, first {first.get('Key')}: "
                f"{first.get('Message', '')}")}}, "DeleteObjects")

    # ---------------------------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Close the filesystem's connections now (not at garbage collection)."""
        if self._closed:
            return
        self._closed = True
        creator = getattr(self.fs, "_s3creator", None)
        if creator is not None and getattr(self.fs, "_s3", None) is not None:
            from fsspec.asyn import sync

            try:
                sync(self._loop, creator.__aexit__, None, None, None, timeout=5)
            except Exception as e:  # noqa: BLE001 - closing must not fail the store's close
                log.debug("kvfs: closing the S3 session of %s: %s", self.url, e)
            self.fs._s3 = None
