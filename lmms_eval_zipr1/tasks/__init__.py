"""No extra tasks: lmms-eval's CLI adds `<plugin>.tasks` to its task search path, so the folder must exist."""
