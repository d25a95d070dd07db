"""The paper files copy out with torch and einops alone: their imports, read with `ast`, name nothing of the
supporting package `zipr1_support` (nor any other module of ours), so a reader can take one file into their project.
sparse_qwen.py, the model integration, may also use transformers (and its safetensors, for a learned probe scorer's
file) and the paper files beside it."""
import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAPER = {"sparse_attention.py": set(), "grpo.py": set(), "learned_sparsity.py": set(),
         "rewards.py": {"rouge_score"},  # ROUGE-L of free-form answers, imported only when such a row is scored
         "sparse_qwen.py": {"transformers", "safetensors", "sparse_attention", "learned_sparsity", "zipr1_kernels"}}


def imported_top_names(path: Path) -> set[str]:
    """Top-level module names of every import in the file, at any depth (lazy imports inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add("." if node.level else node.module.split(".")[0])  # ".": inside the file's own package
    return names


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_file_imports_only_torch_einops_and_the_standard_library(name):
    extra = imported_top_names(ROOT / name) - set(sys.stdlib_module_names) - {"torch", "einops"} - PAPER[name]
    assert not extra, f"{name} imports {sorted(extra)}: a paper file copies out with torch and einops alone"


def test_the_import_scan_sees_a_supporting_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\n\ndef f():\n    from zipr1_support.train_config import Config\n")
    assert imported_top_names(bad) == {"torch", "zipr1_support"}


def test_the_kernels_the_model_file_uses_import_no_supporting_code():
    for path in sorted((ROOT / "zipr1_kernels").glob("*.py")):
        extra = imported_top_names(path) - set(sys.stdlib_module_names) - {"torch", "triton", "sparse_attention"}
        assert not extra - {"."}, f"zipr1_kernels/{path.name} imports {sorted(extra)}"
