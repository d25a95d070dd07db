"""No top-level name of ours shadows a widely installed package.

Our repo root is first on sys.path when a user runs `python train.py`, so a top-level `kernels/` would be imported
instead of Hugging Face's `kernels` package; with that package installed (transformers 5.23 accepts kernels >= 0.18.2)
`from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl` then fails with "cannot import name 'CUDAProperties'
from 'kernels'". The test fakes the installed dist-info of such packages and imports the model code from the root.
"""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHADOWED = {"kernels": "0.18.5", "distributed": "2026.8.0"}  # Hugging Face's kernels, Dask's distributed


def fake_site(tmp_path: Path) -> Path:
    """A site folder whose dist-info says the packages are installed, as importlib.metadata sees them."""
    for name, version in SHADOWED.items():
        info = tmp_path / f"{name}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (info / "RECORD").write_text(f"{name}/__init__.py,,\n")
    return tmp_path


def test_no_top_level_module_is_named_like_a_widely_installed_package():
    ours = {p.stem for p in ROOT.glob("*.py")} | {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert not ours & set(SHADOWED), ours & set(SHADOWED)


def test_model_code_imports_from_the_repo_root_with_the_shadowed_packages_installed(tmp_path):
    code = ("import importlib.metadata as m; assert m.version('kernels') == '0.18.5'\n"
            "from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl\n"
            "import sparse_qwen, train, eval, zipr1_support.multi_gpu, zipr1_kernels\n")
    env = {**os.environ, "PYTHONPATH": str(fake_site(tmp_path))}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
