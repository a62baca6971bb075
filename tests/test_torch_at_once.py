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
    plan.set_places(places)
    torch.autograd.backward([loss(part, lo, hi) for part, (lo, hi)
                             in zip(out.split(list(np.diff(cuts))), zip(cuts, cuts[1:]))])
    plan.zero_unreached(params)
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
    assert AtOnce(net, params, offsets).check(list(np.diff(cuts)), [x], loss,
                                              lambda g: None) == alike
    assert all(np.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(expect, got))


def test_a_model_whose_rows_depend_on_each_other_goes_group_by_group():
    net = Branchy([MinusMean()])
    params, offsets = flat_layout(net)
    run = AtOnce(net, params, offsets)
    assert run.known(SIZES) is None  # not checked yet
    assert not run.check(SIZES, [data()], loss, lambda g: None)
    assert run.known(SIZES) is False and run.known(SIZES[:1]) is False  # one group: alone


def test_a_shape_is_checked_once_and_an_input_of_other_rank_is_refused():
    net = Branchy()
    params, offsets = flat_layout(net)
    run = AtOnce(net, params, offsets)
    alike = run.check(SIZES, [data()], loss, lambda g: None)
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
    assert not run.check(SIZES, [data()], loss, lambda g: None)


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


class Draws(torch.nn.Module):
    """Noise of its own in forward (no dropout module): the groups' draws differ."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(12, 5)

    def forward(self, x):
        return self.layer(x + 0.1 * torch.randn_like(x))


def test_random_draws_a_parameters_own_use_and_errors_go_group_by_group():
    net = Draws()
    params, offsets = flat_layout(net)
    run = AtOnce(net, params, offsets)
    assert run.forward(data(), CUTS)[1].unfit
    assert not run.check(SIZES, [data()], loss, lambda g: torch.manual_seed(g))
    net = Branchy()  # a loss that reads a weight itself (decay): autograd's own gradient
    params, offsets = flat_layout(net)
    decayed = lambda out, lo, hi: loss(out, lo, hi) + net.head.weight.square().sum()  # noqa
    assert not AtOnce(net, params, offsets).check(SIZES, [data()], decayed, lambda g: None)
    assert all(p.grad is None for p in params)  # .grad as it was

    def fails(out, lo, hi):
        raise ValueError("a loss that raises")
    assert not AtOnce(net, params, offsets).check(SIZES, [data()], fails, lambda g: None)
    assert "forward" not in vars(net.head) and "forward" not in vars(net.body[0])


def test_hooks_and_a_forward_of_ones_own_are_left_alone():
    net = Branchy()
    net.head.weight.register_hook(lambda g: g.clamp(-1, 1))
    assert linear_modules(net, flat_layout(net)[0]) is None
    net = Branchy()
    net.head.register_full_backward_hook(lambda module, dx, dy: None)
    assert linear_modules(net, flat_layout(net)[0]) is None
    net = Branchy()
    net.head.forward = lambda x: torch.nn.functional.linear(x, net.head.weight)
    assert linear_modules(net, flat_layout(net)[0]) is None
    plain = Branchy()
    assert linear_modules(plain, flat_layout(plain)[0]) is not None


def trained(monkeypatch, at_once):
    """Branchy (Linear layers, an unused one) trained 3 steps, reproducible in 4 groups of
    12 rows on one rank: (its parameters, the run shapes the check found alike)."""
    from mpi4py import MPI

    import mpitrain
    import mpitrain.torch as mt
    from torch_models import arrays, model

    monkeypatch.setenv("MPITRAIN_GROUPS_AT_ONCE", at_once)
    net, (x, y) = model("branchy"), arrays()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    trainer = mt.TorchTrainer(net, torch.nn.functional.cross_entropy, opt,
                              mpitrain.ArrayDataset(x, y), MPI.COMM_SELF, batch_size=48,
                              seed=0, groups=4)
    losses = [trainer.step(k)[0] for k in range(3)]
    return [p.detach().clone() for p in net.parameters()], trainer.grouped.at_once.shapes, \
        losses


def test_the_trainer_computes_a_ranks_groups_at_once_with_the_bits_of_one_by_one(
        monkeypatch):
    """The trainer's own path (its OrderedSum places, rows, seeds): with the groups at once
    (the check finds 4 groups of 12 rows alike here: one thread, torch's CPU products)
    the parameters and losses have the bits of the groups one by one."""
    params, shapes, losses = trained(monkeypatch, "1")
    assert shapes == {(12, 12, 12, 12): True}, "the check found the run's rows unlike"
    plain, none, plain_losses = trained(monkeypatch, "0")
    assert none == {} and losses == plain_losses
    assert all(_bits(a) == _bits(b) for a, b in zip(params, plain))


def _bits(t):
    return t.numpy().tobytes()
