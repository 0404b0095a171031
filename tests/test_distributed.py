"""Past one process and one device: multi-process runs, sharded λ, sharded populations.

Every check runs in subprocesses (programs in ``distributed_programs.py``): two processes
joined by ``jax.distributed`` on 127.0.0.1 with gloo CPU collectives, or one process with 8
host devices. Each is bounded in time.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
PROGRAMS = os.path.join(HERE, "distributed_programs.py")
TIMEOUT = 300


def env(devices: int) -> dict:
    return dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    )


def result(proc) -> dict:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args, devices=1):
    return subprocess.Popen(
        [sys.executable, PROGRAMS, *map(str, args)],
        env=env(devices),
        cwd=HERE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_two_processes_equal_one_process_with_as_many_devices(tmp_path):
    """step, run, the shard-local sampler, checkpoint + resume and run_population on 2 processes
    equal one process of 2 host devices to 1e-6; only process 0 logs."""
    port = free_port()
    procs = [launch("multi_process", 2, i, port, tmp_path / "two") for i in range(2)]
    single = finish(launch("multi_process", 1, 0, port, tmp_path / "one", devices=2))
    finished = [finish(p) for p in procs]
    two = [result(p) for p in finished]
    one = result(single)
    assert two[0] == two[1]  # both processes hold the same replicated λ
    for name in ("step", "run", "sharded_sampler", "resumed", "population"):
        np.testing.assert_allclose(two[0][name], one[name], rtol=1e-6, atol=1e-7)
    assert two[0]["resumed"] == two[0]["run"]  # a checkpointed run resumes bitwise
    assert two[0]["episodes"] == [1, 2]
    assert "INFO:gradhpo" in finished[0].stderr and "INFO:gradhpo" not in finished[1].stderr
    assert "(compiling)" not in finished[1].stderr  # one progress bar, on process 0


@pytest.fixture(scope="module")
def sharded():
    return result(finish(launch("sharded_hyperparameters", devices=8)))


@pytest.mark.parametrize(
    "name", ["fo", "one-step", "t1t2", "hyperdistill", "greedy", "reverse", "drmad"]
)
def test_sharded_hyperparameters_keep_their_sharding_without_gathers(sharded, name):
    out = sharded[name]
    expected = ["P('model', None)", "P('model',)"]
    assert out["step_specs"] == out["params_specs"] == out["run_specs"] == expected
    assert out["gathers"] == 0  # no all-gather of a whole λ leaf in the compiled step
    assert out["max_diff"] < 1e-5  # equal to the unsharded step (float32)


def test_per_example_hyperparameters_shard_with_the_data(sharded):
    assert sharded["per_example"]["spec"] == "P('batch',)"
    assert sharded["per_example"]["max_diff"] < 1e-6


def test_populations_sharded_over_devices_equal_sequential_runs():
    out = result(finish(launch("sharded_population", devices=8)))
    assert out["spec"] == "P('pop',)" and out["devices"] == 8
    assert out["max_diff"] < 1e-5
    # Unplaced states: spread over the process's devices by default (the fastest layout).
    assert out["spread_spec"] == "P('population',)" and out["spread_devices"] == 8
    assert out["spread_diff"] < 1e-5
