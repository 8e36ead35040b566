"""The public API: everything in iclgd_lens.__all__ resolves and shows in dir() (tab completion);
hooks/ and analyses/ import nothing else from the library."""

import ast
import re
from pathlib import Path

import iclgd_lens

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {
    "iclgd_lens",
    "iclgd_lens.hooks",
    "iclgd_lens.analyses",
    "iclgd_lens.study",
    "iclgd_lens.plugins",
    "iclgd_lens.errors",
    "iclgd_lens.worlds",
}


def test_every_public_name_resolves_and_is_listed_by_dir():
    listed = set(dir(iclgd_lens))
    for name in iclgd_lens.__all__:
        assert name in listed, name
        assert getattr(iclgd_lens, name) is not None, name


def test_hooks_and_analyses_import_only_the_public_api():
    offenders = []
    for path in [*ROOT.glob("hooks/*.py"), *ROOT.glob("analyses/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("iclgd_lens"):
                allowed = node.module in ALLOWED or re.fullmatch(
                    r"iclgd_lens\.(worlds|hooks|analyses)\.\w+", node.module
                )
                if not allowed:
                    offenders.append(f"{path.relative_to(ROOT)}: from {node.module} import ...")
    assert not offenders, offenders
