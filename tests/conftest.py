"""Test tiers: the quick tier runs by default (CI, < 4 minutes on 2 CPU cores); tests marked
``@pytest.mark.extended`` (larger randomized sweeps) run only with ``--extended``. Tests marked
``@pytest.mark.gpu`` need a CUDA device and are skipped without one; ``@pytest.mark.hopper``
(the Gluon kernels, which issue ``wgmma``) need an sm_90 GPU."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, the Triton kernels run under Triton's CPU interpreter. It is chosen when a
# kernel is defined, so this must be set before gna is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--extended", action="store_true", default=False,
                     help="also run the extended tier (larger randomized sweeps)")


def pytest_configure(config):
    # Also declared in pyproject.toml; repeated so the markers exist when run from elsewhere.
    config.addinivalue_line("markers",
                            "extended: larger randomized sweeps, selected with --extended")
    config.addinivalue_line("markers", "gpu: needs a CUDA device")
    config.addinivalue_line("markers", "hopper: needs an sm_90 GPU (the Gluon kernels)")


def pytest_collection_modifyitems(config, items):
    run_extended = config.getoption("--extended")
    has_cuda = torch.cuda.is_available()
    skip_extended = pytest.mark.skip(reason="extended tier: run with --extended")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    is_hopper = has_cuda and torch.cuda.get_device_capability() == (9, 0)
    skip_hopper = pytest.mark.skip(reason="needs an sm_90 GPU (the Gluon kernels issue wgmma)")
    for item in items:
        if "extended" in item.keywords and not run_extended:
            item.add_marker(skip_extended)
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        elif "hopper" in item.keywords and not is_hopper:
            item.add_marker(skip_hopper)
