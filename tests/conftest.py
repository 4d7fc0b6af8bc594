"""Test setup shared by the whole suite.

The Triton interpreter must be switched on *before* `triton` is imported, so it
happens here, at collection time. It only makes the interpreter *available*:
kernels still take the PyTorch reference path on CPU unless a test asks for the
Triton path explicitly (see kernels/_dispatch.py).
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Make the repo root importable without installing it.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(1)  # small test shapes gain nothing from more, and spinning threads hurt on a busy machine
