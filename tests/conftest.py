"""Shared test set-up."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Every test runs torch on one thread: the CI machine's two cores are shared with other jobs, where
    OpenMP oversubscription makes tiny models many times slower, and results must not depend on how many
    threads a reduction was split over."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
