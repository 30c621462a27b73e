"""The newer families at the step counts people run (20 steps on their shifted flow schedules, eta 1 and 0.5):
every stochastic step's KL is the closed form of the guided network's means, and the last step is deterministic."""

import pytest
from family_checks import assert_step_kls_are_closed_form, redness, tiny_config

from hf_control_ft import ElegantTrainer
from hf_control_ft.rewards import PerFrameReward
from hf_control_ft.testing import families

CASES = {
    "qwen-image": ("tiny_qwen_image_pipeline", dict(height=32, width=32)),
    "flux2-klein": ("tiny_flux2_klein_pipeline", dict(height=16, width=16, max_sequence_length=32)),
    "z-image": ("tiny_z_image_pipeline", dict(height=16, width=16, max_sequence_length=64)),
    "wan": ("tiny_wan_pipeline", dict(height=32, width=32, num_frames=5, max_sequence_length=16)),
}


@pytest.mark.slow
@pytest.mark.parametrize("eta", [1.0, 0.5])
@pytest.mark.parametrize("family", sorted(CASES))
def test_per_step_kl_is_the_closed_form_at_20_steps(family, eta):
    name, options = CASES[family]
    reward = PerFrameReward(redness) if family == "wan" else redness
    trainer = ElegantTrainer.from_pipeline(getattr(families, name)(), reward,
                                           tiny_config(num_inference_steps=20, eta=eta), ["a red cat", "the sea"],
                                           guidance_scale=4.0, **options)
    schedule = trainer.schedule
    assert len(schedule) == 20 and not schedule.is_stochastic(19) and schedule.is_stochastic(10)
    traj = assert_step_kls_are_closed_form(trainer, ["a red cat", "the sea"])
    assert float(traj.kl_steps[19].abs().max()) == 0.0
