"""--reproducible: the same bits at 1, 2, 3 and 4 ranks, across algorithms, accumulation
and a resume at another rank count (real MPI jobs, each bounded in time)."""
import pytest

from conftest import clean_env, final, run_train, same_bits

ARGS = ["--hidden", "16,16", "--batch-size", "60", "--steps", "20", "--ckpt-every", "10",
        "--reproducible", "--log-every", "10"]


def trained(n, data, ckpt, *extra):
    result = run_train(n, "--data", data, "--ckpt-dir", str(ckpt), *ARGS, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith(("step 20/", "done:"))]
    return final(ckpt), lines[0].split("samples/s")[0] + lines[0].split("ETA")[-1][8:]


@pytest.mark.parametrize("extra", [("--optimizer", "sgd"),
                                   ("--optimizer", "adam", "--lr", "0.01", "--accumulate", "2"),
                                   ("--optimizer", "adam", "--lr", "0.01", "--dtype", "float64"),
                                   ("--optimizer", "momentum", "--dropout", "0.2",
                                    "--clip-grad-norm", "0.5", "--lr-schedule", "cosine"),
                                   # 540 rows: each epoch ends with a batch of 10, fewer
                                   # than 12 groups (empty groups, another leader)
                                   ("--optimizer", "sgd", "--batch-size", "53", "--groups",
                                    "12")])
def test_the_same_bits_at_one_to_four_ranks(small_data, tmp_path, extra):
    runs = [trained(n, small_data, tmp_path / str(n), *extra) for n in (1, 2, 3, 4)]
    first, line = runs[0]
    for n, (state, other) in zip((2, 3, 4), runs[1:]):
        assert same_bits(state, first), f"{n} ranks differ from 1"
        assert other == line, (n, other, line)  # the logged loss and validation metrics too


def test_the_same_bits_with_ring_and_mpi_and_without_accumulation(small_data, tmp_path):
    """MPI's sum of the terms, the ring, and shared memory (what auto takes on a node,
    sharded; with clipping, gathered for the norm)."""
    base, _ = trained(2, small_data, tmp_path / "mpi", "--allreduce", "mpi")
    ring, _ = trained(3, small_data, tmp_path / "ring", "--allreduce", "ring")
    acc, _ = trained(4, small_data, tmp_path / "acc", "--accumulate", "3", "--no-overlap")
    assert same_bits(base, ring) and same_bits(base, acc)
    said = run_train(3, "--data", small_data, "--ckpt-dir", str(tmp_path / "auto"), *ARGS)
    assert "allreduce auto: shm, because the 3 ranks share a node's memory (the fixed-order " \
           "sum adds from it)" in said.stdout, said.stdout + said.stderr
    many = run_train(3, "--data", small_data, "--ckpt-dir", str(tmp_path / "g12"), *ARGS,
                     "--groups", "12", "--steps", "2")
    assert "allreduce auto: mpi, because reproducible: 12 groups on 3 ranks leave a rank 3 " \
           "subtrees of the fixed-order sum" in many.stdout, many.stdout + many.stderr
    clip = ("--clip-grad-norm", "0.05", "--optimizer", "momentum")
    clipped = [trained(n, small_data, tmp_path / f"clip-{how}-{n}", *clip, "--allreduce", how)[0]
               for n, how in ((2, "mpi"), (2, "shm"), (4, "shm"))]
    assert same_bits(*clipped[:2]) and same_bits(*clipped[1:])


@pytest.mark.parametrize("extra, schedule", [
    (("--optimizer", "sgd"), "1f1b"),
    (("--optimizer", "adam", "--lr", "0.01", "--accumulate", "2"), "1f1b"),
    (("--optimizer", "momentum", "--dropout", "0.2", "--clip-grad-norm", "0.5"), "gpipe"),
    (("--optimizer", "sgd", "--batch-size", "53", "--groups", "12"), "1f1b")])  # short last
def test_the_same_bits_in_pipeline_layouts(small_data, tmp_path, extra, schedule):
    """One rank, 2 stages, 3 stages, 2 stages x 2 replicas: the pipeline's micro-batches
    are the fixed groups, each stage's parts added along the tree over its replicas."""
    first, line = trained(1, small_data, tmp_path / "one", *extra)
    for n, pp in ((2, 2), (3, 3), (4, 2)):
        state, other = trained(n, small_data, tmp_path / f"{n}-{pp}", "--pp", str(pp),
                               "--schedule", schedule, *extra)
        assert same_bits(state, first), f"{n} ranks in {pp} stages differ from 1 rank"
        assert other == line, (n, pp, other, line)


@pytest.mark.parametrize("before, after", [((2,), (3,)), ((4, "--pp", "2"), (3, "--pp", "3")),
                                           ((2, "--pp", "2"), (1,))])
def test_a_checkpoint_resumes_at_another_rank_count_bit_identically(small_data, tmp_path,
                                                                    before, after):
    reference, _ = trained(1, small_data, tmp_path / "one")
    half = [a if a != "20" else "10" for a in ARGS]
    r = run_train(before[0], "--data", small_data, "--ckpt-dir", str(tmp_path / "moved"),
                  *half, *before[1:])
    assert r.returncode == 0, r.stderr[-2000:]
    resumed, _ = trained(after[0], small_data, tmp_path / "moved", *after[1:])
    assert same_bits(resumed, reference)


def test_without_it_rank_counts_differ(small_data, tmp_path):
    """The test above can fail: without --reproducible, 1 and 3 ranks differ in bits."""
    plain = [a for a in ARGS if a != "--reproducible"]
    states = []
    for n in (1, 3):
        r = run_train(n, "--data", small_data, "--ckpt-dir", str(tmp_path / str(n)), *plain)
        assert r.returncode == 0, r.stderr[-2000:]
        states.append(final(tmp_path / str(n)))
    assert not same_bits(*states)


@pytest.mark.parametrize("n, args, message", [
    (4, ["--allreduce", "shm", "--pp", "2"], "--reproducible with --allreduce shm and --pp 2: "
     "a stage's fixed-order sum over its replicas runs on MPI"),
    (2, ["--grad-dtype", "bfloat16", "--allreduce", "ring"], "a 16-bit wire"),
    (4, ["--pp", "2", "--microbatches", "4"], "--reproducible with --microbatches 4: a "
     "pipeline's micro-batches are the fixed groups (set --groups)"),
    (4, ["--pp", "2", "--groups", "1"], "--groups 1 with 2 replicas (4 ranks / --pp 2)"),
    (3, ["--groups", "2"], "--groups 2 with 3 ranks"),
])
def test_reproducible_option_errors(small_data, tmp_path, n, args, message):
    result = run_train(n, "--data", small_data, "--ckpt-dir", str(tmp_path / "c"), *ARGS, *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr, result.stderr


def test_the_same_bits_whatever_the_blas_threads(tmp_path):
    """One rank alone gets all the node's cores as BLAS threads, two ranks one each; a
    product's bits depend on the thread count, so --reproducible computes at one BLAS
    thread (a pipeline too), and one rank's cores compute its groups and evaluation
    chunks at once (2,250 validation rows: 3 chunks)."""
    import json

    from mpitrain.data.prepare import synthetic

    data = tmp_path / "data"
    synthetic(str(data), samples=3000, features=12, classes=3, seed=1, shards=2,
              val_fraction=0.75)
    args = ["--hidden", "256,256", "--batch-size", "64", "--groups", "4", "--steps", "4",
            "--ckpt-every", "4", "--log-every", "4", "--reproducible", "--optimizer", "adam",
            "--lr", "0.01"]
    states, logged = [], []
    for n, threads, *more in ((1, "2", "--timeline", tmp_path / "t.json"), (2, "1"),
                              (2, "2", "--pp", "2")):
        env = {**clean_env(), "OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads}
        ckpt = tmp_path / f"{n}-{threads}-{len(more)}"
        r = run_train(n, "--data", data, "--ckpt-dir", str(ckpt), *args, *more, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        states.append(final(ckpt))
        line = next(ln for ln in r.stdout.splitlines() if ln.startswith("step 4/"))
        logged.append(line.split("samples/s")[0] + line.split("ETA")[-1][8:])  # val_ too
    assert same_bits(states[0], states[1]) and same_bits(states[0], states[2])
    assert logged[0] == logged[1] == logged[2] and "val_acc" in logged[0], logged
    events = json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name"}
    computing = {names[e["tid"]] for e in events if e["name"] == "forward"}
    assert computing == {"main", "groups_0"}, computing  # 2 cores: 2 threads of groups


def test_a_resume_with_other_groups_is_refused(small_data, tmp_path):
    """The groups decide the sum's order: a checkpoint of --groups 12 does not continue
    with the default 4 (it was the default once), and says what to set."""
    half = [a if a != "20" else "10" for a in ARGS]
    r = run_train(1, "--data", small_data, "--ckpt-dir", str(tmp_path / "c"), *half,
                  "--groups", "12")
    assert r.returncode == 0, r.stderr[-2000:]
    again = run_train(2, "--data", small_data, "--ckpt-dir", str(tmp_path / "c"), *ARGS)
    assert again.returncode == 2, again.stdout + again.stderr
    assert ("cannot resume: written with --reproducible in 12 --groups, this run has 4: the "
            "gradients would be summed otherwise (set --groups 12)") in again.stderr, again.stderr
