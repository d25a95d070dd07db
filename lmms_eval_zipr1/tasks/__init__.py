"""Empty: lmms-eval 0.7.3 adds <plugin>.tasks to its task search path when LMMS_EVAL_PLUGINS names the plugin."""
