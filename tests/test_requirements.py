"""requirements.txt pins exactly the third-party packages the repo imports directly (code, tests, benchmarks).

Read from the source with `ast`, so an import added without its pin (or a pin left after its last import) fails here.
"""
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = {"lmms_eval", "av"}  # the lmms-eval plugin's host (README); PyAV, imported only to decode mp4 & co.
DIST_OF = {"PIL": "pillow"}  # import name -> distribution name where they differ


def third_party_imports() -> set[str]:
    """Top-level names of every absolute import in the repo that is neither ours nor the standard library."""
    ours = {p.stem for p in ROOT.glob("*.py")} | {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    ours |= {p.stem for p in (ROOT / "tests").glob("*.py")}  # a test may import a helper of another test file
    found = set()
    for path in ROOT.rglob("*.py"):
        if ".git" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            found |= {n.split(".")[0] for n in names}
    return {n for n in found if n not in ours and n not in sys.stdlib_module_names and n not in ("tests", "conftest")}


def pinned() -> set[str]:
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    return {re.split(r"[=<>!~\[ ]", line)[0].lower().replace("-", "_") for line in lines if line}


def test_requirements_pin_what_the_code_imports_and_nothing_else():
    imported = {DIST_OF.get(n, n).lower() for n in third_party_imports()}
    assert {"torch", "transformers", "numpy", "pillow"} <= imported  # the scan sees the imports
    assert imported - OPTIONAL <= pinned(), f"imported but not in requirements.txt: {imported - OPTIONAL - pinned()}"
    assert pinned() <= imported, f"in requirements.txt but never imported: {pinned() - imported}"
