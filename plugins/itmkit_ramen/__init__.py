"""itmkit-ramen: RAMEN's early-fusion block (Shrestha et al., CVPR 2019), adapted to image-text matching."""

import itmkit

from itmkit_ramen.stages import Fusion, Question, QuestionVectorPool


@itmkit.hookimpl
def register_stages():
    return [Question, QuestionVectorPool, Fusion]
