"""Experiments over batquant_jax: the comparison study, diagnoses, benchmarks.

Run each as a module from the repository root, e.g. ``python -m experiments.study``.
"""
