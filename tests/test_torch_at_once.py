"""A run of groups through a torch model at once (mpitrain.torch.at_once): each group's
gradients have the bits autograd gives the group alone, placed (copied or added) as the
fixed-order sum asks; a model whose rows depend on each other is found by the check and
given the groups one by one; models with other parameters, buffers or dropout are left
alone."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mpitrain.torch.at_once import AtOnce, linear_modules  # noqa: E402

CUTS = [0, 8, 20, 24, 32]  # a run of 4 groups of 8, 12, 4 and 8 rows
SIZES = [b - a for a, b in zip(CUTS, CUTS[1:])]
# (copy, add, copy, add): groups 0+1 in one buffer, 2+3 in another, as the tree places them
ADDS = [False, True, False, True]


@pytest.fixture(autouse=True)
def one_thread():
    """As the trainer computes the groups (``torch.reproducible.deterministic``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class MinusMean(torch.nn.Module):
    """Subtracts the batch's mean of each unit: every row depends on the others."""

    def forward(self, x):
        return x - x.mean(dim=0)


class Branchy(torch.nn.Module):
    """Linear layers, one of them never used (its parameters get no gradient)."""

    def __init__(self, middle=()):
        super().__init__()
        torch.manual_seed(3)
        self.body = torch.nn.Sequential(torch.nn.Linear(12, 24), *middle, torch.nn.Tanh(),
                                        torch.nn.Linear(24, 24, bias=False), torch.nn.ReLU())
        self.unused = torch.nn.Linear(24, 24)
        self.head = torch.nn.Linear(24, 5)

    def forward(self, x):
        return self.head(self.body(x))


def flat_layout(net):
    params = [p for p in net.parameters() if p.requires_grad]
    offsets = np.concatenate([[0], np.cumsum([p.numel() for p in params])]).tolist()
    return params, offsets


def loss(out, lo, hi):
    target = torch.arange(lo, hi) % 5
    return torch.nn.functional.cross_entropy(out, target) * ((hi - lo) / 32)


def data():
    return torch.from_numpy(np.random.default_rng(1).standard_normal((32, 12)).astype(
        np.float32))


def group_by_group(net, x, cuts=CUTS):
    """The reference: each group alone through autograd, its gradient copied into a new
    buffer or added into the one before, as the trainer places them."""
    params, offsets = flat_layout(net)
    buffers = []
    for (lo, hi), add in zip(zip(cuts, cuts[1:]), ADDS):
        if not add:
            buffers.append(np.zeros(offsets[-1], np.float32))
        grads = torch.autograd.grad(loss(net(x[lo:hi]), lo, hi), params, allow_unused=True)
        into = torch.from_numpy(buffers[-1])
        for p, d, a, b in zip(params, grads, offsets, offsets[1:]):
            d = torch.zeros_like(p) if d is None else d
            view = into[a:b].view_as(p)
            view.add_(d) if add else view.copy_(d)
    return buffers


def at_once(net, x, cuts=CUTS):
    params, offsets = flat_layout(net)
    run = AtOnce(net, params, offsets)
    buffers = [np.full(offsets[-1], np.nan, np.float32) for _ in range(2)]
    places = [(buffers[g // 2], add) for g, add in enumerate(ADDS)]
    out, plan = run.forward(x, cuts)
    assert not plan.unfit
    plan.at(places)
    torch.autograd.backward([loss(part, lo, hi) for part, (lo, hi)
                             in zip(out.split(list(np.diff(cuts))), zip(cuts, cuts[1:]))])
    plan.settle(params)
    return buffers


@pytest.mark.parametrize("cuts", [CUTS, [0, 7, 19, 20, 32]])  # 1 row: a product of its own
def test_the_check_says_whether_each_group_keeps_the_bits_it_has_alone(cuts):
    """Where the check finds a shape alike, every group's gradients have the bits
    autograd gives them alone, placed as asked (the unused layer's: zeros); where the
    bits differ (a kernel chosen by the number of rows), the check says so."""
    net, x = Branchy(), data()
    expect, got = group_by_group(net, x, cuts), at_once(net, x, cuts)
    alike = all(a.tobytes() == b.tobytes() for a, b in zip(expect, got))
    assert all(p.grad is None for p in net.parameters())  # placed, not accumulated
    params, offsets = flat_layout(net)
    assert AtOnce(net, params, offsets).check(list(np.diff(cuts)), x, loss,
                                              lambda g: None) == alike
    assert all(np.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(expect, got))


def test_a_model_whose_rows_depend_on_each_other_goes_group_by_group():
    net = Branchy([MinusMean()])
    params, offsets = flat_layout(net)
    run = AtOnce(net, params, offsets)
    assert run.known(SIZES) is None  # not checked yet
    assert not run.check(SIZES, data(), loss, lambda g: None)
    assert run.known(SIZES) is False and run.known(SIZES[:1]) is False  # one group: alone


def test_a_shape_is_checked_once_and_an_input_of_other_rank_is_refused():
    net = Branchy()
    params, offsets = flat_layout(net)
    run = AtOnce(net, params, offsets)
    alike = run.check(SIZES, data(), loss, lambda g: None)
    assert run.known(SIZES) is alike and run.known([16, 16]) is None
    seq = torch.from_numpy(np.ones((32, 2, 12), np.float32))  # (rows, tokens, features)
    out, plan = run.forward(seq, CUTS)
    assert plan.unfit and out.shape == (32, 2, 5)
    assert "forward" not in vars(net.head)  # the module's own forward again


class Twice(torch.nn.Module):
    """One Linear applied twice: autograd adds its two gradients, so it goes alone."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(12, 12)

    def forward(self, x):
        return self.layer(torch.tanh(self.layer(x)))


def test_a_linear_called_twice_goes_group_by_group():
    net = Twice()
    params, offsets = flat_layout(net)
    run = AtOnce(net, params, offsets)
    out, plan = run.forward(data(), CUTS)
    assert plan.unfit and out.shape == (32, 12)
    assert not run.check(SIZES, data(), loss, lambda g: None)


@pytest.mark.parametrize("make", [
    lambda: torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.1)),
    lambda: torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)),
    lambda: torch.nn.Sequential(torch.nn.Conv1d(1, 1, 3), torch.nn.Flatten()),
    lambda: torch.nn.Sequential(type("Mine", (torch.nn.Linear,), {})(4, 4)),
])
def test_other_parameters_buffers_and_dropout_are_left_alone(make, monkeypatch):
    net = make()
    params, offsets = flat_layout(net)
    assert linear_modules(net, params) is None
    assert AtOnce(net, params, offsets).known([2, 2]) is False
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.0))  # p = 0: kept
    assert linear_modules(plain, flat_layout(plain)[0]) is not None
    monkeypatch.setenv("MPITRAIN_GROUPS_AT_ONCE", "0")
    assert AtOnce(plain, *flat_layout(plain)).known([2, 2]) is False
