"""Merge methods: the branch method plus the baselines it is measured against, in one registry.

Baselines collapse N models into one plain model (what branchmerge exists to avoid); they are here so
the fidelity benchmark compares like with like and users can pick them with ``method:`` in the config.
Each is a pure function over the N tensors of one name (plus the base model's, where it takes one),
registered with ``@merge_method`` like mergekit's methods, with its parameters declared as a pydantic
model: a config's ``parameters:`` are validated against it, so a misspelt ``densty`` is an error.
This package is math and a registry only; the orchestration lives in :mod:`branchmerge.merge`.
"""

from branchmerge.methods.registry import (METHODS, MergeMethod, MethodParams, evaluate_setting,
                                          merge_method)
from branchmerge.methods.task_vectors import (breadcrumbs, breadcrumbs_ties, dare_linear, dare_sparsify, dare_ties,
                                              della, della_linear, della_sparsify, linear, magnitude_sparsify,
                                              model_stock, outlier_sparsify, passthrough, sce, sign_consensus_mask,
                                              task_arithmetic, ties)
from branchmerge.methods.interpolate import arcee_fusion, karcher, multislerp, nearswap, nuslerp, slerp

__all__ = ["METHODS", "MergeMethod", "MethodParams", "evaluate_setting", "merge_method", "linear", "task_arithmetic",
           "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "model_stock", "della",
           "della_linear", "sce", "passthrough", "slerp", "nuslerp", "multislerp", "karcher", "nearswap", "arcee_fusion",
           "magnitude_sparsify", "dare_sparsify", "outlier_sparsify", "della_sparsify", "sign_consensus_mask"]
