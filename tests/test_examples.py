"""The README's main job runs and does what it says."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "examples"))

import logistic_l2


def test_logistic_l2_example_improves_validation_loss(capsys):
    results = logistic_l2.main(["--steps", "400", "--horizon", "20"])
    out = capsys.readouterr().out
    assert "validation loss" in out and "cosine" in out
    assert results["val_loss_after"] < results["val_loss_before"]
    assert -1.0 <= results["cosine_at_step_100"] <= 1.0
    assert results["cosine_at_step_100"] > 0.5  # early on, One-Step points the right way
