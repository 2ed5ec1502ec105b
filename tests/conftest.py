"""Shared fixtures: one tiny synthetic COCO-format dataset per test session."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
# Tests start processes side by side (DDP ranks, CLI runs, notebook kernels): one OpenMP thread each, since
# oversubscribed OpenMP threads spin and make CPU training many times slower. Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory):
    """A tiny synthetic dataset: dict with train/val image dirs and annotation files."""
    from pkdkit.synthetic import make_synthetic_coco

    root = tmp_path_factory.mktemp("tiny_coco")
    return make_synthetic_coco(root, n_train=16, n_val=8, size=96, seed=0)
