"""Kernel tests run Triton kernels on the CPU through Triton's interpreter wherever no GPU is
present; it must be chosen before `triton` is first imported, hence here."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
