"""Configuration: defaults, TOML, flags, and errors naming their source (serial)."""
import pytest

from mpitrain.cli import parser as _parser
from mpitrain.config import Config, from_sources
from mpitrain.runtime import ConfigError, MpitrainError


def parse(*argv):
    return from_sources(_parser().parse_args(["train", *argv]))[0]


def test_defaults():
    cfg = parse()
    assert cfg == Config(hidden=[256, 256])
    assert cfg.total_steps(100) == 200  # 2 epochs


def test_toml_then_flags(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('hidden = [64, 32]\nlr = 1\nbatch-size = 64\noptimizer = "adam"\n'
                    'drop_last = true\nsteps = 30\n')
    cfg = parse("--config", str(path), "--lr", "0.5", "--no-drop-last")
    assert cfg.hidden == [64, 32] and cfg.batch_size == 64 and cfg.optimizer == "adam"
    assert cfg.lr == 0.5 and isinstance(cfg.lr, float) and cfg.drop_last is False
    assert cfg.total_steps(7) == 30
    assert parse("--hidden", "8,4,2", "--epochs", "3").total_steps(5) == 15


def test_a_way_to_move_an_overlapped_exchange_asks_for_overlap(tmp_path):
    """--progress, even as its default (thread), asks for overlap; the placement decides
    only when neither is given (None); --no-overlap with --progress is refused."""
    from mpi4py import MPI
    from mpitrain.comm.overlap import plan_overlap

    def overlap(cfg):  # the exchange's plan, one rank (the placement would say: no)
        return plan_overlap(MPI.COMM_SELF, cfg.overlap, cfg.bucket_mb, cfg.progress)

    assert parse().overlap is None and parse().bucket_mb is None
    assert overlap(parse()) == (False, 0.0, "thread")
    assert overlap(parse("--progress", "thread")) == (True, 2.0, "thread")
    path = tmp_path / "run.toml"
    path.write_text('progress = "none"\n')
    assert overlap(parse("--config", str(path))) == (True, 2.0, "none")
    assert overlap(parse("--bucket-mb", "4")) == (True, 4.0, "thread")
    assert parse("--no-overlap").overlap is False
    with pytest.raises(MpitrainError, match="--progress 'test' does not apply"):
        parse("--no-overlap", "--progress", "test")


@pytest.mark.parametrize("text,message", [
    ("colour = 1\n", "run.toml: unknown key 'colour' (known: "),
    ("lr = 'fast'\n", "run.toml: key 'lr' should be float, got 'fast'"),
    ("hidden = [1, 'a']\n", "run.toml: key 'hidden' should be List[int]"),
    ("batch_size = 0\n", "run.toml: key 'batch_size': expected a value > 0, got 0"),
    ("optimizer = 'lbfgs'\n", "run.toml: key 'optimizer': expected one of sgd, momentum, "
                              "adam, adamw, got 'lbfgs'"),
    ("lr = [\n", "run.toml: not valid TOML"),
])
def test_bad_toml(tmp_path, text, message):
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(MpitrainError) as info:
        parse("--config", str(path))
    assert message in str(info.value)


@pytest.mark.parametrize("argv,message", [
    (["--batch-size", "0"], "--batch-size: expected a value > 0, got 0"),
    (["--lr", "-1"], "--lr: expected a value > 0, got -1.0"),
    (["--steps", "0"], "--steps: expected a value >= 1, got 0"),
    (["--steps", "5", "--epochs", "1"], "give one of the two, not both (got 5 steps and 1 epochs)"),
    (["--hidden", "8,0"], "--hidden: expected one or more positive widths, got [8, 0]"),
    (["--momentum", "1.5"], "--momentum: expected a value in [0, 1), got 1.5"),
    (["--config", "/nonexistent.toml"], "/nonexistent.toml: no such config file"),
    (["--allreduce", "shm", "--progress", "test"],
     "--progress test drives MPI requests; --allreduce shm progresses on its own thread"),
    (["--allreduce", "shm", "--grad-dtype", "bfloat16"],
     "--grad-dtype bfloat16 needs --allreduce ring (got shm)"),
])
def test_bad_flags(argv, message):
    with pytest.raises(MpitrainError) as info:
        parse(*argv)
    assert message in str(info.value)


def test_argparse_rejects_unknown_flags_and_choices():
    """A usage error is an MpitrainError every rank raises alike: printed once, exit 2."""
    with pytest.raises(MpitrainError, match="unrecognized arguments: --colour red") as exc:
        _parser().parse_args(["train", "--colour", "red"])
    assert exc.value.everywhere and exc.value.code == 2
    with pytest.raises(MpitrainError, match="invalid choice: 'lbfgs'"):
        _parser().parse_args(["train", "--optimizer", "lbfgs"])


def test_a_resume_file_is_not_looked_for_by_every_rank(tmp_path):
    """Validation checks no file for --resume: rank 0 reads it, maybe from its own disk."""
    cfg = parse("--resume", str(tmp_path / "only-on-rank-0.h5"))
    assert cfg.resume.endswith("only-on-rank-0.h5")


@pytest.mark.parametrize("kwargs,message", [
    (dict(lr=-1), "lr: expected a value > 0, got -1"),
    (dict(optimizer="lbfgs"), "optimizer: expected one of sgd, momentum, adam, adamw, got 'lbfgs'"),
    (dict(watchdog=float("nan")), "watchdog: expected a finite number, got nan"),
    (dict(bucket_mb=float("inf")), "bucket_mb: expected a finite number, got inf"),
    (dict(seed=-1), "seed: expected a value >= 0, got -1"),
    (dict(batch_size="64"), "batch_size: expected a value of type int, got '64'"),
    (dict(allreduce="mpi", grad_dtype="bfloat16"), "grad_dtype bfloat16 needs allreduce ring"),
    (dict(on_failure="retry"), "on_failure: expected one of abort, shrink, respawn, got 'retry'"),
    (dict(on_failure="shrink", allreduce="shm"), "on_failure shrink with allreduce shm: not "
     "supported: a node's ranks share one copy of the parameters in an MPI window"),
    (dict(on_failure="shrink", pp=2, hidden=[8, 8]), "on_failure shrink with pp 2: not "
     "supported: the survivors no longer form pp stages of equal size"),
    (dict(max_failures=2), "max_failures 2 does not apply: it bounds the deaths a healing "
     "job survives; on_failure is abort"),
    (dict(on_failure="shrink", max_failures=0), "max_failures: expected a value >= 1, got 0"),
    (dict(fault="heal-kill:rank=1:healing=1"), "fault 'heal-kill:rank=1:healing=1' does not "
     "apply: it kills a rank during a healing; on_failure is abort"),
    (dict(on_failure="shrink", fault="join-hang:healing=1"), "fault 'join-hang:healing=1' "
     "does not apply: it hangs a replacement rank as it joins; on_failure is shrink"),
])
def test_a_config_built_in_code_is_validated_with_the_parameter_named(kwargs, message):
    with pytest.raises(ConfigError) as info:
        Config(**kwargs)
    assert message in str(info.value) and "--" not in str(info.value)


def test_a_config_cannot_be_changed_into_an_invalid_one():
    import dataclasses

    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = -1
    with pytest.raises(ConfigError, match="lr: expected a value > 0"):
        cfg.replace(lr=-1)
    assert cfg.replace(lr=0.5).lr == 0.5


@pytest.mark.parametrize("kwargs,message", [
    (dict(schedule="gpipe"), "schedule 'gpipe' does not apply: it orders a pipeline's "
                             "micro-batches; pp is 1"),
    (dict(microbatches=4), "microbatches 4 does not apply: it cuts a pipeline's batch, and pp "
                           "is 1: accumulate N computes each batch in N micro-batches without "
                           "a pipeline"),
    (dict(model="flatten,linear(10)", hidden=[64]),
     "hidden [64] does not apply: it shapes the default MLP, and model is given"),
    (dict(model="flatten,linear(10)", dropout=0.1), "dropout 0.1 does not apply"),
    (dict(lr_min=0.001), "lr_min 0.001 does not apply: it ends the cosine lr_schedule; this "
                         "run's is constant"),
    (dict(lr_schedule="cosine", lr_gamma=0.5), "lr_gamma 0.5 does not apply: it is the step "
                                               "lr_schedule's factor; this run's is cosine"),
    (dict(lr_step_every=10), "lr_step_every 10 does not apply"),
    (dict(monitor="val_accuracy"), "monitor 'val_accuracy' does not apply: it is what "
                                   "early_stop and best.h5 (with ckpt_dir) follow, and neither "
                                   "is asked for"),
    (dict(keep_best=False), "keep_best False does not apply: it keeps best.h5 in ckpt_dir"),
    (dict(stage_layers=[1, 1]), "stage_layers [1, 1] does not apply: it splits the model into "
                                "pipeline stages; pp is 1"),
    (dict(optimizer="adam", momentum=0.5), "momentum 0.5 does not apply: it is the momentum of "
                                           "optimizer momentum; this run's optimizer is adam"),
    (dict(keep_last=5), "keep_last 5 does not apply: it prunes checkpoints; no ckpt_dir is given"),
    (dict(sigterm_grace=5.0), "sigterm_grace 5.0 does not apply"),
    (dict(ckpt_every=10), "ckpt_every 10 does not apply: it spaces checkpoints"),
    (dict(pp=2, bucket_mb=4.0), "bucket_mb 4.0 does not apply: it applies to data parallelism "
                                "alone"),
    (dict(pp=2, microbatches=4, overlap=False), "overlap False does not apply"),
    (dict(overlap=False, progress="none"), "progress 'none' does not apply: it moves an "
                                           "overlapped exchange; overlap is off"),
])
def test_an_option_that_does_not_apply_is_refused_not_ignored(kwargs, message):
    with pytest.raises(ConfigError) as info:
        Config(**kwargs)
    assert message in str(info.value)


def test_options_that_apply_are_accepted():
    Config(pp=2, schedule="gpipe", stage_layers=[1, 2])
    Config(pp=2, microbatches=4, schedule="gpipe")
    Config(accumulate=4, clip_grad_norm=1.0)
    Config(lr_schedule="cosine", lr_min=0.001, warmup_steps=100)
    Config(lr_schedule="step", lr_gamma=0.5, lr_step_every=30)
    Config(early_stop=3, monitor="val_accuracy")  # early stopping follows it
    Config(ckpt_dir="ck", monitor="val_rmse")  # so does best.h5
    Config(model="conv2d(8,3),relu,flatten,linear(10)")
    Config(optimizer="adam", momentum=0.9)  # the default is not "given"
    Config(ckpt_dir="ck", keep_last=5, sigterm_grace=3.0, ckpt_every=7)
    Config(overlap=False, bucket_mb=0.0)


def test_the_command_line_names_flags_and_toml_keys(tmp_path):
    with pytest.raises(MpitrainError) as info:
        parse("--optimizer", "adam", "--momentum", "0.5")
    assert str(info.value).startswith("--momentum 0.5 does not apply: it is the momentum of "
                                      "--optimizer momentum; this run's --optimizer is adam")
    path = tmp_path / "run.toml"
    path.write_text("keep_last = 4\n")
    with pytest.raises(MpitrainError) as info:
        parse("--config", str(path))
    assert f"{path}: key 'keep_last' 4 does not apply: it prunes checkpoints; no --ckpt-dir" \
        in str(info.value)


@pytest.mark.parametrize("kwargs,message", [
    (dict(dropout=1.0), "dropout: expected a probability in [0, 1), got 1.0"),
    (dict(accumulate=0), "accumulate: expected a value >= 1, got 0"),
    (dict(clip_grad_norm=0.0), "clip_grad_norm: expected a value > 0, got 0.0"),
    (dict(early_stop=0), "early_stop: expected a value >= 1, got 0"),
    (dict(lr_schedule="cosine", lr_min=0.5, lr=0.1),
     "lr_min 0.5 is above lr 0.1: the cosine schedule falls from lr to lr_min"),
    (dict(early_stop=2, monitor="accuracy"), "monitor: expected a validation metric"),
    (dict(lr_schedule="linear"), "lr_schedule: expected one of constant, step, cosine"),
    (dict(model=" "), "model: expected a path or value"),
])
def test_training_recipe_options_are_checked(kwargs, message):
    with pytest.raises(ConfigError) as info:
        Config(**kwargs)
    assert message in str(info.value)


def test_a_flag_given_that_does_not_apply_is_refused_even_at_its_default():
    with pytest.raises(MpitrainError, match=r"^--momentum 0.9 does not apply"):
        parse("--optimizer", "adam", "--momentum", "0.9")
    with pytest.raises(MpitrainError, match=r"^--schedule '1f1b' does not apply"):
        parse("--schedule", "1f1b")
    Config(optimizer="adam", momentum=0.9)  # in code a default is not "given"


@pytest.mark.parametrize("key", ["data", "ckpt_dir", "run_dir", "log", "resume"])
def test_an_empty_path_is_refused(key):
    with pytest.raises(ConfigError, match=rf"{key}: expected a path or value"):
        Config(**{key: ""})


def test_a_drill_that_cannot_fire_is_refused():
    with pytest.raises(ConfigError, match="fault 'ckpt-kill:step=3' does not apply: it kills "
                                          "the writer of a checkpoint; no ckpt_dir is given"):
        Config(fault="ckpt-kill:step=3")
