"""The checkpoint policy of a run: the directory's lock and checks, which checkpoint to
resume from, and when to write one.

It works on any trainer through the checkpoint protocol (``capture``,
``restore``, ``mismatch``; see ``parallel.base``), so nothing here imports a
trainer.  Rank 0 alone looks at the files (a ``resume`` file may lie on its
own disk, and rank 0 writes the checkpoints); every error is agreed on all
ranks.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..runtime import ConfigError, literal, on_root
from . import checkpoint, store
from .checkpoint import State, os_reason
from .lock import DirectoryLock

__all__ = ["Checkpoints"]


class Checkpoints:
    """A run's checkpoints in ``directory`` (None: no checkpoints), the directory locked
    for this job, as its options say: ``every`` steps (0: only at the end),
    ``keep_last`` of them, and ``resume`` ('auto': the newest valid one; 'none':
    start afresh, refusing to overwrite; or a checkpoint file).  Every method but
    ``close`` is collective::

        with Checkpoints(comm, "ckpt", every=50) as ckpts:   # locked; a second job refused
            start = ckpts.restore(trainer)                    # steps done (0: a fresh start)
            for step in range(start, steps):
                trainer.step(step)
                if ckpts.due(step + 1, steps):
                    ckpts.save(trainer, step + 1)             # crash-safe, older ones pruned

    ``config``: what the checkpoints record as the run's configuration (a resume
    compares its ``groups``); ``say``: where rank 0's notes go (print); ``warn``: where
    its warnings go, which a quiet run still shows (default: ``say``).
    """

    def __init__(self, comm, directory: Optional[str], *, every: int = 100,
                 keep_last: int = 3, resume: str = "auto",
                 config: Optional[Dict[str, Any]] = None,
                 say: Callable[[str], None] = print, warn: Optional[Callable[[str], None]] = None):
        self.comm, self.directory = comm, directory
        self.every, self.keep_last, self.policy = every, keep_last, resume
        self.config, self.say = dict(config or {}), say
        self.warn = warn or say  # what changes the run (a damaged checkpoint skipped)
        self.written, self.seconds, self.last_bytes = 0, 0.0, 0
        self.lock: Optional[DirectoryLock] = None
        self.loop: Dict[str, Any] = {}  # the resumed checkpoint's loop state, on every rank

    def __enter__(self) -> "Checkpoints":
        notes = self.open()
        if self.comm.Get_rank() == 0:
            for note in notes:
                self.say(note)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def restore(self, trainer) -> int:
        """Restore the checkpoint the ``resume`` policy asks for into ``trainer``, if any
        (collective); return the steps it had done (0 without one): the step to start
        from."""
        return self.resume(trainer)

    def open(self) -> List[str]:
        """Before anything is written (collective): make the directory if needed, take
        its lock, check that it takes a file (write, fsync, remove), and remove the
        leftovers of interrupted writes; return notes for the log.  Without a directory,
        nothing."""
        if self.directory is None:
            return []

        def prepare() -> List[str]:
            d = self.directory
            if os.path.exists(d) and not os.path.isdir(d):
                raise ConfigError(f"{{ckpt_dir}} {literal(d)}: not a directory")
            try:
                os.makedirs(d, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"{{ckpt_dir}} {literal(d)}: cannot create it: "
                                  f"{literal(os_reason(exc))}") from None
            lock = DirectoryLock(d)
            try:
                note = lock.acquire()
            except OSError as exc:
                raise ConfigError(f"{{ckpt_dir}} {literal(d)}: cannot take its lock: "
                                  f"{literal(os_reason(exc))}") from None
            self.lock = lock
            try:
                return self._probe(d, lock, note)
            except BaseException:
                lock.release()  # nothing of this run is in the directory: let it go
                self.lock = None
                raise

        return on_root(self.comm, prepare)

    def _probe(self, d: str, lock: DirectoryLock, note: Optional[str]) -> List[str]:
        """Check that ``d`` takes a durable file; remove the leftovers; return notes."""
        probe = os.path.join(d, f".probe-{os.getpid()}")
        try:  # a file must be creatable, writable and durable here
            with open(probe, "wb") as f:
                f.write(b"mpitrain checks this directory takes checkpoints\n")
                f.flush()
                os.fsync(f.fileno())
            os.remove(probe)
        except OSError as exc:
            try:
                os.remove(probe)
            except OSError:
                pass
            raise ConfigError(f"{{ckpt_dir}} {literal(d)}: cannot write checkpoints "
                              f"there: {literal(os_reason(exc))}") from None
        notes = [f"checkpoint directory {d}: locked ({lock.path})"]
        if note:
            notes.append(note)
        try:
            removed = store.clean_leftovers(d)
        except OSError as exc:
            raise ConfigError(f"{{ckpt_dir}} {literal(d)}: cannot remove the leftovers of "
                              f"interrupted writes: {literal(os_reason(exc))}") from None
        notes += [f"removed {path}: the leftover of an interrupted checkpoint write"
                  for path in removed]
        return notes

    def rebind(self, comm) -> List[str]:
        """After a healing (local): go on with ``comm``; a new rank 0 takes the lock
        (the kernel freed it with its dead holder) and removes an interrupted write."""
        self.comm = comm
        if self.directory is None or self.lock is not None or comm.Get_rank() != 0:
            return []
        lock = DirectoryLock(self.directory)
        note = lock.acquire()
        self.lock = lock
        removed = store.clean_leftovers(self.directory)
        return [n for n in [note] if n] + [
            f"removed {path}: the leftover of an interrupted checkpoint write"
            for path in removed]

    def close(self) -> None:
        """Let go of the directory's lock (local: safe on an error path too)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _choose(self, trainer) -> Tuple[Optional[State], Optional[str]]:
        """(state, path) to resume from, or (None, None); rank 0 only."""
        d = self.directory
        if self.policy == "none":
            found = store.listing(d) if d else []
            if found:
                raise ConfigError(
                    f"{{ckpt_dir}} {literal(d)} holds checkpoints up to step {found[-1][0]}; "
                    "{resume} none would overwrite them: use another {ckpt_dir}, remove them, "
                    "or {resume} auto")
            return None, None
        if self.policy == "auto":
            got = store.newest_valid(d, lambda w: self.warn(f"warning: {w}")) if d else None
            if got is None:
                return None, None
            state, path = got
        else:
            state, path = checkpoint.load(self.policy), self.policy
        why = trainer.mismatch(state, self.config)
        if why:
            raise ConfigError(f"{literal(path)}: cannot resume: {why}")
        return state, path

    def resume(self, trainer) -> int:
        """Restore the checkpoint the policy asks for, if any (collective); return the
        steps it had done (0 without one)."""
        chosen: Dict[str, State] = {}  # rank 0's; trainer.restore sends it out

        def choose() -> Optional[Tuple[int, Dict[str, Any]]]:
            state, path = self._choose(trainer)
            if state is None:
                return None
            was, g = state.layout, trainer.grid
            how = ("resume auto (the newest valid checkpoint; resume none starts afresh)"
                   if self.policy == "auto" else "resume from this file")
            self.say(f"resuming from {path} at step {state.step} (epoch {state.epoch}), "
                     f"written by {was.get('world_size')} ranks (pp {was.get('pp')} x dp "
                     f"{was.get('dp')}), now {g.world.Get_size()} (pp {g.pp} x dp {g.dp}); "
                     f"{how}")
            chosen["state"] = state
            return state.step, state.loop

        got = on_root(self.comm, choose)
        if got is None:
            return 0
        step, self.loop = got
        trainer.restore(chosen.get("state"))
        return step

    def due(self, done: int, total: Optional[int] = None, stopping: bool = False) -> bool:
        """Whether a checkpoint is written after ``done`` steps: every ``every`` steps, at
        the last of ``total``, and when the run is ``stopping`` (pre-empted)."""
        if self.directory is None:
            return False
        periodic = self.every and done % self.every == 0
        return bool(periodic or done == total or stopping)

    def save(self, trainer, step: int, loop: Optional[Dict[str, Any]] = None, *,
             periodic: bool = True, best: bool = False) -> None:
        """Write the state after ``step`` from rank 0 (collective): as the checkpoint of
        ``step`` (``periodic``; older ones pruned) and/or as best.h5 (``best``, never
        pruned), one capture for both; ``loop``: the training loop's state."""
        t0 = time.perf_counter()
        state = trainer.capture(step, self.config)  # gathered on rank 0

        def write() -> Tuple[float, int]:
            state.loop = dict(loop or {})
            nbytes = 0
            if periodic:
                path, nbytes = checkpoint.save(self.directory, state)
                removed = store.prune(self.directory, self.keep_last, step)
                self.say(f"checkpoint {path}: step {step}, {nbytes / 1e6:.1f} MB in "
                         f"{(time.perf_counter() - t0) * 1e3:.0f} ms"
                         + (f"; removed {len(removed)} older" if removed else ""))
            if best:
                path, size = checkpoint.save(self.directory, state, name=checkpoint.BEST)
                nbytes = nbytes or size
                self.say(f"best checkpoint {path}: step {step} (the best evaluation so far)")
            return time.perf_counter() - t0, nbytes

        seconds, nbytes = on_root(self.comm, write)
        self.written += 1
        self.seconds += seconds
        self.last_bytes = nbytes
