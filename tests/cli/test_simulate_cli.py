"""``fedmeta simulate`` from the command line: a shorter run extended with --resume equals a longer
run, and bad input exits non-zero with a message and no traceback."""

import json

import numpy as np

from fedmeta.cli.main import main
from fedmeta.common import params as P

FAST = ["algorithm=reptile", "eval.adapt_steps=5", "tasks.meta_batch=4"]


def test_shorter_run_extended_with_resume_equals_longer_run(tmp_path, capsys):
    assert main(["simulate", "--backend", "local", "--set", "rounds=3", *FAST, "--out", str(tmp_path / "long")]) == 0
    assert main(["simulate", "--backend", "local", "--set", "rounds=2", *FAST, "--out", str(tmp_path / "short")]) == 0
    assert main(["simulate", "--backend", "local", "--resume", str(tmp_path / "short"), "--set", "rounds=3"]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "round 3/3" in out and "mean (sites)" in out
    a, _ = P.load(tmp_path / "long" / "final.safetensors")
    b, _ = P.load(tmp_path / "short" / "final.safetensors")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    summary = json.loads((tmp_path / "short" / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["config"]["rounds"] == 3


def test_bad_config_exits_2_without_traceback(tmp_path, capsys):
    bad = tmp_path / "exp.yaml"
    bad.write_text("rounds: 3\ninner:\n  lr: fast\n")
    assert main(["simulate", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: inner.lr = 'fast': expected float" in err and "Traceback" not in err
    assert main(["simulate", "--set", "data.sites=[Atlantis]"]) == 2
    assert "site 'Atlantis' is not in source 'fed-heart'" in capsys.readouterr().err
    assert main(["simulate", "--resume", str(tmp_path)]) == 2
    assert "not a fedmeta run folder" in capsys.readouterr().err
    # an explicitly named file that holds nothing is a mistake (no --config is the default run),
    # and so is one that is not a mapping; both refused before anything starts
    for text, says in (("", "the experiment file holds no settings"),
                       ("# all commented out\n", "the experiment file holds no settings"),
                       ("- reptile\n", "expected a mapping of settings, got list")):
        bad.write_text(text)
        assert main(["simulate", "--config", str(bad), "--out", str(tmp_path / "never")]) == 2
        assert says in capsys.readouterr().err
        assert not (tmp_path / "never").exists()
