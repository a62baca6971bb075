"""The parameter server: a second synchronisation strategy beside all-reduce.

The first ``K`` ranks of the job are servers, the others workers.  Server ``s``
owns the slice ``rank_slice(n, s, K)`` of the flat parameter buffer (``n``
parameters) and that slice's optimizer state; workers hold the whole model,
compute the gradients of their part of each global batch and::

    worker w, step c                           server s
    ----------------                           --------
    backward; each chunk of slice s, as soon   receive the chunks of clock c of
      as it is final: Isend  --TAG_PUSH-->       every worker (posted ahead, into a
    metrics [loss sum, stop, task sums]          slot per worker and clock)
      Isend                  --TAG_METRICS->   when clock c is complete: sum the
    Irecv params, Irecv info; then               workers' slots in worker order,
      Send [c, need]         --TAG_PULL--->      clip (the norm over the servers),
                                                 one optimizer step on the slice
                             <-TAG_PARAMS--    answer each pull as soon as its
                             <-TAG_INFO----      version >= need: the slice, then
                                                 [version, first stop, clock, sums]

``version`` counts the updates applied; a worker computes step ``c`` on
parameters of at least version ``c - S`` (``S``: the staleness bound), so it
asks at the end of step ``c`` for ``need = c + 1 - S``.  With ``S = 0`` that is
the synchronous parameter server: every step sees every update before it,
the sums are in a fixed order (bitwise repeatable), and training equals
all-reduce training to float tolerance.  With ``S >= 1`` (stale-synchronous
parallel, Ho et al. 2013) no worker runs more than S steps ahead of the
slowest: servers apply each clock the moment its last push arrives, without
waiting for any other rank, and answer with the newest version they have.

Ordering: MPI does not overtake messages between two ranks on one
communicator and tag, so chunks need no sequence numbers: a server posts
each worker's receives in the order that worker sends.  Buffers: a worker
pushes straight from its gradient buffer (waited for before the next
backward writes it) and receives into its parameters (it is not computing
then); a server answers from its parameters, and waits for those sends
before the next update writes them.  Everything is buffer-based; nothing is
pickled on this path.

``shard.ServerShard`` is the server's arithmetic without MPI (the Python API's
``ParameterServer`` is one); ``server.Server`` and ``worker.Worker`` move the
messages; ``trainer.PSTrainer`` is the trainer ``run.build`` picks for
``strategy="ps"``.
"""

TAG_PUSH = 32001  # worker -> server: the gradient chunks of one clock, in chunk order
TAG_METRICS = 32002  # worker -> server: float64 [loss sum, stop, task sums] of one clock
TAG_PULL = 32003  # worker -> server: int64 [step, version needed]
TAG_PARAMS = 32004  # server -> worker: the server's slice of the parameters
TAG_INFO = 32005  # server -> worker: float64 [version, first stop, clock, metric sums]
