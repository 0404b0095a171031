"""Packaging metadata: the license ships, the project links and classifiers are there."""

import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_license_file_ships_and_matches_the_metadata():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_project_urls_and_classifiers():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert {"Homepage", "Source", "Issues"} <= set(project["urls"])
    classifiers = set(project["classifiers"])
    assert "Programming Language :: Python :: 3.11" in classifiers
    assert any(c.startswith("Development Status ::") for c in classifiers)
    assert not any(c.startswith("License ::") for c in classifiers)  # the SPDX field says it


def test_readme_links_are_absolute_and_the_distribution_name_is_free():
    import re

    text = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)]+)\)", text)
    assert targets and all(t.startswith(("https://", "#")) for t in targets), targets
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "gradhpo-jax"  # "gradhpo" on the index is another project's
    floors = {d.split(">=")[0]: d.split(">=")[1] for d in project["dependencies"]}
    assert floors == {"jax": "0.8.1", "optax": "0.2.5", "numpy": "2.2.6"}
    ci = (ROOT / ".ci" / "run").read_text()
    for name, version in floors.items():  # CI installs exactly the floors and tests them
        assert f"{name}=={version}" in ci
