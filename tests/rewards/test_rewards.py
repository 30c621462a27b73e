"""Image rewards: values, gradients, loading (safetensors only) and errors that name the reward."""

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, ViTConfig, ViTForImageClassification

from hf_control_ft.rewards.image_rewards import (
    AestheticHead,
    AestheticReward,
    BrightnessReward,
    ClassifierReward,
    SaturationReward,
    WeightedSumReward,
    call_reward,
)


def images(seed=0, b=3, size=16):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def tiny_clip(seed=0):
    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, projection_dim=16))


def tiny_classifier(seed=0):
    torch.manual_seed(seed)
    return ViTForImageClassification(ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
        num_attention_heads=4, num_labels=3, id2label={0: "zero", 1: "one", 2: "two"},
        label2id={"zero": 0, "one": 1, "two": 2}))


def test_brightness_and_saturation_values_and_gradients():
    x = torch.zeros(2, 3, 4, 4)
    x[0] = 1.0                       # white: brightness 1, chroma 0
    x[1, 0] = 1.0                    # pure red: brightness 0.299, chroma 1
    torch.testing.assert_close(BrightnessReward()(x), torch.tensor([1.0, 0.299]))
    torch.testing.assert_close(SaturationReward()(x), torch.tensor([0.0, 1.0]))
    gray = torch.rand(2, 1, 4, 4)
    torch.testing.assert_close(BrightnessReward()(gray), gray.flatten(1).mean(1))
    torch.testing.assert_close(SaturationReward()(gray), torch.zeros(2))
    y = images().requires_grad_(True)
    BrightnessReward()(y).sum().backward()
    torch.testing.assert_close(y.grad[0, :, 0, 0], torch.tensor([0.299, 0.587, 0.114]) / 256)


def test_weighted_sum_and_errors_name_the_term():
    x = images()
    total = WeightedSumReward({"b": (2.0, BrightnessReward()), "s": (-1.0, SaturationReward())})(x)
    torch.testing.assert_close(total, 2 * BrightnessReward()(x) - SaturationReward()(x))

    def broken(imgs):
        return imgs.mean(dim=(1, 2, 3)) * float("nan")

    with pytest.raises(ValueError, match=r"weighted_sum\(1\*brightness, 1\*broken\): broken.*NaN"):
        WeightedSumReward([(1.0, BrightnessReward()), (1.0, broken)])(x)
    with pytest.raises(ValueError, match="'brightness' expects images of shape"):
        BrightnessReward()(torch.rand(2, 4, 8, 8))


def test_call_reward_passes_prompts_only_to_two_argument_rewards():
    seen = []
    call_reward(lambda imgs, prompts: seen.append(prompts) or imgs.mean((1, 2, 3)), images(), ["a", "b", "c"])
    assert seen == [["a", "b", "c"]]
    out = call_reward(lambda imgs: imgs.mean((1, 2, 3)), images(), ["a", "b", "c"])
    assert out.shape == (3,)


def test_aesthetic_reward_is_differentiable_and_loads_from_safetensors(tmp_path):
    torch.manual_seed(1)
    head = AestheticHead(embed_dim=16)
    reward = AestheticReward(tiny_clip(), head)
    x = images(size=24).requires_grad_(True)
    r = reward(x, ["p"] * 3)
    assert r.shape == (3,) and r.dtype == torch.float32
    r.sum().backward()
    assert x.grad.abs().sum() > 0
    # by hand: CLIP normalisation, embedding normalised to unit length, then the MLP
    with torch.no_grad():
        emb = reward.embed(x)
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
        torch.testing.assert_close(r.detach(), head(emb))
    # loading: a head directory (PyTorchModelHubMixin, safetensors) or a bare .safetensors file
    tiny_clip().save_pretrained(tmp_path / "clip")
    head.save_pretrained(tmp_path / "head")
    save_file(head.state_dict(), str(tmp_path / "head.safetensors"))
    for source in (tmp_path / "head", tmp_path / "head.safetensors"):
        loaded = AestheticReward.from_pretrained(str(source), str(tmp_path / "clip"))
        torch.testing.assert_close(loaded(x.detach()), r.detach())
    (tmp_path / "head.pth").write_bytes(b"not allowed")
    with pytest.raises(ValueError, match="safetensors"):
        AestheticReward.from_pretrained(str(tmp_path / "head.pth"), str(tmp_path / "clip"))
    with pytest.raises(ValueError, match="expects 8-dim embeddings"):
        AestheticReward(tiny_clip(), AestheticHead(embed_dim=8))


def test_classifier_reward_is_the_log_probability_of_the_class(tmp_path):
    model = tiny_classifier()
    reward = ClassifierReward(model, "two")
    assert reward.__name__ == "classifier_logprob[two]"
    x = images(size=32).requires_grad_(True)
    r = reward(x)
    with torch.no_grad():
        logits = model(pixel_values=(x - 0.5) / 0.5).logits
    torch.testing.assert_close(r.detach(), torch.log_softmax(logits, -1)[:, 2])
    r.sum().backward()
    assert x.grad.abs().sum() > 0
    model.save_pretrained(tmp_path / "clf")
    loaded = ClassifierReward.from_pretrained(str(tmp_path / "clf"), 2)
    torch.testing.assert_close(loaded(x.detach()), r.detach())
    with pytest.raises(ValueError, match="'three' is not in the classifier's labels"):
        ClassifierReward(model, "three")
    with pytest.raises(ValueError, match=r"int in \[0, 3\)"):
        ClassifierReward(model, 5)
    # RGB samples for a grayscale classifier (e.g. digits): converted by luma
    gray_model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_channels=1,
                                                     intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                                                     num_labels=10))
    gray_reward = ClassifierReward(gray_model, 7)
    luma = torch.einsum("bchw,c->bhw", x.detach(), torch.tensor([0.299, 0.587, 0.114]))[:, None]
    with torch.no_grad():
        expected = torch.log_softmax(gray_model(pixel_values=(luma - 0.5) / 0.5).logits, -1)[:, 7]
    torch.testing.assert_close(gray_reward(x.detach()), expected)
