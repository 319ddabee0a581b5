"""A run whose training loss has not fallen 2% below its first step's by the end of its first
epoch says so in one warning line naming its learning rate; a run that learns says nothing."""

from types import SimpleNamespace

from experiments import cifar, config as cfg, train


def test_the_warning_fires_only_for_a_loss_that_has_not_fallen(capsys):
    setup = SimpleNamespace(config=cfg.Config(method="cpsgd", lr=0.1))
    train.warn_if_stuck(setup, [2.30, 2.31, 2.29, 2.28, 2.27, 2.26])  # second half 2.27: 1.3% below the start
    train.warn_if_stuck(setup, [2.30, 2.40, 2.45, 2.50])  # above it
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all(line.startswith("warning: cpsgd seed 0: the training loss of epoch 1 (")
                                   and line.endswith("its learning rate is 0.1 (--lr)") for line in lines)
    train.warn_if_stuck(setup, [2.30, 2.00, 1.80, 1.60])  # learning
    assert capsys.readouterr().err == ""


def test_a_run_that_does_not_learn_warns_once_and_one_that_learns_does_not(tmp_path, capsys):
    argv = ["--dataset", "digits", "--epochs", "1", "--compare", "cpsgd", "--quiet", "--no-plots"]
    assert cifar.main(argv + ["--lr", "1e-6", "--out", str(tmp_path / "stuck")]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: cpsgd seed 0: the training loss of epoch 1") == 1 and "rate is 1e-06 (--lr)" in err
    assert cifar.main(argv + ["--out", str(tmp_path / "learns")]) == 0
    assert "warning" not in capsys.readouterr().err
