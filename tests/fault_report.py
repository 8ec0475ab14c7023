"""What the fault suites tried, printed at the end of every test run (see ``conftest.pytest_terminal_summary``).

A suite adds its counts with :func:`add`; the summary prints one line per suite, so CI logs show how many
crash points, concurrent operations, corrupt chunks and fuzz cases ran, and that none served wrong KV.
"""

from __future__ import annotations

from collections import Counter, defaultdict

COUNTS: defaultdict[str, Counter] = defaultdict(Counter)


def add(suite: str, **counts: int) -> None:
    COUNTS[suite].update(counts)


def lines() -> list[str]:
    return [f"{suite}: " + ", ".join(f"{n} {what.replace('_', ' ')}" for what, n in c.items())
            for suite, c in sorted(COUNTS.items())]
