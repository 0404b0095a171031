"""The README's Python blocks run, in order, as one program."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_blocks_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    out = capsys.readouterr().out
    assert "validation loss:" in out and "cosine with exact:" in out
    assert "[3, 4, 5] 5" in out  # the checkpoint example
    state = namespace["state"]
    assert int(state.step) == 500
    # The tuned strengths improved the validation loss over the untuned start.
    import jax.numpy as jnp

    opt0 = namespace["gradhpo"].OneStepOptimizer(inner_optimizer=namespace["optax"].sgd(0.05))
    s0 = opt0.init(jnp.zeros(10), jnp.full(10, -2.0))
    for _ in range(500):
        s0 = opt0.step(
            s0,
            namespace["train"],
            namespace["val"],
            namespace["train_loss"],
            namespace["val_loss"],
            0.0,
        )
    assert float(state.metadata["val_loss"]) < float(s0.metadata["val_loss"])


def test_readme_set_up_commands_are_two():
    text = README.read_text()
    setup = text.split("## Set-up", 1)[1].split("## Quickstart", 1)[0]
    commands = re.findall(r"```bash\n(.*?)```", setup, flags=re.S)
    assert [c.strip() for c in commands] == [
        'pip install -e ".[examples]" && gradhpo demo',
        'pip install -e ".[test]" && python -m pytest',
    ]
