"""Supporting code of the ZipR1 reference: settings and CLI, data and media loading, batching, run directory and
checkpoints, multi-GPU, plots. The paper files (sparse_attention.py, grpo.py, rewards.py, learned_sparsity.py)
import nothing from here."""
