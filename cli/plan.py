"""``kvfs plan``: group a batch of prompts by shared prefixes and write it back in plan order."""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

import click

from ._common import EXIT_USAGE, CommandError, echo_json

TOKEN_FIELDS = ("prompt_token_ids", "input_ids", "tokens")
TEXT_FIELDS = ("prompt", "text")
DECODE_FIELDS = ("decode_tokens", "max_tokens", "max_new_tokens", "max_completion_tokens")
ADDED = ("kvfs_group", "kvfs_prefix_tokens", "kvfs_index")


@dataclass
class Request:
    line: int  # 1-based line number in the input
    raw: str  # the line as read (written back unchanged, plus the kvfs fields)
    tokens: Any  # uint32 array, or None until the text is tokenized
    text: str | None
    decode: float | None


def _fail(path: str, line: int | None, message: str) -> CommandError:
    where = f"{path}:{line}" if line is not None else path
    return CommandError(f"{where}: {message}", EXIT_USAGE, "kvfs plan")


def _fields(obj: dict) -> dict:
    """Where a request's fields live: the object itself, or its ``body`` (OpenAI batch files)."""
    body = obj.get("body")
    return body if isinstance(body, dict) and not any(k in obj for k in TOKEN_FIELDS + TEXT_FIELDS) else obj


def _parse_line(path: str, lineno: int, text: str) -> Request:
    from kvfs.errors import InvalidInput
    from kvfs.keys import as_tokens

    try:
        obj = json.loads(text)
    except ValueError as e:
        raise _fail(path, lineno, f"not JSON ({e}); each line must be one JSON object") from None
    if isinstance(obj, list):  # a bare list of token ids
        fields: dict = {"prompt_token_ids": obj}
    elif isinstance(obj, dict):
        fields = _fields(obj)
    else:
        raise _fail(path, lineno, f"expected a JSON object or a list of token ids, got {type(obj).__name__}")
    decode = None
    for k in DECODE_FIELDS:
        if fields.get(k) is not None:
            v = fields[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
                raise _fail(path, lineno, f"{k!r} must be a number >= 0, got {v!r}")
            decode = float(v)
            break
    for k in TOKEN_FIELDS + ("prompt",):
        v = fields.get(k)
        if isinstance(v, list):
            try:
                toks = as_tokens(v, allow_empty=True)
            except InvalidInput as e:
                raise _fail(path, lineno, f"bad token ids in {k!r}: {e}") from None
            if len(toks) == 0:
                raise _fail(path, lineno, f"{k!r} is empty: a prompt needs at least one token")
            return Request(lineno, text, toks, None, decode)
    for k in TEXT_FIELDS:
        v = fields.get(k)
        if isinstance(v, str):
            if not v:
                raise _fail(path, lineno, f"{k!r} is an empty string")
            return Request(lineno, text, None, v, decode)
    names = ", ".join(repr(f) for f in TOKEN_FIELDS + TEXT_FIELDS)
    if "messages" in fields:  # a chat request: its tokens depend on the engine's chat template
        raise _fail(path, lineno, f"chat 'messages' are not planned (the tokens depend on the chat template): apply "
                                  f"the template and give the prompt as text or token ids in one of {names}")
    raise _fail(path, lineno, f"no prompt: give token ids or text in one of {names}")


def read_batch(path: str) -> list[Request]:
    """The requests of a JSONL batch file (``-``: stdin), validated line by line."""
    if path == "-":
        # decoded like a file: a leading BOM is dropped, whatever the locale's encoding
        buf = getattr(sys.stdin, "buffer", None)
        if buf is None:
            return _read_lines(sys.stdin, path)
        f = io.TextIOWrapper(buf, encoding="utf-8-sig")
        try:
            return _read_lines(f, path)
        finally:
            f.detach()  # stdin's buffer stays open
    try:
        f = open(path, encoding="utf-8-sig")  # a leading BOM (Windows editors) is not part of the JSON
    except OSError as e:
        raise CommandError(f"cannot read {path}: {e.strerror or e}", EXIT_USAGE, "kvfs plan") from None
    with f:
        return _read_lines(f, path)


def _read_lines(f, path: str) -> list[Request]:
    out = []
    try:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                out.append(_parse_line(path, lineno, line.rstrip("\r\n")))
    except UnicodeDecodeError:
        raise _fail(path, None, "is not UTF-8 text; write one JSON object per line") from None
    if not out:
        raise _fail(path, None, "holds no requests (the batch is empty): write one JSON object per line")
    return out


def tokenize(requests: list[Request], name: str | None, path: str) -> None:
    """Fill in the token ids of text prompts with a local tokenizer (never downloads)."""
    texts = [r for r in requests if r.tokens is None]
    if not texts:
        return
    if name is None:
        raise _fail(path, texts[0].line, "the prompt is text: pass --tokenizer NAME (a local tokenizer directory "
                                          "or a cached model name) or give token ids")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise CommandError("--tokenizer needs transformers (pip install 'kvfs[engines]')", 1, "kvfs plan") from None
    try:
        tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; all mean "not loadable here"
        raise CommandError(f"cannot load tokenizer {name!r} offline ({type(e).__name__}: {e}); pass a local "
                           "directory holding tokenizer files, or a model already in the Hugging Face cache",
                           EXIT_USAGE, "kvfs plan") from None
    import numpy as np

    ids = tok([r.text for r in texts])["input_ids"]
    for r, t in zip(texts, ids):
        if not t:
            raise _fail(path, r.line, "the text tokenizes to no tokens")
        r.tokens = np.asarray(t, dtype="<u4")


def _with_fields(raw: str, extra: dict[str, Any]) -> str:
    """The input line with kvfs's fields added (the rest of the line is kept byte for byte)."""
    s = raw.rstrip()
    if any(f'"{k}"' in s for k in ADDED):  # planned before: replace the old fields, not duplicate them
        obj = json.loads(s)
        if isinstance(obj, list):
            obj = {"prompt_token_ids": obj}
        obj.update(extra)
        return json.dumps(obj, ensure_ascii=False)  # text stays as written, not \u-escaped
    add = ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in extra.items())
    if s.lstrip().startswith("["):  # a bare list (JSON allows whitespace before it)
        return f'{{"prompt_token_ids": {s.lstrip()}, {add}}}'
    body = s[:-1].rstrip()
    return f"{body}{', ' if body != '{' else ''}{add}}}"


def write_ordered(out: str, requests: list[Request], plan) -> None:
    """Write the requests in plan order, atomically (a temporary file renamed over ``out``)."""
    d = os.path.dirname(os.path.abspath(out))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".kvfs-plan-", suffix=".jsonl", dir=d)
    except OSError as e:  # the output's folder is missing or not writable: say so, not the temporary name
        raise CommandError(f"cannot write {out}: {e.strerror or e} ({d})", EXIT_USAGE, "kvfs plan") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for g in plan.groups:
                for r in g.requests:
                    extra = {"kvfs_group": g.id, "kvfs_prefix_tokens": len(g.prefix), "kvfs_index": r}
                    f.write(_with_fields(requests[r].raw, extra) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


@click.command("plan")
@click.argument("batch", metavar="BATCH.jsonl", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--out", "-o", "out", metavar="ORDERED.jsonl", type=click.Path(dir_okay=False, writable=True),
              help="Write the requests here in plan order, each with kvfs_group, kvfs_prefix_tokens and "
                   "kvfs_index (its line among the requests, from 0).")
@click.option("--json", "as_json", is_flag=True, help="Print the report (and the groups) as one JSON document.")
@click.option("--tokenizer", metavar="NAME",
              help="Tokenize text prompts with this tokenizer: a local directory or a model in the Hugging Face "
                   "cache (loaded offline, never downloaded).")
@click.option("--method", type=click.Choice(["dp", "greedy"]), default="dp", show_default=True,
              help="dp: the exact single-level optimum; greedy: BatchLLM's greedy prefix enlarging.")
@click.option("--min-shared", type=click.IntRange(min=1), default=1, show_default=True, metavar="TOKENS",
              help="Shortest prefix worth a group (e.g. the engine's KV block size).")
def plan(batch: str, out: str | None, as_json: bool, tokenizer: str | None, method: str, min_shared: int) -> None:
    """Plan a batch for prefix sharing (BatchLLM) and print what it saves.

    BATCH.jsonl holds one request per line: a JSON object with token ids in
    prompt_token_ids, input_ids or tokens (or prompt as a list), or text in
    prompt or text (with --tokenizer); max_tokens (or decode_tokens, an
    estimate) orders decode-heavy groups first. OpenAI batch lines (the
    request in "body") and bare JSON lists of token ids work too.

    Requests that share a prefix are grouped; running them in the order of
    --out lets an engine with kvfs (or its own prefix cache) compute each
    shared prefix once.
    """
    from kvfs.connectors.batch import plan_batch

    requests = read_batch(batch)
    tokenize(requests, tokenizer, batch)
    result = plan_batch([r.tokens for r in requests], decode_tokens=[r.decode for r in requests], method=method,
                        min_shared=min_shared)
    if out is not None:
        write_ordered(out, requests, result)
    rep = result.report
    if as_json:
        echo_json({
            "report": rep.to_dict(),
            "out": out,
            "groups": [{"id": g.id, "prefix_tokens": len(g.prefix), "requests": list(g.requests),
                        "prefill_tokens": g.prefill_tokens, "decode_ratio": g.decode_ratio} for g in result.groups],
        })
        return
    click.echo(str(rep))
    if out is not None:
        click.echo(f"wrote {rep.requests:,} requests in {rep.groups:,} groups, in plan order, to {out}")
