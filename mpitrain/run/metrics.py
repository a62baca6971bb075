"""What rank 0 prints and logs: the progress line, JSON lines, the run summary.

Nothing collective happens in here: every rank makes the same calls with the
same values, and only rank 0 (``enabled``) writes.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, TextIO

__all__ = ["MetricsLog", "Reporter", "Meter", "summarize", "summary_line", "read_log", "eta"]


def eta(seconds: float) -> str:
    """12345.6 -> '3:25:46'."""
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


SHORT = {"accuracy": "acc"}  # how the progress line names a metric


def _fmt(record: Dict[str, Any], total: int, headline: str = "accuracy") -> str:
    name = SHORT.get(headline, headline)
    line = (f"step {record['step']:>{len(str(total))}}/{total}  epoch {record['epoch']}  "
            f"loss {record['loss']:.4f}")
    if headline in record:
        line += f"  {name} {record[headline]:.3f}"
    line += f"  samples/s {record['samples_per_s']:,.0f}"
    if "grad_norm" in record:
        line += f"  grad_norm {record['grad_norm']:.3g}"
        if record.get("clipped_steps"):
            line += f" (clipped {record['clipped_steps']}x)"
    if "eta_s" in record:
        line += f"  ETA {eta(record['eta_s'])}"
    if "val_loss" in record:
        line += f"  val_loss {record['val_loss']:.4f}"
        if f"val_{headline}" in record:
            line += f"  val_{name} {record[f'val_{headline}']:.3f}"
    return line


def _live_stream(out: TextIO) -> Optional[TextIO]:
    """Where the live progress line goes: ``out`` if it is a terminal; else the
    controlling terminal (under mpirun a rank's stdout is a pipe to the
    launcher, but the user's terminal is still there); None in batch jobs.
    ``MPITRAIN_PROGRESS=live`` forces it onto ``out``, ``=plain`` turns it off."""
    mode = os.environ.get("MPITRAIN_PROGRESS", "auto")
    if mode == "plain":
        return None
    if mode == "live" or out.isatty():
        return out
    try:
        return open("/dev/tty", "w")
    except OSError:  # no controlling terminal: Slurm, nohup, CI
        return None


class MetricsLog:
    """A JSON-lines log written by rank 0 of ``comm``, one whole record per ``write``
    (appended, never truncated: a resumed run continues the same file)::

        with MetricsLog(comm, "run/metrics.jsonl") as log:
            log.write({"step": 10, "loss": 0.42})

    Opening is collective: a path that cannot be written is an ``MpitrainError`` on
    every rank.  Each record goes out in one ``write`` call of the whole line, so a
    crash never leaves half a record followed by another.
    """

    def __init__(self, comm, path: str, *, enabled: Optional[bool] = None):
        from ..runtime import on_root

        self.path = path
        self.enabled = comm.Get_rank() == 0 if enabled is None else enabled
        self._fd: Optional[int] = None
        if comm is not None and enabled is None:
            on_root(comm, self._open)
        elif self.enabled:
            self._open()

    def _open(self) -> None:
        from ..runtime import MpitrainError

        try:
            if os.path.dirname(self.path):
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise MpitrainError(f"{self.path}: cannot write the metrics there: "
                                f"{exc.strerror or exc}") from None

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def write(self, record: Optional[Dict[str, Any]] = None, **fields: Any) -> None:
        """Append ``record`` (and ``fields``) as one line (rank 0; the others: nothing).

        A write that fails (a full disk) takes back what it wrote of the record and
        stops the log with one warning: the file keeps whole records only, and training
        goes on (a checkpoint, which needs the disk, says what to do)."""
        if self._fd is None:
            return
        line = (json.dumps({**(record or {}), **fields}) + "\n").encode()
        before = os.fstat(self._fd).st_size
        try:
            written = os.write(self._fd, line)
            while written < len(line):  # a short write (a signal, a full pipe): the rest
                written += os.write(self._fd, line[written:])
        except OSError as exc:
            try:
                os.ftruncate(self._fd, before)
            except OSError:
                pass
            self.close()
            print(f"mpitrain: warning: {self.path}: cannot write the metrics: "
                  f"{os.strerror(exc.errno) if exc.errno else exc}; the log stops at its last "
                  "whole record", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Close the file (local)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Reporter:
    """Progress and metrics, written by the ``enabled`` rank only.

    All ranks construct one and call it with the same values; only rank 0
    (``enabled``) writes, so nothing collective ever happens in here.  On a
    terminal the progress is one line rewritten in place; elsewhere (a Slurm
    log) it is a plain line every ``log_every`` steps.  Every logged step is
    appended as a JSON object to ``run_dir/metrics.jsonl`` (and ``log_path``).
    """

    def __init__(self, enabled: bool, log_path: Optional[str], total_steps: int,
                 out: TextIO = sys.stdout, run_dir: Optional[str] = None,
                 quiet: bool = False, headline: str = "accuracy"):
        self.enabled, self.total, self.out, self.quiet = enabled, total_steps, out, quiet
        self.run_dir, self.headline = run_dir, headline
        self.live = _live_stream(out) if enabled and not quiet else None
        self._last_live = 0.0
        self.logs: List[MetricsLog] = []
        self.log_path = log_path

    def open_logs(self) -> None:
        """Open (for appending) ``run_dir/metrics.jsonl`` and the ``log`` file: on the
        enabled rank; call it through ``runtime.on_root`` so every rank learns of a
        failure."""
        from ..runtime import ConfigError, MpitrainError, literal

        if not self.enabled:
            return
        paths = [(os.path.join(self.run_dir, "metrics.jsonl"), "{run_dir}")] if self.run_dir \
            else []
        paths += [(self.log_path, "{log}")] if self.log_path else []
        for path, param in paths:
            try:
                self.logs.append(MetricsLog(None, path, enabled=True))
            except MpitrainError as exc:
                raise ConfigError(f"{param} {literal(str(exc))}") from None

    def say(self, text: str, always: bool = False) -> None:
        """Print one line (rank 0 only; not with --quiet unless ``always``)."""
        if self.enabled and (always or not self.quiet):
            self._clear_live()
            print(text, file=self.out, flush=True)

    def _clear_live(self) -> None:
        if self.live and self._last_live:
            self.live.write("\r\033[K")
            self.live.flush()
            self._last_live = 0.0

    def live_step(self, record: Dict[str, Any]) -> None:
        """Rewrite the live progress line (a terminal only; at most 10 times a second)."""
        now = time.monotonic()
        if self.live and now - self._last_live > 0.1:
            self.live.write("\r\033[K" + _fmt(record, self.total, self.headline))
            self.live.flush()
            self._last_live = now

    def step(self, record: Dict[str, Any]) -> None:
        """Print and log one step's record."""
        if not self.enabled:
            return
        if not self.quiet:
            self._clear_live()
            print(_fmt(record, self.total, self.headline), file=self.out, flush=True)
        self._log(record)

    def _log(self, record: Dict[str, Any]) -> None:
        for log in self.logs:
            log.write(record)

    def event(self, line: str, record: Dict[str, Any]) -> None:
        """Print ``line`` (even with --quiet) and log ``record``: something happened to
        the job (a healing), not a step."""
        self.say(line, always=True)
        if self.enabled:
            self._log(record)

    def close(self) -> None:
        """Close the live line and the log files."""
        self._clear_live()
        if self.live is not None and self.live is not self.out:
            self.live.close()
        self.live = None
        for log in self.logs:
            log.close()
        self.logs = []


class Meter:
    """Step times of a run from ``start`` to ``total``: samples/s per logging window, the
    run's samples/s after the first step (which pays for warm-up), and the ETA."""

    def __init__(self, start: int, total: int):
        self.start, self.total = start, total
        self.window_samples, self.window_time = 0, 0.0
        self.train_time, self.timed_samples = 0.0, 0
        self.last = 0.0  # seconds of the last step

    def add(self, step: int, batch: int, seconds: float) -> None:
        """Step ``step`` (0-based) trained ``batch`` samples in ``seconds``."""
        self.last = seconds
        self.window_samples += batch
        self.window_time += seconds
        if step > self.start or self.total - self.start == 1:
            self.train_time += seconds
            self.timed_samples += batch

    def eta(self, done: int) -> float:
        """Seconds left after ``done`` steps, at the pace so far."""
        return (self.total - done) * self.train_time / max(1, done - self.start - 1)

    def window(self) -> float:
        """Samples/s since the last call (the logging window), and start a new window."""
        rate = self.window_samples / self.window_time if self.window_time else 0.0
        self.window_samples, self.window_time = 0, 0.0
        return rate

    @property
    def samples_per_s(self) -> float:
        return self.timed_samples / self.train_time if self.train_time else 0.0


def summarize(meter: Meter, phases: Dict[str, float], checkpoints, record: Dict[str, Any], *,
              wall: float, ranks: int, end: int, preempted: bool,
              early_stop: Optional[str] = None, best: Optional[Dict[str, Any]] = None,
              clipped: Optional[int] = None) -> Dict[str, Any]:
    """The run's summary: ``phases`` the slowest rank's seconds in data, compute and
    exchange; ``checkpoints`` the run's ``fault.resume.Checkpoints``; ``record`` the
    last logged step; ``early_stop`` why it stopped early, ``best`` the monitored
    metric's best, ``clipped`` the steps whose gradient was clipped."""
    busy = sum(phases.values()) or 1.0
    return {
        "steps": meter.total, "ranks": ranks, "start_step": meter.start, "end_step": end,
        "preempted": preempted, "steps_run": max(0, end - meter.start), "wall_s": wall,
        "samples_per_s": meter.samples_per_s,
        "final_loss": record.get("loss"),
        **{k: v for k, v in record.items() if k.startswith("val_")},
        **{f"share_{k}": v / busy for k, v in phases.items()},
        "checkpoints": checkpoints.written, "checkpoint_s": checkpoints.seconds,
        "checkpoint_bytes": checkpoints.last_bytes,
        "share_checkpoint": checkpoints.seconds / wall if wall else 0.0,
        "early_stop": early_stop, "best": best, "clipped_steps": clipped}


def peak_rss() -> int:
    """This process's peak resident memory so far, in bytes (0 if unknown)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS: bytes; Linux: kB


def summary_line(summary: Dict[str, Any], headline: str = "accuracy") -> str:
    """The run's last line: steps, time, samples/s, loss, and where the time went."""
    key = f"val_{headline}"
    val = (f", val_{SHORT.get(headline, headline)} {summary[key]:.3f}"
           if summary.get(key) is not None else "")
    ckpt = (f"; {summary['checkpoints']} checkpoints, {summary['share_checkpoint']:.1%} of "
            "the time" if summary.get("checkpoints") else "")
    loss = (f"{summary['final_loss']:.4f}" if summary.get("final_loss") is not None
            else "n/a")
    if summary.get("peak_activation_bytes"):
        ckpt += (f"; memory: {summary['peak_activation_bytes'] / 2 ** 20:,.3g} MiB of "
                 f"activations kept for backward, {summary['peak_rss_bytes'] / 2 ** 20:,.0f} "
                 "MiB peak per rank")
    if summary.get("clipped_steps") is not None:
        ckpt += f"; {summary['clipped_steps']} steps clipped"
    if summary.get("early_stop"):
        ckpt += f"; {summary['early_stop']}"
    if summary.get("strategy") == "ps":
        ckpt += (f"; parameter server: {summary['messages_per_step']:,.0f} messages and "
                 f"{summary['bytes_per_step'] / 1e6:,.2f} MB per step, staleness at most "
                 f"{summary['staleness_max']} (mean {summary['staleness_mean']:.2f})")
    return (f"done: steps {summary['start_step'] + 1}-{summary['end_step']} in "
            f"{summary['wall_s']:.1f} s, {summary['samples_per_s']:,.0f} samples/s (after the "
            f"first), final loss {loss}{val}; step time: compute "
            f"{summary['share_compute']:.0%}, exchange {summary['share_exchange']:.0%}, "
            f"data {summary['share_data']:.0%}{ckpt}")


def read_log(path: str, warn=None) -> List[Dict[str, Any]]:
    """The step records of a metrics file (or a run directory's metrics.jsonl).  A torn
    last record (a crash or a full disk in the middle of a write) is skipped with a
    warning (``warn``, default: stderr); a bad record before it is a ValueError."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    last = max([k for k, line in enumerate(lines) if line.strip()], default=-1)
    for k, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if k == last:
                (warn or _stderr)(f"{path}:{k + 1}: a torn last record, skipped")
                break
            raise ValueError(f"{path}:{k + 1}: not a JSON object") from None
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def _stderr(text: str) -> None:
    print(f"mpitrain: warning: {text}", file=sys.stderr, flush=True)
