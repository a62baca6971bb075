"""The all-reduce cost model (bench model): its formulas, its fit, its projection."""
import json

from mpitrain.bench import model
from mpitrain.bench.model import Machine, fit, predict

M = Machine(alpha_node=0.0, beta_node=1e-9, alpha_link=1e-4, beta_link=1e-8, gamma=0.0)


def test_the_formulas_move_the_bytes_each_algorithm_must():
    n = 1 << 24
    # 2 nodes x 2 ranks: a flat ring puts 1.5 N through a node's link each way,
    # the hierarchical all-reduce N (what the emulated nodes' qdisc counters show).
    ring, hier = predict("ring", n, 4, 2, M), predict("hierarchical", n, 4, 2, M)
    assert abs(ring - (6 * 1e-4 + 1.5 * n * 1e-8)) < 1e-9
    assert abs(hier - (2 * 1e-4 + n * 1e-8 + 2 * 0.5 * n * 1e-9)) < 1e-9
    # Recursive doubling: one inter-node step, 2 ranks' N through the link at once.
    rd = predict("recursive_doubling", n, 4, 2, M)
    assert abs(rd - ((0 + n * 1e-9) + (1e-4 + 2 * n * 1e-8))) < 1e-9
    assert predict("ring", n, 1, 1, M) == 0.0


def test_fit_recovers_the_link_from_its_own_predictions(tmp_path):
    records = []
    for variant, name, algo in (("auto", "shm", "hierarchical"), ("auto", "ring", "ring")):
        for nbytes in (1 << 20, 1 << 22, 1 << 24):
            t = predict(algo, nbytes, 4, 2, M)
            records.append({"algorithm": name, "ranks": 4, "bytes": nbytes, "time_s": t})
    (tmp_path / "1gbit-2-auto.json").write_text(json.dumps(records))
    got = model._records([str(tmp_path / "1gbit-2-auto.json")])
    assert len(got) == 6
    mc = fit(got, base=M)
    assert abs(mc.beta_link / M.beta_link - 1) < 1e-6
    assert abs(mc.alpha_link / M.alpha_link - 1) < 1e-4


def test_projection_names_a_winner_and_a_share_of_the_step():
    rows = model.project(lambda gbit: Machine(beta_link=8 / (gbit * 1e9)), step_s=0.014)
    assert len(rows) == 9
    for r in rows:
        assert r["best"] in model.ALGORITHMS and 0 < r["share"] < 1
        assert r[r["best"]] == min(r[a] for a in model.ALGORITHMS)
