"""Shared test settings."""

import torch

# The tiny models run a forward in about a millisecond on one thread; with two, thread start-up dominates (~100x).
torch.set_num_threads(1)
