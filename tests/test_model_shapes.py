"""benchmarks/model_shapes.py: each family's real-shape denoiser, built on the meta device (no memory), has its
published parameter count (within 10 %)."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import model_shapes  # noqa: E402

sys.path.pop(0)


@pytest.mark.parametrize("model", ["qwen-image", "flux2-klein", "z-image", "wan", "flux"])
def test_real_shapes_have_the_published_parameter_counts(model):
    with torch.device("meta"):
        network = model_shapes.denoiser(model)
    count = sum(p.numel() for p in network.parameters()) / 1e9
    assert count == pytest.approx(model_shapes.PUBLISHED_PARAMETERS[model], rel=0.10), count
