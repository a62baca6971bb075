"""The ring all-reduce against MPI's Allreduce, at any world size.

Marked ``anysize``: it runs in the serial session (1 rank) and again under
mpiexec -n 2, 3 and 4 (tests/test_mpi_suite.py).  Checks are agreed by all
ranks before they are asserted, so a failure never leaves a rank waiting.
"""
import numpy as np
import pytest
from mpi4py import MPI

from conftest import agree
from mpitrain.comm.ring import RingAllreduce, bytes_sent, ring_allreduce

pytestmark = [pytest.mark.anysize, pytest.mark.timeout(120)]

COMM = MPI.COMM_WORLD
SIZES = [0, 1, 2, 3, 5, 7, 13, 97, 1000, 4097, 100003]


def implementations(comm):
    return {"textbook": lambda b: ring_allreduce(comm, b),
            "segmented": RingAllreduce(comm),
            "tiny-segments": RingAllreduce(comm, segment_bytes=24)}


def inputs(comm, n, dtype):
    rng = np.random.default_rng([comm.Get_rank(), n, 7])
    return rng.normal(size=n).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("impl", ["textbook", "segmented", "tiny-segments"])
def test_ring_equals_allreduce(impl, dtype):
    ring = implementations(COMM)[impl]
    size = COMM.Get_size()
    for n in SIZES:
        buf = inputs(COMM, n, dtype)
        expect = buf.copy()
        COMM.Allreduce(MPI.IN_PLACE, expect, op=MPI.SUM)
        address = buf.__array_interface__["data"][0]
        ring(buf)
        agree(COMM, buf.__array_interface__["data"][0] == address, "in place")
        if size <= 2:  # a + b is b + a: the same bits as MPI
            agree(COMM, np.array_equal(buf, expect), f"n={n}: bitwise equal to Allreduce")
        else:  # another association of the sum: equal to rounding
            tol = 1e-5 if dtype == np.float32 else 1e-13
            agree(COMM, np.allclose(buf, expect, rtol=tol, atol=tol * size),
                  f"n={n}: equal to Allreduce within rounding")
        agree(COMM, len(set(COMM.allgather(buf.tobytes()))) == 1, f"n={n}: same bits everywhere")


def test_same_inputs_same_bits_every_call():
    ring = RingAllreduce(COMM, segment_bytes=1000)
    results = []
    for _ in range(3):
        buf = inputs(COMM, 10007, np.float32)
        ring(buf)
        results.append(buf.tobytes())
    agree(COMM, len(set(results)) == 1, "repeated calls give the same bits")


def test_textbook_and_segmented_agree_bitwise():
    a = inputs(COMM, 50001, np.float64)
    b = a.copy()
    ring_allreduce(COMM, a)
    RingAllreduce(COMM, segment_bytes=4096)(b)
    agree(COMM, np.array_equal(a, b), "same association, same bits")


def test_sub_communicators():
    rank = COMM.Get_rank()
    sub = COMM.Split(color=rank % 2, key=rank)
    try:
        ring = RingAllreduce(sub, segment_bytes=512)
        buf = inputs(COMM, 3001, np.float64)
        expect = buf.copy()
        sub.Allreduce(MPI.IN_PLACE, expect, op=MPI.SUM)
        ring(buf)
        agree(COMM, np.allclose(buf, expect, rtol=1e-13), "ring on each half of the world")
    finally:
        sub.Free()


class CountingComm(MPI.Intracomm):
    """COMM_WORLD, counting the bytes this rank sends."""

    sent = 0

    def Isend(self, buf, dest, tag=0):
        self.sent += buf.nbytes
        return super().Isend(buf, dest, tag)

    def Sendrecv(self, sendbuf, dest, sendtag=0, recvbuf=None, source=MPI.ANY_SOURCE,
                 recvtag=MPI.ANY_TAG, status=None):
        self.sent += sendbuf.nbytes
        return super().Sendrecv(sendbuf, dest, sendtag, recvbuf, source, recvtag, status)


@pytest.mark.parametrize("n", [1, 7, 1000, 65537])
def test_each_rank_sends_2_p_minus_1_over_p_of_the_buffer(n):
    comm = CountingComm(COMM)
    size, rank = comm.Get_size(), comm.Get_rank()
    for ring in (lambda b: ring_allreduce(comm, b), RingAllreduce(comm, segment_bytes=100)):
        comm.sent = 0
        ring(inputs(comm, n, np.float32))
        expect = bytes_sent(n, 4, rank, size)
        agree(comm, comm.sent == expect, f"sent {comm.sent} bytes, expected {expect}")
        # At most 2 (p - 1) / p of the buffer, up to one item of rounding per chunk.
        agree(comm, comm.sent <= 2 * (size - 1) / size * 4 * n + 8, "bandwidth-optimal")


@pytest.mark.parametrize("make,error,message", [
    (lambda: np.zeros(10, np.float32)[::2], ValueError, "needs a contiguous 1-D buffer"),
    (lambda: np.zeros((2, 3), np.float32), ValueError, "needs a contiguous 1-D buffer"),
    (lambda: np.zeros(10, np.int32), TypeError, "needs float32 or float64, got int32"),
    (lambda: [1.0, 2.0], TypeError, "needs a numpy array, got list"),
    (lambda: _readonly(), ValueError, "needs a writeable buffer"),
])
def test_bad_buffers_are_refused_before_any_message(make, error, message):
    comm = CountingComm(COMM)
    for ring in (lambda b: ring_allreduce(comm, b), RingAllreduce(comm)):
        with pytest.raises(error, match=message):
            ring(make())
    agree(COMM, comm.sent == 0, f"refused before sending: sent {comm.sent} bytes")


def _readonly():
    a = np.zeros(4)
    a.flags.writeable = False
    return a


def test_bfloat16_codec_rounds_to_nearest_even():
    pytest.importorskip("ml_dtypes", reason="the bfloat16 wire needs ml_dtypes")
    from mpitrain.comm.codecs import codec

    encode, decode = codec("bfloat16").encode, codec("bfloat16").decode
    x = np.array([1.0, -2.0, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 3.0e38, 1e-40], np.float32)
    w = encode(x)
    assert w[0] == 0x3F80 and w[1] == 0xC000
    assert decode(w)[2] == 1.0  # halfway: ties to the even neighbour
    assert decode(w)[3] == 1 + 2 ** -6  # halfway between 1+2^-7 and 1+2^-6: even is 1+2^-6
    np.testing.assert_allclose(decode(w)[:2], x[:2])
    np.testing.assert_allclose(decode(encode(np.linspace(-5, 5, 101, dtype=np.float32))),
                               np.linspace(-5, 5, 101), rtol=2 ** -8)


@pytest.mark.parametrize("wire,rtol", [("float16", 2e-3), ("bfloat16", 1.6e-2)])
def test_16_bit_wire_sends_half_the_bytes_and_adds_in_full_precision(wire, rtol):
    comm = CountingComm(COMM)
    size = comm.Get_size()
    n = 30011
    buf = inputs(comm, n, np.float32)
    expect = buf.copy()
    comm.Allreduce(MPI.IN_PLACE, expect, op=MPI.SUM)
    comm.sent = 0
    RingAllreduce(comm, segment_bytes=4096, wire=wire)(buf)
    agree(comm, comm.sent == bytes_sent(n, 2, comm.Get_rank(), size), "16 bits per value")
    # Each hop rounds a partial sum to 16 bits; the sum itself is taken in float32.
    scale = np.abs(expect).max()
    agree(comm, np.allclose(buf, expect, rtol=rtol * size, atol=rtol * size * scale / 10),
          "close to the exact sum")
    agree(comm, len(set(comm.allgather(buf.tobytes()))) == 1, "same bits on every rank")
    if size == 1:
        agree(comm, np.array_equal(buf, expect), "one rank: untouched")


def test_bucket_plan():
    from mpitrain.comm.exchange import plan_buckets

    assert plan_buckets(416, 0, 4) == [(0, 416)]
    assert plan_buckets(416, 1e9, 4) == [(0, 416)]
    # From the end (where backward starts), 250 items each, the last one shorter.
    assert plan_buckets(1000, 1000, 4) == [(750, 1000), (500, 750), (250, 500), (0, 250)]
    assert plan_buckets(1001, 1000, 4) == [(751, 1001), (501, 751), (251, 501), (1, 251),
                                           (0, 1)]
