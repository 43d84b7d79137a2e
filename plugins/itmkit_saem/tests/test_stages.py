import pytest
from itmkit.testing import CHECKS
from itmkit_saem.stages import SaemAngular, SaemBert, SaemCnn, SaemParamNorm, SaemTransformer
STAGES = [SaemBert, SaemTransformer, SaemCnn, SaemAngular, SaemParamNorm]
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("cls", STAGES, ids=lambda c: c.name)
def test_conformance(cls, check):
    check(cls)
