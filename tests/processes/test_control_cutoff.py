"""Stock and ODE sampling apply the adapter only at the noise levels it was trained on (docs/algorithms.md §11): the
trained chain's last steps are deterministic (pretrained network), so below the level where control ends the LoRA
never received a gradient. ``ControlCutoff`` switches it off there in a stock pipeline (``load_lora_weights``) and
in ``ControlledTextToImage(sampler="ode")``; the card gives the timestep."""

import os

import pytest
import torch
from family_checks import redness, tiny_config

from hf_control_ft import ElegantTrainer
from hf_control_ft.core.control import tuner_layers
from hf_control_ft.pipelines import ControlCutoff, ControlledTextToImage
from hf_control_ft.testing import tiny_sd3_pipeline

PROMPTS = ["a cat", "the dog"]
STEPS = 6  # SD3's grid at 6 steps: ..., 0.432 -> 0.0089 -> 0 (the last two deterministic): control ends at 0.432


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    trainer = ElegantTrainer.from_pipeline(tiny_sd3_pipeline(), redness, tiny_config(num_inference_steps=STEPS),
                                           PROMPTS, guidance_scale=3.0, max_sequence_length=16,
                                           base_model="tiny/sd3-random")
    trainer.train()
    out = tmp_path_factory.mktemp("cutoff") / "model"
    trainer.save_pretrained(str(out))
    return trainer, str(out)


def _record_adapter_state(transformer):
    """A forward pre-hook that records ``(timestep, adapters enabled)`` of every transformer call."""
    calls = []
    layer = tuner_layers(transformer)[0]

    def hook(module, args, kwargs):
        t = kwargs.get("timestep")
        calls.append((float(t.flatten()[0]), not layer.disable_adapters))

    return calls, transformer.register_forward_pre_hook(hook, with_kwargs=True)


def test_the_trained_schedule_says_where_control_ends(saved):
    trainer, directory = saved
    end = trainer.schedule.control_end_timestep
    assert end == pytest.approx(1000 * trainer.schedule.control_end_level)
    assert trainer.schedule.control_end_level == pytest.approx(0.432, abs=1e-3)
    card = open(os.path.join(directory, "README.md")).read()
    assert f"ControlCutoff({end:.1f})" in card and "0.432" in card  # the card states it and shows the callback
    assert "pipe.disable_lora()" in card  # and a diffusers-only version of the same callback


def test_stock_pipeline_with_the_cutoff_uses_the_lora_only_above_the_trained_level(saved):
    trainer, directory = saved
    end = trainer.schedule.control_end_timestep
    pipe = tiny_sd3_pipeline()
    pipe.load_lora_weights(directory)
    calls, handle = _record_adapter_state(pipe.transformer)
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=3.0, max_sequence_length=16, output_type="latent",
                  height=16, width=16)
    pipe(PROMPTS[0], generator=torch.Generator().manual_seed(0), callback_on_step_end=ControlCutoff(end), **kwargs)
    handle.remove()
    assert len(calls) == STEPS
    assert [on for _, on in calls] == [t > end for t, _ in calls] == [True] * 4 + [False] * 2
    assert not tuner_layers(pipe.transformer)[0].disable_adapters  # restored after the last step
    # the diffusers-only callback of the model card does the same
    calls, handle = _record_adapter_state(pipe.transformer)

    def trained_levels_only(pipe, i, t, callback_kwargs):
        timesteps = pipe.scheduler.timesteps
        if i + 1 < len(timesteps) and timesteps[i + 1] <= end:
            pipe.disable_lora()
        elif i + 1 == len(timesteps):
            pipe.enable_lora()
        return {}

    pipe(PROMPTS[0], generator=torch.Generator().manual_seed(0), callback_on_step_end=trained_levels_only, **kwargs)
    handle.remove()
    assert [on for _, on in calls] == [True] * 4 + [False] * 2
    assert not tuner_layers(pipe.transformer)[0].disable_adapters


def test_ode_sampling_switches_the_adapter_off_below_the_trained_level(saved):
    _, directory = saved
    pipe = ControlledTextToImage.from_control(directory, pipeline=tiny_sd3_pipeline())
    calls, handle = _record_adapter_state(pipe.pipeline.transformer)
    cut = pipe("a cat", sampler="ode", generator=torch.Generator().manual_seed(1), output_type="latent").images
    handle.remove()
    per_step = [on for _, on in calls[::1]]
    assert per_step == [True] * 4 + [False] * 2
    layer = tuner_layers(pipe.pipeline.transformer)[0]
    assert not layer.disable_adapters  # restored
    everywhere = pipe.pipeline(prompt=["a cat"], generator=torch.Generator().manual_seed(1),
                               **{**pipe.trainer.process.pipeline_kwargs(1, STEPS), "output_type": "latent"}).images
    assert not torch.equal(cut, everywhere)  # the last two calls differ: pretrained there


def test_a_control_covering_every_step_changes_nothing():
    pipe = tiny_sd3_pipeline()
    cutoff = ControlCutoff(None)
    pipe.scheduler.set_timesteps(3)
    assert cutoff(pipe, 0, None, {}) == {} and cutoff._switched == []
