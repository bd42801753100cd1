"""branchmerge: several fine-tuned LLMs as branches of one compact model.

Each compressed weight is stored as a shared normalized average plus per-branch low-rank differences
(``W_i ≈ s_i · (W̄ + U_i V_i)``); a training-free router picks the branch for each question.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load", "open_front", "run_merge", "load_config"]


def __getattr__(name: str):  # lazy: `import branchmerge` stays cheap for the CLI's --help
    if name in ("load", "open_front"):
        from branchmerge import front

        return getattr(front, name)
    if name == "run_merge":
        from branchmerge.merge import run_merge

        return run_merge
    if name == "load_config":
        from branchmerge.config import load_config

        return load_config
    raise AttributeError(f"module 'branchmerge' has no attribute {name!r}")
