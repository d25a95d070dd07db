"""Shared test setup: the repo root on sys.path, deterministic CPU threads, offline hubs."""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

torch.set_num_threads(2)
if not torch.cuda.is_available():  # Triton kernels run through the interpreter on CPU (set before triton loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Qwen2.5-VL folder (toy.build_tiny_model_dir), shared by the tests that only read it."""
    import toy
    return toy.build_tiny_model_dir(tmp_path_factory.mktemp("tiny"))
