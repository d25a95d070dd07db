"""Models this lmms-eval plugin adds: `--model zipr1` -> lmms_eval_zipr1.models.zipr1.ZipR1.

Discovery: `pip install -e .[lmms]` registers `manifest` in the `lmms_eval.models` entry-point group (pyproject.toml),
which lmms-eval 0.7.3 loads in `lmms_eval/models/__init__.py: _initialize_model_registry` ->
`ModelRegistryV2.load_entrypoint_manifests` (a callable returning a ModelManifest is an accepted payload).
Fallback without the install: LMMS_EVAL_PLUGINS=lmms_eval_zipr1 (deprecated by lmms-eval) reads AVAILABLE_MODELS.
"""
AVAILABLE_MODELS = {"zipr1": "ZipR1"}
CLASS_PATH = "lmms_eval_zipr1.models.zipr1.ZipR1"


def manifest():
    """The `zipr1` entry point's payload: lmms-eval imports the class only when `--model zipr1` asks for it."""
    from lmms_eval.models.registry_v2 import ModelManifest
    return ModelManifest(model_id="zipr1", simple_class_path=CLASS_PATH)
