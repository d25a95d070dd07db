"""lmms-eval plugin: the `zipr1` model = a Qwen2(.5)-VL answering with Top-p sparse attention (Eq. 1-3).

lmms-eval is optional: this package imports it only in `models/zipr1.py`, which lmms-eval itself loads. Install,
model_args (keep_p, attn_implementation, the input sizes min_pixels ... max_frames of train.py), τ per task and the paper's benchmarks: docs/lmms_eval.md. Discovery: the `lmms_eval.models` entry point
that `pip install -e .[lmms]` registers (`models.manifest`); fallback LMMS_EVAL_PLUGINS=lmms_eval_zipr1, for which
lmms-eval 0.7.3 also needs the (empty) `tasks` subpackage on its include path (__main__.py:683-687). The request
handling lives in `engine.py` and is tested without lmms-eval (tests/test_eval.py); `toy_tasks.py` writes local toy
tasks that tests/test_lmms_eval.py runs through the real lmms-eval.
"""
import sys
from pathlib import Path

# The plugin imports this checkout's top-level modules (media, rollout, sparse_qwen, ...). `pip install -e .` maps only
# this package into site-packages, so its checkout joins the end of sys.path (installed packages keep precedence).
_CHECKOUT = str(Path(__file__).resolve().parents[1])
if _CHECKOUT not in sys.path:
    sys.path.append(_CHECKOUT)
