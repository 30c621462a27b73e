"""Rewards on videos (B, F, 3, H, W): built-in image rewards frame by frame with a chosen reduction, a plain image
function wrapped per frame, the CLIP temporal-consistency reward (a still video scores 1, flicker lowers it), and the
registry's ``temporal_consistency`` name; all differentiable."""

import pytest
import torch

from hf_control_ft.rewards import BrightnessReward, PerFrameReward, TemporalConsistencyReward, load_reward
from hf_control_ft.testing import tiny_clip_model


def videos(seed=0):
    return torch.rand(2, 4, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_image_rewards_score_videos_frame_by_frame_with_the_chosen_reduction():
    v = videos()
    per_frame = torch.stack([BrightnessReward()(v[:, f]) for f in range(4)], 1)  # (B, F)
    reward = BrightnessReward()
    torch.testing.assert_close(reward(v), per_frame.mean(1))
    reward.frame_aggregate = "min"
    torch.testing.assert_close(reward(v), per_frame.min(1).values)


def test_per_frame_wrapper_passes_each_frame_its_videos_prompt_and_is_differentiable():
    seen = []

    def red(images, prompts):
        seen.append(list(prompts))
        return images[:, 0].mean(dim=(1, 2))

    v = videos().requires_grad_(True)
    out = PerFrameReward(red, "max")(v, ["cat", "dog"])
    assert seen == [["cat"] * 4 + ["dog"] * 4]
    torch.testing.assert_close(out, v[:, :, 0].mean(dim=(2, 3)).max(1).values)
    out.sum().backward()
    assert v.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="aggregate"):
        PerFrameReward(red, "median")


def test_temporal_consistency_is_one_for_a_still_video_and_lower_with_flicker():
    model, _ = tiny_clip_model()
    reward = TemporalConsistencyReward(model)
    still = videos()[:, :1].expand(-1, 4, -1, -1, -1).contiguous()
    flicker = videos(1)
    torch.testing.assert_close(reward(still), torch.ones(2), rtol=1e-5, atol=1e-5)
    assert bool((reward(flicker) < 0.999).all())
    x = flicker.clone().requires_grad_(True)
    reward(x).sum().backward()
    assert x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="at least 2 frames"):
        reward(videos()[:, :1])


def test_temporal_consistency_by_name_from_a_local_clip(tmp_path):
    model, _ = tiny_clip_model()
    model.save_pretrained(tmp_path / "clip")
    reward = load_reward("temporal_consistency", str(tmp_path / "clip"))
    assert isinstance(reward, TemporalConsistencyReward) and reward(videos()).shape == (2,)
