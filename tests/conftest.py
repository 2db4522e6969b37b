"""Shared test setup: one torch thread per process.

The suite runs on 2-core machines where Ray workers, sandboxed programs and torch share the
cores; tiny models gain nothing from intra-op threads and oversubscription makes them slower.
"""
import torch

torch.set_num_threads(1)
