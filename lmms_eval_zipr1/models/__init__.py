"""Models this lmms-eval plugin adds: `--model zipr1` -> lmms_eval_zipr1.models.zipr1.ZipR1."""
AVAILABLE_MODELS = {"zipr1": "ZipR1"}
