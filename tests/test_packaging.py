"""What `pip install .` (not editable) ships: every package of the source tree."""
from __future__ import annotations

import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_every_legorun_package_is_listed_for_a_regular_install():
    """An editable install finds any package in the tree; a regular one only the
    listed ones, so a package missing here breaks the README's first command."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for p in (ROOT / "legorun").rglob("__init__.py")}
    assert found - listed == set(), "add these to [tool.setuptools] packages"
    assert "legorun_components" in listed
    assert config["package-dir"]["legorun_components"] == "components"
