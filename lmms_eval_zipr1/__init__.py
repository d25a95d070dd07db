"""lmms-eval plugin: the `zipr1` model = a Qwen2(.5)-VL answering with Top-p sparse attention (Eq. 1-3).

lmms-eval is optional: this package imports it only in `models/zipr1.py`, which lmms-eval itself loads. Install
lmms-eval and the benchmark data yourself, then run from this repository's root:

    LMMS_EVAL_PLUGINS=lmms_eval_zipr1 PYTHONPATH=$PWD python -m lmms_eval --model zipr1 \
        --model_args pretrained=outputs/zipr1/checkpoint-1000,keep_p=0.975 --tasks mme --batch_size 1

`LMMS_EVAL_PLUGINS` makes lmms-eval import `lmms_eval_zipr1.models` (AVAILABLE_MODELS: name -> class in
`models/<name>.py`) and add `lmms_eval_zipr1/tasks` to its task search path. model_args: pretrained (folder or hub
id), keep_p (1.0 = dense), batch_size, max_new_tokens, device, dtype, seed, and the input sizes of train.py / eval.py
(min_pixels, max_pixels, video_min_pixels, video_max_pixels, fps, min_frames, max_frames; Video-R1's values by
default, docs/video_r1.md). The request handling lives in `engine.py` and is tested without lmms-eval
(tests/test_eval.py).
"""
