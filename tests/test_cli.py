"""The ``gradhpo`` command: every bench in --quick mode, the demo, bad input, the data."""

import gzip
import pathlib
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradhpo_bench.cleaning import make_task
from gradhpo_bench.cli import BENCHES, main
from gradhpo_bench.data import cleaning_split, digits, read_idx, write_idx
from gradhpo_bench.loop import train
from gradhpo_bench.methods import METHODS, Settings, build
from gradhpo_bench.metrics import auroc
from gradhpo_bench.models import convnet
from gradhpo_bench.report import parse_markdown_tables

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(argv):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return main(argv)


def _check_outputs(out: pathlib.Path, stem: str) -> list[list[dict[str, str]]]:
    """The report exists, holds parseable tables with a provenance line; the PNG is a PNG."""
    md, png = out / f"{stem}.md", out / f"{stem}.png"
    assert md.is_file() and png.is_file()
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000
    text = md.read_text()
    assert "Command: `gradhpo " in text and "Versions: gradhpo" in text
    tables = parse_markdown_tables(text)
    assert tables and all(tables)
    return tables


def _number(cell: str) -> float:
    return float(cell.split(" ")[0].strip("(),%+"))


# -- every bench, quick ------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BENCHES))
def test_bench_quick_writes_a_report_and_a_plot(name, tmp_path, capsys):
    assert _run(["bench", name, "--quick", "--out", str(tmp_path), "--seed", "1"]) == 0
    stem = "cleaning" if name == "cleaning" else name
    tables = _check_outputs(tmp_path, stem)
    printed = capsys.readouterr().out
    assert "wrote" in printed and f"{stem}.md" in printed
    rows = [row for table in tables for row in table]
    labels = {row.get("method", row.get("estimator", row.get("search"))) for row in rows}
    if name == "cleaning":
        assert {"no tuning", "Greedy", "HyperDistill", "exact (reverse mode)"} <= labels
    if name == "metalearning":  # App. G's methods, the paper's numbers and the stability
        assert {"FO", "One-Step", "DrMAD (offline)", "N.IFT(3, 5)", "HyperDistill"} <= labels
        main_rows = [row for row in tables[0] if row["method"] == "HyperDistill"]
        assert main_rows[0]["paper"] == "0.327 ± 0.052"
        assert all(_number(row["max lr·λ_max"]) > 0 for row in tables[0])
    if name == "cleaning":
        assert any(label.startswith("random search") for label in labels)
        for row in rows:  # mean ± interval of accuracies in percent
            assert 0.0 <= _number(row["test acc (%)"]) <= 100.0
    if name == "fidelity":
        exact = [row for row in rows if row["method"] == "exact (reverse mode)"]
        assert exact and all(
            c.startswith("1.000 (1.00; 1.00)") for r in exact for c in list(r.values())[2:]
        )
    if name == "cost":
        assert len(tables) == 4 and any(str(x).startswith("reverse_hypergradient") for x in labels)
        for row in tables[0]:
            assert all(_number(v) > 0 for k, v in row.items() if k.startswith("T ="))
    if name == "toys":
        darts = tables[1]
        assert len(darts) == 9
        assert all(abs(float(r["λ reached"]) - float(r["w reached"])) < 0.05 for r in darts)


def test_demo_tiny_table_and_plot(tmp_path, capsys):
    assert _run(["demo", "--quick", "--out", str(tmp_path)]) == 0
    (table,) = _check_outputs(tmp_path, "demo")
    assert [row["method"] for row in table][:2] == ["no tuning", "FO"]
    assert len(table) == len(METHODS)
    by = {row["method"]: row for row in table}
    # the exact method's own hypergradient is the reference: cosine 1 is a real check
    assert by["exact (reverse mode)"]["cosine with exact"] == "1.000"
    assert by["FO"]["cosine with exact"] == "0.000"  # λ is not in the validation loss
    assert by["no tuning"]["AUROC clean vs corrupted"] == "0.500"  # all weights equal
    for row in table:
        assert 0.0 <= float(row["test acc (%)"]) <= 100.0
    assert "| method |" in capsys.readouterr().out


def test_demo_test_split_never_enters_tuning():
    """Poisoning the test split changes the reported accuracy and nothing else."""
    x, y = digits()
    data = cleaning_split(x, y, n_train=150, n_val=60, noise=0.3, seed=3)
    assert len(data.test.y) == len(y) - 210  # the rest, disjoint from train and val
    task, _ = make_task(data, "softmax", 3, batch_size=50)
    poisoned = task._replace(
        data={
            **task.data,
            "test": {
                "x": jnp.full_like(task.data["test"]["x"], jnp.nan),
                "y": jnp.full_like(task.data["test"]["y"], -1),
            },
        }
    )
    settings = Settings(T=3)
    key = jax.random.PRNGKey(0)
    for name in ("greedy", "hyperdistill"):
        method = build(name, settings)
        clean = train(method, task, settings.T, 4, key)
        dirty = train(method, poisoned, settings.T, 4, key)
        np.testing.assert_array_equal(clean.state.hyperparams, dirty.state.hyperparams)
        np.testing.assert_array_equal(clean.history["val_loss"], dirty.history["val_loss"])
        assert clean.history["test_acc"][-1] > 0.3 and dirty.history["test_acc"][-1] < 0.3


def test_cleaning_split_is_disjoint_and_corrupts_the_asked_fraction():
    x = np.arange(100.0)[:, None]
    y = np.arange(100) % 10
    d = cleaning_split(x, y, n_train=40, n_val=20, noise=0.5, seed=0)
    ids = [set(s.x[:, 0].tolist()) for s in (d.train, d.val, d.test)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert int(d.corrupted.sum()) == 20
    assert np.all(d.train.y[d.corrupted] != d.train.clean_y[d.corrupted])
    assert np.array_equal(d.val.y, d.val.clean_y) and np.array_equal(d.test.y, d.test.clean_y)


# -- the IDX path (Fashion-MNIST / MNIST protocol) ---------------------------------------


def _write_tiny_mnist(folder: pathlib.Path, n_train=80, n_test=30, side=8):
    rng = np.random.default_rng(0)
    folder.mkdir()
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 60, (n, side, side)).astype(np.uint8)
        images[:, labels % side, :] = 255  # a learnable pattern: a bright row per class
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels)


@pytest.mark.parametrize("restart", ["reset", "warm"])
def test_cleaning_on_idx_files_runs_the_papers_protocol(tmp_path, restart):
    _write_tiny_mnist(tmp_path / "mnist")
    out = tmp_path / "out"
    argv = ["bench", "cleaning", "--quick", "--dataset", "mnist", "--restart", restart]
    argv += ["--seeds", "1", "--data-dir", str(tmp_path / "mnist"), "--out", str(out)]
    assert _run(argv) == 0
    (table,) = _check_outputs(out, "cleaning")
    by = {row["method"]: row for row in table}
    assert set(by) == {
        "no tuning",
        "T1-T2 (exact one-step)",
        "IFT(5) (Neumann)",
        "Greedy (γ = 0.9)",
        "exact (reverse mode, T steps)",
    }
    assert by["Greedy (γ = 0.9)"]["paper (tuning split)"] == "87.06"
    assert by["no tuning"]["paper (tuning split)"] == "70.46"
    assert by["IFT(5) (Neumann)"]["paper (tuning split)"] == "71.97"
    for row in table:
        assert 0.0 <= _number(row["acc on tuning split (%)"]) <= 100.0
        assert 0.0 <= _number(row["held-out acc (%)"]) <= 100.0
    text = (out / "cleaning.md").read_text()
    assert "conv net" in text and f"--restart {restart}" in text
    assert "Greedy − no tuning on the tuning split" in text and "(paper +16.60)" in text
    assert "0 of the 5 runs were loaded" in text and len(list((out / "runs").glob("*.npz"))) == 5


def test_the_papers_protocol_resumes_from_its_stored_runs(tmp_path):
    _write_tiny_mnist(tmp_path / "mnist")
    out = tmp_path / "out"
    argv = ["bench", "cleaning", "--quick", "--dataset", "mnist", "--seeds", "1"]
    argv += ["--data-dir", str(tmp_path / "mnist"), "--out", str(out)]
    assert _run(argv) == 0
    first = _check_outputs(out, "cleaning")
    (out / "runs" / "mnist-p0.3-warm-seed0-greedy.npz").unlink()  # as if interrupted there
    assert _run(argv) == 0
    text = (out / "cleaning.md").read_text()
    assert "4 of the 5 runs were loaded" in text
    cells = ["acc on tuning split (%)", "held-out acc (%)", "per seed, tuning split (%)"]
    assert [[r[c] for c in cells] for r in _check_outputs(out, "cleaning")[0]] == [
        [r[c] for c in cells] for r in first[0]
    ]  # the rerun Greedy and the loaded runs give the same table
    assert _run([*argv, "--fresh"]) == 0
    assert "0 of the 5 runs were loaded" in (out / "cleaning.md").read_text()
    argv = ["bench", "cleaning", "--quick", "--outer-steps", "4", *argv[2:]]
    assert _run(argv) == 0  # other settings: nothing is loaded
    assert "0 of the 5 runs were loaded" in (out / "cleaning.md").read_text()


def test_the_papers_protocol_refuses_a_method_list(tmp_path, capsys):
    _write_tiny_mnist(tmp_path / "mnist")
    argv = ["bench", "cleaning", "--quick", "--dataset", "mnist", "--methods", "none"]
    argv += ["--data-dir", str(tmp_path / "mnist"), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "--methods" in capsys.readouterr().err


def test_missing_data_dir_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "bench",
                "cleaning",
                "--dataset",
                "fashion-mnist",
                "--data-dir",
                str(tmp_path / "nowhere"),
                "--out",
                str(tmp_path / "out"),
            ]
        )
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "no folder" in err and "apt-get install dataset-fashion-mnist" in err
    assert not (tmp_path / "out").exists()  # no work started


def test_idx_reader_round_trips_and_rejects_bad_files(tmp_path):
    for dtype in (np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64):
        a = (np.arange(24) - 5).reshape(2, 3, 4).astype(dtype)
        for name in ("a-idx3", "a-idx3.gz"):
            write_idx(tmp_path / name, a)
            b = read_idx(tmp_path / name)
            assert b.dtype == a.dtype and np.array_equal(a, b)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + bytes(8))
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    raw = gzip.decompress((tmp_path / "a-idx3.gz").read_bytes())
    (tmp_path / "short").write_bytes(raw[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "short")


def _corrupt(folder: pathlib.Path, how: str) -> str:
    """Spoil one file of a tiny MNIST folder; the file name the error must give."""
    if how == "gzip":
        path = folder / "train-images-idx3-ubyte.gz"
        path.write_bytes(path.read_bytes()[:40])
        return path.name
    if how == "counts":
        labels = folder / "t10k-labels-idx1-ubyte"
        write_idx(labels, read_idx(labels)[:-1])
        return "t10k-labels-idx1-ubyte"
    if how == "labels":
        labels = folder / "train-labels-idx1-ubyte"
        write_idx(labels, np.where(read_idx(labels) == 3, 12, read_idx(labels)).astype(np.uint8))
        return labels.name
    images = folder / "t10k-images-idx3-ubyte.gz"
    bad = read_idx(images).astype(np.float32)
    bad[0, 0, 0] = np.nan
    write_idx(images, bad)
    return images.name


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("gzip", "not a valid gzip file"),
        ("counts", "holds 30 images but"),
        ("labels", "labels must be in [0, 9], found [12]"),
        ("nan", "non-finite pixel values"),
    ],
)
def test_corrupt_or_inconsistent_data_files_are_named(tmp_path, capsys, how, message):
    _write_tiny_mnist(tmp_path / "mnist")
    name = _corrupt(tmp_path / "mnist", how)
    argv = ["bench", "cleaning", "--quick", "--dataset", "mnist"]
    argv += ["--data-dir", str(tmp_path / "mnist"), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert name in err and message in err
    assert not (tmp_path / "out").exists()  # refused before any work


def test_explicit_flags_win_over_quick(tmp_path, monkeypatch):
    import types

    from gradhpo_bench import cli, report

    seen = {}

    def fake_main(args, out):  # what a bench reads, without running one
        seen.update(
            steps=report.quick_value(args, "outer_steps", 40),
            seeds=report.quick_value(args, "seeds", 2),
        )
        return "ok"

    real = cli._module
    fake = types.SimpleNamespace(add_arguments=real("cleaning_bench").add_arguments, main=fake_main)
    monkeypatch.setattr(cli, "_module", lambda name: fake)
    argv = ["bench", "cleaning", "--quick", "--outer-steps=3", "--out", str(tmp_path / "o")]
    assert main(argv) == 0
    assert seen == {"steps": 3, "seeds": 2}  # the explicit flag wins, the rest is --quick's
    assert main(["bench", "cleaning", "--out", str(tmp_path / "o")]) == 0
    assert seen == {"steps": 200, "seeds": 5}  # without --quick: the defaults


# -- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--outer-steps", "0"], "expected an integer >= 1"),
        (["demo", "--noise", "1.5"], "expected a number in [0, 0.9]"),
        (["demo", "--model", "resnet"], "invalid choice"),
        (["bench", "nope"], "invalid choice"),
        (["bench", "fidelity", "--gamma", "0"], "--gamma"),
        (["bench", "cleaning", "--data-dir", "/tmp"], "only for --dataset"),
        (["bench", "cleaning", "--fresh"], "argument --fresh: only for --dataset"),
        (["demo", "--out", ""], "argument --out: must name a folder, got an empty string"),
        (["bench", "cost", "--quick", "--out", " "], "must name a folder"),
        ([], "required"),
    ],
)
def test_bad_arguments_get_argparse_messages(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: gradhpo" in err and message in err


def test_unwritable_output_folder_fails_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    for out in (blocker, blocker / "sub"):
        with pytest.raises(SystemExit) as exc:
            main(["bench", "cost", "--quick", "--out", str(out)])
        assert exc.value.code == 2
        assert "output folder" in capsys.readouterr().err


def test_python_dash_m_gradhpo_bench_runs():
    done = subprocess.run(
        [sys.executable, "-m", "gradhpo_bench", "bench", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0
    for name in BENCHES:
        assert name in done.stdout


# -- pieces ------------------------------------------------------------------------------


def test_auroc_matches_the_pairwise_definition():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 60).astype(float)  # many ties
    positive = rng.random(60) < 0.4
    pos, neg = scores[positive], scores[~positive]
    pairs = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    assert auroc(scores, positive) == pytest.approx(pairs.mean())


def test_import_gradhpo_stays_light():
    code = (
        "import sys, gradhpo; heavy = {'matplotlib', 'sklearn', 'tqdm', 'optuna', "
        "'gradhpo_bench', 'gradhpo_bench.cli'} & set(sys.modules); print(sorted(heavy))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "[]"


@pytest.mark.parametrize("side", [8, 7])
def test_the_bench_conv_net_is_a_stride_two_same_convolution(side):
    model = convnet(side, 10)
    params = model.init(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (5, side, side))

    def reference(params, x):  # the convolutions as XLA's convolution op
        h = x[..., None]
        for layer in params["convs"]:
            h = jax.lax.conv_general_dilated(
                h, layer["w"], (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
            h = jax.nn.relu(h + layer["b"])
        return h.reshape(h.shape[0], -1) @ params["head"]["w"] + params["head"]["b"]

    np.testing.assert_allclose(model.apply(params, x), reference(params, x), atol=1e-5)
    grads = [
        jax.grad(lambda p, f=f: jnp.sum(f(p, x) ** 2))(params) for f in (model.apply, reference)
    ]
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
