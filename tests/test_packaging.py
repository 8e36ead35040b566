"""Every Python package of the source tree is in pyproject's explicit `packages` list, so a
non-editable install (`pip install .`, a wheel) has every module the editable one has."""

from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_directory_is_listed_in_pyproject():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    mapped = {folder: name for name, folder in setuptools["package-dir"].items()}
    found = set()
    for init in ROOT.glob("**/__init__.py"):
        rel = init.parent.relative_to(ROOT)
        if rel.parts[0] in ("iclgd_lens", *mapped) and ".venv" not in rel.parts:
            top = mapped.get(rel.parts[0], rel.parts[0])
            found.add(".".join([top, *rel.parts[1:]]))
    assert found - listed == set(), f"packages missing from pyproject.toml: {sorted(found - listed)}"
    assert "iclgd_lens.engine.gd" in found  # the walk sees subpackages
