"""What rank 0 prints and logs: progress lines, JSON lines, the run summary."""
from __future__ import annotations

import json
import sys
from typing import Any, Dict, Optional, TextIO

__all__ = ["Reporter"]


def _fmt(record: Dict[str, Any], total: int) -> str:
    line = (f"step {record['step']:>{len(str(total))}}/{total}  epoch {record['epoch']}  "
            f"loss {record['loss']:.4f}  acc {record['accuracy']:.3f}  "
            f"samples/s {record['samples_per_s']:,.0f}")
    if "val_loss" in record:
        line += f"  val_loss {record['val_loss']:.4f}  val_acc {record['val_accuracy']:.3f}"
    return line


class Reporter:
    """Prints progress and appends JSON lines, on the ``enabled`` rank only.

    All ranks construct one and call it with the same values; only rank 0
    (``enabled``) writes, so nothing collective ever happens in here.
    """

    def __init__(self, enabled: bool, log_path: Optional[str], total_steps: int,
                 out: TextIO = sys.stdout):
        self.enabled, self.total, self.out = enabled, total_steps, out
        self.log: Optional[TextIO] = None
        if enabled and log_path:
            # Appended, never truncated: a resumed run continues the same file.
            self.log = open(log_path, "a", encoding="utf-8")

    def say(self, text: str) -> None:
        """Print one line (rank 0 only)."""
        if self.enabled:
            print(text, file=self.out, flush=True)

    def step(self, record: Dict[str, Any]) -> None:
        """Print and log one step's record."""
        if not self.enabled:
            return
        print(_fmt(record, self.total), file=self.out, flush=True)
        if self.log:
            self.log.write(json.dumps(record) + "\n")
            self.log.flush()

    def close(self) -> None:
        if self.log:
            self.log.close()
            self.log = None
