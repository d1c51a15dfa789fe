"""Fixtures for the operator tests.

TRITON_INTERPRET: the Triton kernels run on CPU tensors through Triton's interpreter,
and the dispatcher offers ``impl="triton"`` on the CPU only while ``TRITON_INTERPRET=1``.
This conftest does NOT set it for the process: an autouse fixture sets it for each test
under tests/ops and restores the previous value afterwards, so it never leaks into
other test directories or into vLLM engine processes they spawn (an engine that saw it
would pick the slow interpreted kernels). That works because emosteer's launchers pick
the interpreted or compiled kernel per call from the tensors' device
(``emosteer/ops/triton/_launch.py``), not from the variable at import time.
Parametrization over implementations uses ``tests.utils.kernel_impls``, which sets the
variable only while it asks the dispatcher.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

# `from tests.utils import ...` whichever way pytest was started (python -m pytest puts
# the working directory on sys.path, the pytest script does not).
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


@pytest.fixture(autouse=True)
def _triton_interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("EMOSTEER_IMPL", raising=False)
    yield


@pytest.fixture
def gen():
    """A seeded CPU generator per test: failures reproduce."""
    return torch.Generator().manual_seed(1234)

