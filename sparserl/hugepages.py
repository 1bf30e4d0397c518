"""Back large host allocations with transparent huge pages (Linux, glibc >= 2.35).

XLA:CPU allocates its activation buffers afresh on every call. With 4 KiB pages the kernel faults
in and zeroes every page again each time: ~97,000 page faults (~380 MB) per forward + backward of
the pixel encoder at batch 256, ~12% of its time on the 2-core benchmark machine. glibc's tunable
``glibc.malloc.hugetlb=1`` makes malloc ask for transparent huge pages (``madvise``), which cuts the
faults ~200x. glibc reads tunables only at process start, so the command-line entry points restart
the interpreter once with it set. Harmless elsewhere: other platforms skip it, older glibc ignores
the tunable, and ``SPARSERL_HUGE_PAGES=0`` turns it off.
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"


def _applies(env) -> bool:
    return sys.platform == "linux" and env.get("SPARSERL_HUGE_PAGES", "1") != "0"


def wanted() -> bool:
    return _applies(os.environ) and "GLIBC_TUNABLES" not in os.environ


def restart_with_huge_pages() -> None:
    """Re-exec this interpreter (same pid, same arguments) with the tunable set, once."""
    if wanted():
        os.environ["GLIBC_TUNABLES"] = TUNABLE
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def child_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a child process, with the tunable set where it applies (a user's own is kept)."""
    if _applies(env):
        env.setdefault("GLIBC_TUNABLES", TUNABLE)
    return env
