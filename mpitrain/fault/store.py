"""A checkpoint directory's files: the committed checkpoints, the newest valid one, the
leftovers of interrupted writes, and pruning."""
from __future__ import annotations

import os
import re
from typing import Callable, List, Optional, Tuple

from .checkpoint import CheckpointError, State, host, load

__all__ = ["NAME", "LEFTOVER", "listing", "newest_valid", "clean_leftovers", "prune"]

NAME = re.compile(r"^ckpt-(\d{9})\.h5$")
# .ckpt-000000020.h5.tmp-HOST-PID or .best.h5.tmp-HOST-PID (version 1 wrote .tmp-PID)
LEFTOVER = re.compile(r"^\.(?:ckpt-\d{9}|best)\.h5\.tmp-(?:(?P<host>.+)-)?(?P<pid>\d+)$")


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def listing(directory: str) -> List[Tuple[int, str]]:
    """(step, path) of every committed checkpoint file in ``directory``, oldest first."""
    if not os.path.isdir(directory):
        return []
    found = [(int(m.group(1)), os.path.join(directory, name))
             for name in os.listdir(directory) if (m := NAME.match(name))]
    return sorted(found)


def newest_valid(directory: str, warn: Callable[[str], None]
                 ) -> Optional[Tuple[State, str]]:
    """The newest checkpoint that loads and verifies; each one skipped is warned about."""
    for _, path in reversed(listing(directory)):
        try:
            return load(path), path
        except CheckpointError as exc:
            warn(f"skipping checkpoint {exc}")
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def clean_leftovers(directory: str) -> List[str]:
    """Remove the temporary files of interrupted writes whose writer is gone; return their
    paths.  A writer on this host is gone when its process is; one on another host only
    the directory's lock can vouch for (``fault.lock``): call this with the lock held."""
    if not os.path.isdir(directory):
        return []
    removed = []
    for name in sorted(os.listdir(directory)):
        m = LEFTOVER.match(name)
        if not m:
            continue
        writer, pid = m.group("host") or host(), int(m.group("pid"))
        if writer == host() and pid != os.getpid() and _alive(pid):
            continue  # still being written
        path = os.path.join(directory, name)
        _remove_quietly(path)
        removed.append(path)
    return removed


def prune(directory: str, keep_last: int, written_step: int) -> List[str]:
    """Delete the oldest checkpoints older than ``written_step`` so that ``keep_last`` remain.

    The one just written (``written_step``, the newest valid one) and any with
    a later step are never deleted.
    """
    older = [(s, p) for s, p in listing(directory) if s < written_step]
    doomed = older[:max(0, len(older) - (keep_last - 1))]
    for _, path in doomed:
        os.remove(path)
    return [p for _, p in doomed]
