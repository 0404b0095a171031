"""The docs site's code: every page's Python blocks run, in order, as one program per page."""

import pathlib
import re
import warnings

import pytest

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(
    p for p in DOCS.rglob("*.md") if "_build" not in p.parts and "results" not in p.parts
)


def blocks(page):
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M)


def test_every_page_is_in_the_table_of_contents():
    text = "\n".join(p.read_text() for p in PAGES)
    for page in PAGES:
        name = page.relative_to(DOCS).with_suffix("").as_posix()
        if name != "index":
            assert name.split("/")[-1] in text, f"{name} is in no toctree"


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p)], ids=lambda p: p.stem)
def test_page_examples_run(page, capsys):
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # an example that warns is a bad example
        for code in blocks(page):
            exec(compile(code, str(page), "exec"), namespace)
    printed = capsys.readouterr().out.split()
    assert "False" not in printed, f"{page.name} printed False: an example's claim failed"
