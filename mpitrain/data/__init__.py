"""Data: the manifest, the shard readers, the checks, the sampler, prefetching, prepare.

The flow of a batch::

    manifest ──> Shards (rows by global id) ──> Sampler (ids of a step) ──> Prefetcher ──> (x, y)
"""
