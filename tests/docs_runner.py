"""Runs the code blocks of one Markdown document in order, as a reader would.

usage: python docs_runner.py DOC.md WORKDIR

What runs, in document order, starting in WORKDIR:

* ```python blocks, in one interpreter (later blocks see earlier names);
* ```bash / ```sh blocks, each with ``bash -euo pipefail``;
* ```console blocks whose lines start with ``$ ``: a terminal transcript. Each
  ``$ COMMAND`` (continued by a trailing ``\\``) runs as a reader would type it
  (no errexit); its exit status must be the one the block shows
  (``[exit status N]`` after its output, else 0) and its output (stdout and
  stderr together) must match the lines shown, up to what varies between runs:
  runs of spaces, ages (``3s ago``), dates, timings (``0.14 s``, ``12 ms``), the
  FREE column of a ``kvfs du`` tier table, and the home directory (shown as
  ``/home/you/``).

The shell state carries over like one terminal session: variables, functions,
exports and the working directory a shell block leaves are there for the next
shell block and transcript command, and exported variables and the directory
are also what later Python blocks see (``os.environ``, ``os.getcwd()``).

Other blocks (```text, ```json, unlabeled ones) are output or syntax, not run.

An HTML comment right before a block changes what happens to it:

* ``<!-- docs-test: skip REASON -->``: not run (REASON says why: a GPU, a real
  engine with real weights, a download...);
* ``<!-- docs-test: instead REASON`` then lines of code, then ``-->``: that code
  runs in the block's place (e.g. a quick variant of a long command);
* ``<!-- docs-test: output varies REASON -->``: a transcript whose output is not
  compared (the exit status still is).

Prints one line per block; exits non-zero at the first failing block.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from dataclasses import dataclass

FENCE = re.compile(r"^(?P<indent> {0,3})```(?P<lang>[A-Za-z0-9_+-]*)[^\n]*\n(?P<code>.*?)^(?P=indent)```\s*$",
                   re.S | re.M)
DIRECTIVE = re.compile(r"<!--\s*docs-test:\s*(?P<what>skip|instead|output varies)\b(?P<rest>.*?)-->", re.S)
RUN_LANGS = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash",
             "console": "console"}
BLOCK_TIMEOUT = float(os.environ.get("DOCS_BLOCK_TIMEOUT", "300"))

# Saves what a reader's shell would still hold after a command: variables, functions and the directory
# (`declare -p` output re-declares them when sourced), and the environment for the Python blocks.
_SAVE = r"""
__kvfs_save() {
  local __v __d __f
  { for __v in $(compgen -v); do
      case $__v in
        BASH*|FUNCNAME|PIPESTATUS|RANDOM|SRANDOM|SECONDS|LINENO|SHLVL|PPID|UID|EUID|GROUPS|SHELLOPTS|HISTCMD|\
        _|OPTIND|OPTARG|OPTERR|COMP_*|DIRSTACK|EPOCHREALTIME|EPOCHSECONDS|PWD|OLDPWD|__kvfs*) continue ;;
      esac
      __d=$(declare -p "$__v" 2>/dev/null) || continue
      __f=${__d#declare }; __f=${__f%% *}
      case $__f in *x*) continue ;; esac  # exported: travels in the environment
      printf '%s\n' "$__d"
    done
    declare -f
  } > "$__KVFS_STATE.new" && mv "$__KVFS_STATE.new" "$__KVFS_STATE"
  env -0 > "$__KVFS_ENV"
}
"""

@dataclass
class Block:
    line: int
    lang: str | None  # python, bash, console; None: not run
    code: str
    directive: str | None = None  # skip, instead, output varies
    reason: str = ""
    replacement: str | None = None


def blocks(text: str) -> list[Block]:
    out = []
    for m in FENCE.finditer(text):
        lang = RUN_LANGS.get(m.group("lang").lower())
        code = textwrap.dedent(m.group("code"))  # blocks inside list items are indented
        if lang == "console" and not any(ln.startswith("$ ") for ln in code.splitlines()):
            lang = None  # output only
        b = Block(text[: m.start()].count("\n") + 1, lang, code)
        before = text[: m.start()].rstrip()
        comment = before[before.rfind("<!--"):] if before.endswith("-->") else ""
        d = DIRECTIVE.fullmatch(comment)
        if d is None and re.match(r"<!--\s*docs-test:", comment):
            raise ValueError(f"line {b.line}: unknown docs-test directive {comment[:60]!r} "
                             "(skip REASON, instead REASON + code, output varies REASON)")
        if d is not None:
            b.directive = d.group("what")
            rest = d.group("rest")
            if b.directive == "instead":
                first, _, body = rest.partition("\n")
                b.reason, b.replacement = first.strip(), body
            else:
                b.reason = " ".join(rest.split())
        out.append(b)
    return out


# ------------------------------------------------------------------------------------------- shell
class Shell:
    """One reader's terminal: each block runs in a fresh bash that restores the state the last one left."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="kvfs-docs-shell-")
        self.state = os.path.join(self.dir, "state.sh")
        self.env_file = os.path.join(self.dir, "env")
        open(self.state, "w").close()

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def run(self, code: str, *, strict: bool) -> subprocess.CompletedProcess:
        sys.stdout.flush()
        """Run ``code``: strict (a shell block: errexit, nounset, pipefail; stdout and stderr apart) or as
        typed at a prompt (a transcript command: stdout and stderr together, as a terminal shows them)."""
        env = dict(os.environ, __KVFS_STATE=self.state, __KVFS_ENV=self.env_file, PYTHONUNBUFFERED="1")
        opts = "set -euo pipefail" if strict else ""
        script = f"{_SAVE}\nsource \"$__KVFS_STATE\"\ntrap __kvfs_save EXIT\n{opts}\n{code}\n"
        # a shell block's output goes where the runner's goes (shown with the test's report)
        out = dict(stderr=subprocess.STDOUT) if strict else dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        r = subprocess.run(["bash", "-c", script], env=env, text=True, timeout=BLOCK_TIMEOUT, **out)
        self._load_env()
        return r

    def _load_env(self) -> None:
        """What the shell exported and where it is: the process Python blocks run in follows."""
        try:
            raw = open(self.env_file, "rb").read()
        except FileNotFoundError:
            return
        env = dict(kv.split(b"=", 1) for kv in raw.split(b"\0") if b"=" in kv)
        env = {k.decode(): v.decode() for k, v in env.items() if not k.startswith(b"__KVFS")}
        for k in ("_", "SHLVL", "PYTHONUNBUFFERED"):
            env.pop(k, None)
        if "PYTHONUNBUFFERED" in os.environ:
            env["PYTHONUNBUFFERED"] = os.environ["PYTHONUNBUFFERED"]
        os.environ.clear()
        os.environ.update(env)
        if env.get("PWD") and os.path.isdir(env["PWD"]):
            os.chdir(env["PWD"])


# ------------------------------------------------------------------------------------------- transcripts
@dataclass
class Step:
    command: str
    expected: list[str]
    status: int


_STATUS = re.compile(r"^\[exit status (\d+)\]\s*$")


def transcript(code: str) -> list[Step]:
    steps: list[Step] = []
    lines = code.splitlines()
    i = 0
    while i < len(lines):
        ln = lines[i]
        if not ln.startswith("$ "):
            if steps:
                steps[-1].expected.append(ln)
            i += 1
            continue
        cmd = [ln[2:]]
        while cmd[-1].endswith("\\") and i + 1 < len(lines):
            i += 1
            cmd.append(lines[i])
        steps.append(Step("\n".join(cmd), [], 0))
        i += 1
    for s in steps:
        while s.expected and not s.expected[-1].strip():
            s.expected.pop()
        if s.expected and (m := _STATUS.match(s.expected[-1])):
            s.status = int(m.group(1))
            s.expected.pop()
    return steps


_VARYING = [
    (re.compile(r"\b\d+(\.\d+)?\s?[smhdw] ago\b|\bjust now\b"), "<age>"),
    (re.compile(r"\b\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d\b"), "<date>"),
    (re.compile(r"\b\d+(\.\d+)? ?(s|ms|µs|us)\b"), "<time>"),
]


def normalize(lines: list[str], home: str | None = None) -> list[str]:
    out = []
    free_col = False
    for ln in lines:
        ln = ln.rstrip()
        if home:  # the reader's home directory, as documents show it
            ln = ln.replace(home.rstrip("/") + "/", "/home/you/")
        if not ln.strip():
            free_col = False
            out.append("")
            continue
        fields = ln.split()
        if fields[:1] == ["TIER"] and fields[-1] == "FREE":
            free_col = True
        elif free_col and len(fields) >= 2:  # a du tier row: free space is the device's
            ln = ln.rsplit(" ", 2)[0] if fields[-1].endswith("B") else ln.rsplit(" ", 1)[0]
            ln += " <free>"
        for pat, rep in _VARYING:
            ln = pat.sub(rep, ln)
        out.append(" ".join(ln.split()))
    while out and not out[0]:
        out.pop(0)
    while out and not out[-1]:
        out.pop()
    return out


def run_transcript(shell: Shell, block: Block) -> str | None:
    """Runs every command of a transcript; returns a failure message or None."""
    for step in transcript(block.code):
        r = shell.run(step.command, strict=False)
        got = r.stdout.splitlines()
        if r.returncode != step.status:
            return (f"`$ {step.command}` exited {r.returncode}, the document says {step.status}\n--- output\n"
                    + "\n".join(got[-60:]))
        if block.directive == "output varies":
            continue
        want, have = normalize(step.expected), normalize(got, os.environ.get("HOME"))
        if want != have:
            import difflib

            diff = "\n".join(difflib.unified_diff(want, have, "document", "actual", lineterm="", n=1))
            return f"`$ {step.command}` printed something else (normalized):\n{diff}"
    return None


# ------------------------------------------------------------------------------------------- main
def main() -> int:
    doc, workdir = os.path.abspath(sys.argv[1]), sys.argv[2]
    os.chdir(workdir)
    namespace: dict = {"__name__": "__docs__"}
    shell = Shell()
    ran = skipped = 0
    try:
        for b in blocks(open(doc, encoding="utf-8").read()):
            if b.lang is None:
                continue
            where = f"{doc}:{b.line} ({b.lang})"
            if b.directive == "skip":
                print(f"SKIP {where}: {b.reason}", flush=True)
                skipped += 1
                continue
            code = b.code
            if b.directive == "instead":
                code = b.replacement or ""
                print(f"INSTEAD {where}: {b.reason}", flush=True)
            t0 = time.perf_counter()
            failure = None
            if b.lang == "python":
                try:
                    exec(compile(code, f"{doc}:{b.line}", "exec"), namespace)
                except SystemExit as e:
                    if e.code not in (0, None):
                        failure = f"SystemExit({e.code})"
                except BaseException:  # noqa: BLE001
                    failure = traceback.format_exc()
            elif b.lang == "bash":
                r = shell.run(code, strict=True)
                if r.returncode:
                    failure = f"exit {r.returncode} (its output is above)\n{code}"
            else:
                failure = run_transcript(shell, b)
            if failure is not None:
                print(f"FAIL {where}:\n{failure}", flush=True)
                return 1
            ran += 1
            print(f"OK   {where}, {time.perf_counter() - t0:.1f} s", flush=True)
    finally:
        shell.close()
    print(f"DONE {doc}: {ran} blocks ran, {skipped} skipped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
