"""The plugin's own tests: itmkit's conformance kit, plus what is special about this stage."""

import pytest
import torch

from itmkit.testing import CHECKS, check_stage
from itmkit.types import Local, LocalPort
from itmkit_hello.stages import GatedMean


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_conformance(check):
    check(GatedMean)


def test_registered_by_the_entry_point():
    from itmkit.plugins import get_registry

    check_stage(GatedMean, registry=get_registry())


def test_equal_gates_give_the_plain_mean_of_valid_fragments():
    pool = GatedMean(normalize=False).build(x=LocalPort(3))
    torch.nn.init.zeros_(pool.gate.weight)  # every gate sigmoid(0) = 0.5
    feats = torch.tensor([[[1.0, 2.0, 3.0], [3.0, 4.0, 5.0], [100.0, 100.0, 100.0]]])
    out = pool(Local(feats, torch.tensor([[True, True, False]])))
    torch.testing.assert_close(out, torch.tensor([[2.0, 3.0, 4.0]]))
