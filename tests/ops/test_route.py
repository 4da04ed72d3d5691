"""route: every backend gives exactly the stable expert-major permutation of a per-entry loop."""

import pytest
import torch

from geomoe_kernels import OpInputError, route
from tests.helpers import expert_ids
from tests.oracles import naive_route


@pytest.mark.parametrize("T,k,E", [(1, 1, 1), (13, 2, 5), (50, 3, 23), (7, 3, 3), (50, 3, 7), (70, 2, 23)])
def test_equals_naive(backend, T, k, E):
    ids = expert_ids(T, k, E)
    for got, want in zip(route(ids.to(backend.device), E, backend=backend.name), naive_route(ids, E)):
        assert torch.equal(got.cpu(), want)


def test_all_to_one_expert_is_stable(backend):
    ids = torch.full((33, 1), 2)
    for got, want in zip(route(ids.to(backend.device), 5, backend=backend.name), naive_route(ids, 5)):
        assert torch.equal(got.cpu(), want)


def test_empty_experts_and_all_to_one():
    ids = torch.zeros(9, 1, dtype=torch.int64) + 3
    r2f, f2r, off = route(ids, 6)
    assert off.tolist() == [0, 0, 0, 0, 9, 9, 9]
    assert r2f.tolist() == list(range(9))  # stable


def test_opcheck():
    torch.library.opcheck(route.op, (expert_ids(10, 3, 4), 4))


def test_bad_arguments():
    with pytest.raises(OpInputError, match=r"'expert_ids' expected dtype int64, got torch.int32"):
        route(torch.zeros(3, 2, dtype=torch.int32), 4)
    with pytest.raises(OpInputError, match=r"'expert_ids' expected values in \[0, 3\], got values in \[0, 4\]"):
        route(torch.tensor([[0, 4], [1, 2]]), 4)
    with pytest.raises(OpInputError, match=r"'expert_ids' expected values in \[0, 3\], got values in \[-1, 2\]"):
        route(torch.tensor([[0, -1], [1, 2]]), 4)
