import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from hf_control_ft.core.control import add_lora_control, lora_parameters
from hf_control_ft.models.networks import MLPDenoiser


# Bit-for-bit comparisons (save -> load, resume, pipeline vs trainer) need one fixed reduction order: with
# several intra-op threads, CPU kernels may split sums differently between two otherwise identical calls.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_mlp_denoiser(dim=2, hidden=32, depth=2, seed=0, lora=True, perturb=0.0):
    """A random-weight MLP denoiser with a LoRA control adapter; ``perturb`` > 0 makes the control non-zero."""
    torch.manual_seed(seed)
    model = MLPDenoiser(dim=dim, hidden=hidden, depth=depth)
    if lora:
        add_lora_control(model, rank=4)
        if perturb:
            g = torch.Generator().manual_seed(seed + 100)
            with torch.no_grad():
                for p in lora_parameters(model):
                    p.add_(perturb * torch.randn(p.shape, generator=g))
    return model


def ddim(**kw):
    return DDIMScheduler(num_train_timesteps=1000, clip_sample=False, **kw)


def ddpm(**kw):
    return DDPMScheduler(num_train_timesteps=1000, clip_sample=False, **kw)
