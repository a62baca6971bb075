"""The Python API a user's own model, data and loop meet (serial, one process):
registered layers and their text, the gradient checker, datasets of arrays, the checks
fit and the trainers make before step 1."""
import numpy as np
import pytest
from mpi4py import MPI

import mpitrain
from mpitrain import ArrayDataset, Linear, Sequential
from mpitrain.model.gradcheck import GradientCheckError, check_layer
from mpitrain.model.registry import register_layer, registered
from mpitrain.model.spec import build, canonical
from mpitrain.runtime import ConfigError, MpitrainError

SELF = MPI.COMM_SELF


@register_layer("shift")
class Shift(mpitrain.Layer):
    """y = x + offset * b (a test layer with a keyword argument)."""

    def __init__(self, features: int, offset: float = 1.0, tag: str = "t", on: bool = True):
        self.features, self.offset = features, offset

    def shapes(self):
        return {"b": (self.features,)}

    def bind(self, params, grads):
        self.b, self.gb = params["b"], grads["b"]

    def init(self, params, rng):
        params["b"][...] = rng.normal(size=self.features)

    def out_shape(self, shape):
        if shape != (self.features,):
            raise ValueError(f"takes {self.features} features, got {shape}")
        return shape

    def forward(self, x, ctx=None):
        return x + self.offset * self.b, None

    def backward(self, dy, saved, need_dx=True, accumulate=False):
        g = self.offset * dy.sum(axis=0)
        if accumulate:
            self.gb += g
        else:
            self.gb[...] = g
        return dy if need_dx else None


def test_built_in_layers_write_the_text_that_rebuilds_them():
    text = ("conv2d(4,3,padding=1),relu,maxpool2d(2),avgpool2d(3,stride=1),flatten,"
            "layernorm(eps=0.001),linear(16),gelu,dropout(0.25),"
            "residual(layernorm,linear(16),silu),linear(3)")
    layers = build(text, (2, 8, 8), 3)
    model = Sequential(layers)
    assert model.text() == canonical(text) == text
    again = Sequential(build(model.text(), (2, 8, 8), 3))
    assert repr(again) == repr(model)
    assert np.array_equal(again.params, model.params)  # (seed, index): the same values


def test_a_registered_layer_writes_its_constructor_arguments():
    model = Sequential([Shift(4, offset=0.5, tag="a b", on=False), Linear(4, 2)], seed=1)
    assert model.text() == "shift(4,offset=0.5,tag='a b',on=false),linear(2)"
    again = Sequential(build(model.text(), (4,), 2), seed=1)
    assert isinstance(again.layers[0], Shift) and again.layers[0].offset == 0.5
    assert np.array_equal(again.params, model.params)
    assert registered("shift") is Shift


def test_register_layer_refuses_bad_and_taken_names():
    with pytest.raises(ValueError, match="lower-case letters"):
        register_layer("Shift")
    with pytest.raises(ValueError, match="'linear' is a built-in layer's name"):
        register_layer("linear")

    class Other(mpitrain.Layer):
        pass

    with pytest.raises(ValueError, match="'shift' is taken by test_api.Shift"):
        register_layer("shift")(Other)
    assert register_layer("shift")(Shift) is Shift  # the same class again: a re-import


def test_an_unregistered_layer_has_no_text_and_says_so():
    class Plain(mpitrain.Layer):
        def forward(self, x, ctx=None):
            return x, None

    model = Sequential([Plain(), Linear(4, 2)])
    assert model.text() is None
    assert "layer 0 (Plain): test_api" in model.unwritable()
    assert "is not registered (decorate it with @mpitrain.register_layer(NAME))" in \
        model.unwritable()


class Wrong(mpitrain.Layer):
    """A layer whose backward pass is off by a factor, or forgets to add (or adds in
    pieces, which rounds otherwise), or keeps its input in itself: what check_layer must
    catch."""

    def __init__(self, fault: str):
        self.fault = fault

    def shapes(self):
        return {"w": (3,)}

    def bind(self, params, grads):
        self.w, self.gw = params["w"], grads["w"]

    def init(self, params, rng):
        params["w"][...] = rng.normal(size=3)

    def forward(self, x, ctx=None):
        self.kept = x
        return x * self.w, x

    def backward(self, dy, saved, need_dx=True, accumulate=False):
        x = self.kept if self.fault == "keeps" else saved
        g = (dy * x).sum(axis=0)
        if accumulate and self.fault == "in-rows":  # right to a rounding: one add per row
            for row in dy * x:
                self.gw += row
        elif accumulate and self.fault != "overwrites":
            self.gw += g
        else:
            self.gw[...] = g
        factor = 2.0 if self.fault == "factor" else 1.0
        return dy * self.w * factor if need_dx else None


@pytest.mark.parametrize("fault,message", [
    ("factor", "dL/dx: backward gives"),
    ("overwrites", "backward with accumulate=True does not add"),
    ("keeps", "forward keeps something of the batch in the layer"),
    ("in-rows", "adds this batch's gradients in more than one addition"),
])
def test_check_layer_finds_what_is_wrong(fault, message):
    with pytest.raises(GradientCheckError, match=message):
        check_layer(Wrong(fault), (3,))
    check_layer(Wrong("none"), (3,))  # the same layer, right
    if fault == "in-rows":  # right to a rounding, which is all a run without reproducible needs
        check_layer(Wrong(fault), (3,), exact_accumulate=False)


def test_check_layer_checks_out_shape():
    class Liar(Wrong):
        def out_shape(self, shape):
            return (4,)

    with pytest.raises(GradientCheckError, match=r"forward gives samples of shape \(3,\), "
                                                 r"out_shape says \(4,\)"):
        check_layer(Liar("none"), (3,))


def connect(dataset):
    return dataset.connect(SELF)


def test_array_datasets_read_their_task_from_the_targets():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5)).astype(np.float32)
    labels = connect(ArrayDataset(x, rng.integers(0, 4, 200)))
    assert labels.task == {"name": "classification", "classes": 4}
    values = connect(ArrayDataset(x, rng.normal(3.0, 2.0, (200, 2))))
    assert values.task["name"] == "regression" and values.task["shape"] == [2]
    assert np.allclose(values.task["mean"], 3.0, atol=0.5)
    flags = connect(ArrayDataset(x, rng.integers(0, 2, (200, 3)), task="multilabel"))
    assert flags.task == {"name": "multilabel", "shape": [3]}
    assert connect(ArrayDataset(x, rng.integers(0, 4, 200), classes=6)).task["classes"] == 6


def test_array_datasets_refuse_what_cannot_train():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5)).astype(np.float32)
    y = np.zeros(200, np.int64)
    y[:100] = 1
    stray = y.copy()
    stray[7] = 1000
    with pytest.raises(ConfigError, match="y: labels up to 1,000 make 1,001 classes, and only 3 "
                                          "distinct labels occur"):
        connect(ArrayDataset(x, stray))
    assert connect(ArrayDataset(x, stray, classes=1001)).task["classes"] == 1001
    with pytest.raises(ConfigError, match="x has 200 samples, y has 199"):
        connect(ArrayDataset(x, y[:199]))
    bad = x.copy()
    bad[17, 2] = np.nan
    with pytest.raises(ConfigError, match="NaN or inf in x at row 17"):
        connect(ArrayDataset(bad, y))
    with pytest.raises(ConfigError, match=r"val: a sample's shape is \(4,\), the training "
                                          r"arrays' \(5,\)"):
        connect(ArrayDataset(x, y, val=(x[:10, :4], y[:10])))
    with pytest.raises(ConfigError, match="val and val_fraction: give one of the two"):
        ArrayDataset(x, y, val=(x, y), val_fraction=0.1)
    with pytest.raises(MpitrainError, match="negative label -1 at row 3"):
        connect(ArrayDataset(x, np.where(np.arange(200) == 3, -1, y)))


def test_array_dataset_splits_as_prepare_splits(tmp_path):
    """The same validation rows, in the same order, as prepare --val-fraction."""
    from mpitrain.data.datasets import DirectoryDataset
    from mpitrain.data.prepare import from_npz

    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(700, 3)).astype(np.float32), rng.integers(0, 3, 700)
    np.savez(tmp_path / "a.npz", x=x, y=y)
    from_npz(str(tmp_path / "a.npz"), str(tmp_path / "d"), shards=2, val_fraction=0.3, seed=4)
    arrays = connect(ArrayDataset(x, y, val_fraction=0.3, seed=4))
    directory = connect(DirectoryDataset(str(tmp_path / "d")))
    for split in ("train", "val"):
        a, d = getattr(arrays, split), getattr(directory, split)
        assert len(a) == len(d)
        ids = np.arange(len(a))
        for got, want in zip(a.read(ids), d.read(ids)):
            assert np.array_equal(got, want)


def small_model(features=5, classes=3, **kw):
    return Sequential([Linear(features, 8), mpitrain.ReLU(), Linear(8, classes)], **kw)


@pytest.mark.parametrize("key,value,message", [
    ("hidden", [8], "hidden does not apply to fit: it shapes the default MLP"),
    ("activation", "tanh", "activation does not apply to fit: it shapes the default MLP"),
    ("dtype", "float64", "dtype float64 does not apply: the model's parameters are float32"),
    ("lr", -1, "lr: expected a value > 0, got -1"),
    ("momentum", 0.5, "momentum 0.5 does not apply: it is the momentum of optimizer "
                      "momentum; this run's optimizer is adam"),
])
def test_fit_checks_its_options_as_the_command_line_does(key, value, message):
    x, y = np.zeros((20, 5), np.float32), np.arange(20) % 3
    options = {"optimizer": "adam", key: value} if key == "momentum" else {key: value}
    with pytest.raises(ConfigError, match=message):
        mpitrain.fit(small_model(), ArrayDataset(x, y), comm=SELF, **options)


@pytest.mark.parametrize("model,message", [
    (Sequential([Linear(8, 4), mpitrain.ReLU(), Linear(4, 3)]),
     r"model: layer 0 Linear\(8, 4\) takes 8 features per sample, got shape \(5,\)"),
    (Sequential([Linear(5, 4), mpitrain.ReLU(), Linear(6, 3)]),
     r"model: layer 2 Linear\(6, 3\) takes 6 features per sample, got shape \(4,\)"),
    (Sequential([Linear(5, 7)]),
     r"model: it ends in samples of shape \(7,\), and the task needs \(3,\)"),
])
def test_the_trainer_checks_the_model_against_the_data_and_the_task(model, message):
    x, y = np.zeros((20, 5), np.float32), np.arange(20) % 3
    with pytest.raises(MpitrainError, match=message):
        mpitrain.Trainer(model, None, mpitrain.Adam(), ArrayDataset(x, y), SELF, batch_size=4)


def test_fit_trains_in_place_and_returns_the_model_and_the_summary(capsys):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0)
    model = small_model(seed=4)
    before = model.params.copy()
    result = mpitrain.fit(model, ArrayDataset(x, y, val_fraction=0.2), comm=SELF, epochs=20,
                          batch_size=32, optimizer="adam", lr=0.01, quiet=True)
    trained, summary = result
    assert trained is model and result.model is model and result.comm is SELF
    assert not np.array_equal(before, model.params)
    assert summary["val_accuracy"] > 0.8 and summary["end_step"] == 20 * 8
    assert "done: steps 1-160" in capsys.readouterr().out


def test_optimizers_are_made_with_their_hyper_parameters_and_attached():
    opt = mpitrain.Adam(lr=0.01, weight_decay=0.1)
    with pytest.raises(ValueError, match="not attached to any parameters"):
        opt.step()
    p, g = np.ones(4, np.float32), np.full(4, 0.5, np.float32)
    opt.attach(p, g).step()
    assert opt.steps == 1 and not np.array_equal(p, np.ones(4))
    twin = opt.like()
    assert type(twin) is mpitrain.Adam and twin.hyper() == opt.hyper() and twin.steps == 0
    with pytest.raises(ValueError, match="cannot move to 5"):
        opt.attach(np.ones(5, np.float32), np.ones(5, np.float32))
    with pytest.raises(ValueError, match="learning rate must be > 0"):
        mpitrain.SGD(lr=0)
