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


def test_every_package_data_pattern_ships_files():
    """Each package-data pattern matches files in its package's folder (a stale pattern ships
    nothing and hides a missing file), and every data-only folder under the packages (the sweep
    presets) is a listed package, so setuptools ships it without an ambiguity warning."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = setuptools["package-dir"]
    for package, patterns in setuptools["package-data"].items():
        folder = ROOT / mapped.get(package, package.replace(".", "/"))
        for pattern in patterns:
            assert list(folder.glob(pattern)), f"{package}: {pattern!r} matches no file in {folder}"
    presets = ROOT / "iclgd_lens" / "sweep" / "presets"
    assert list(presets.glob("*.toml")) and "iclgd_lens.sweep.presets" in setuptools["packages"]


def test_the_package_version_is_one_number():
    """`iclgd_lens.__version__` is pyproject's version, and the one results and the sweep store's keys
    record (not an older editable install's metadata)."""
    import iclgd_lens
    from iclgd_lens.engine.results import versions

    assert (
        iclgd_lens.__version__ == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    )
    assert versions()["iclgd-lens"] == iclgd_lens.__version__
