"""Image rewards: values, gradients, loading (safetensors only) and errors that name the reward."""

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, ViTConfig, ViTForImageClassification

from hf_control_ft.rewards.image_rewards import (
    CLIP_MEAN,
    CLIP_STD,
    AestheticHead,
    AestheticReward,
    BrightnessReward,
    ClassifierReward,
    SaturationReward,
    WeightedSumReward,
    call_reward,
    preprocess_for_vision_model,
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


# ----------------------------------------------------------------------------- CLIP rewards and the registry
def _save_tiny_clip(path):
    from hf_control_ft.testing import tiny_clip_model

    model, tokenizer = tiny_clip_model()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer


def test_pickscore_and_clipscore_are_prompt_conditional_cosines_with_gradients(tmp_path):
    from hf_control_ft.rewards import CLIPScoreReward, PickScoreReward, load_reward

    model, tokenizer = _save_tiny_clip(tmp_path / "clip")
    images = torch.rand(3, 3, 24, 24, generator=torch.Generator().manual_seed(0), requires_grad=True)
    prompts = ["a cat", "the dog", "a cat"]
    pick = load_reward("pickscore", model_name_or_path=str(tmp_path / "clip"))
    clip = load_reward("clipscore", model_name_or_path=str(tmp_path / "clip"))
    assert isinstance(pick, PickScoreReward) and isinstance(clip, CLIPScoreReward)
    # the same numbers as CLIPModel's own logits on the processor-equivalent pixels
    with torch.no_grad():
        pixels = preprocess_for_vision_model(images, 32, CLIP_MEAN, CLIP_STD)
        tok = tokenizer(prompts, padding=True, return_tensors="pt")
        logits = model(input_ids=tok.input_ids, attention_mask=tok.attention_mask, pixel_values=pixels).logits_per_image
    expected = torch.diagonal(logits)  # exp(logit_scale) * cos(image_i, prompt_i)
    p = pick(images, prompts)
    torch.testing.assert_close(p, expected, rtol=1e-4, atol=1e-4)
    c = clip(images, prompts)
    torch.testing.assert_close(c, 100 * expected / model.logit_scale.exp(), rtol=1e-4, atol=1e-4)
    assert p.shape == (3,) and abs(p[0] - p[2]) > 0  # same prompt, different images
    p.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="prompt-conditional"):
        clip(images, None)


def test_aesthetic_head_loads_the_laion_pth_with_weights_only(tmp_path):
    from hf_control_ft.rewards import AestheticHead, AestheticReward, load_reward

    _save_tiny_clip(tmp_path / "clip")
    torch.manual_seed(3)
    head = AestheticHead(embed_dim=16)
    torch.save(head.state_dict(), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")  # the form LAION distributes
    reward = load_reward("aesthetic", model_name_or_path=str(tmp_path / "clip"),
                         aesthetic_head=str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth"))
    assert isinstance(reward, AestheticReward)
    for a, b in zip(head.state_dict().values(), reward.head.state_dict().values()):
        assert torch.equal(a, b)
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    out = reward(images)
    out.sum().backward()
    assert out.shape == (2,) and images.grad.abs().sum() > 0
    # a pickle that is more than tensors is refused (weights_only), never executed
    torch.save({"layers.0.weight": torch.zeros(1024, 16), "extra": object()}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="weights_only"):
        AestheticHead.from_file(str(tmp_path / "bad.pth"))


def test_reward_specs_name_builtins_files_and_modules_and_fail_clearly(tmp_path):
    from hf_control_ft.rewards import BrightnessReward, RewardSpecError, check_spec, load_reward

    assert isinstance(load_reward("brightness"), BrightnessReward)
    f = tmp_path / "my_reward.py"
    f.write_text("import torch\n\ndef redness(images, prompts=None):\n    return images[:, 0].mean(dim=(1, 2))\n")
    fn = load_reward(f"{f}:redness")
    x = torch.zeros(2, 3, 4, 4)
    x[0, 0] = 1
    assert fn(x).tolist() == [1.0, 0.0] and fn.__name__ == "redness"
    assert load_reward("hf_control_ft.rewards.image_rewards:BrightnessReward") is BrightnessReward
    cases = {"nonsense": "neither a built-in", f"{tmp_path}/missing.py:f": "does not exist",
             f"{f}:bluenes": "has no 'bluenes'", "no_such_module_xyz:f": "cannot import module",
             "aesthetic": "needs --aesthetic_head"}
    for spec, message in cases.items():
        with pytest.raises(RewardSpecError, match=message):
            check_spec(spec)
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(RewardSpecError, match="importing .* failed: RuntimeError: boom"):
        check_spec(f"{broken}:f")


def test_aesthetic_head_downloads_from_a_hub_file(tmp_path, monkeypatch):
    """``--aesthetic_head owner/repo/file.pth``: the LAION .pth as published in a Hub repo, fetched with
    huggingface_hub (an in-process Hub here) and read with weights_only."""
    import io

    import huggingface_hub.constants as hub_constants
    from hub_server import HubServer
    from huggingface_hub import HfApi

    from hf_control_ft.rewards import AestheticHead, load_reward
    from hf_control_ft.rewards.image_rewards import hub_weights_file
    from hf_control_ft.rewards.registry import AESTHETIC_HEAD_ON_HUB

    assert hub_weights_file(AESTHETIC_HEAD_ON_HUB) == ("camenduru/improved-aesthetic-predictor",
                                                       "sac+logos+ava1-l14-linearMSE.pth")
    assert hub_weights_file("me/repo/sub/head.safetensors") == ("me/repo", "sub/head.safetensors")
    for local in ("head.pth", "outputs/head.pth", "./a/b/head.pth", "/abs/a/head.pth", "me/repo/notes.txt"):
        assert hub_weights_file(local) is None
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_DISABLE_XET", True)
    _save_tiny_clip(tmp_path / "clip")
    torch.manual_seed(5)
    head = AestheticHead(embed_dim=16)
    buffer = io.BytesIO()
    torch.save(head.state_dict(), buffer)
    with HubServer() as hub:
        api = HfApi(endpoint=hub.url, token="hf_x")
        api.create_repo("laion/aesthetic")
        api.upload_file(path_or_fileobj=buffer.getvalue(), path_in_repo="sac+logos+ava1-l14-linearMSE.pth",
                        repo_id="laion/aesthetic")
        reward = load_reward("aesthetic", model_name_or_path=str(tmp_path / "clip"),
                             aesthetic_head="laion/aesthetic/sac+logos+ava1-l14-linearMSE.pth", endpoint=hub.url,
                             cache_dir=str(tmp_path / "cache"))
    for a, b in zip(head.state_dict().values(), reward.head.state_dict().values()):
        assert torch.equal(a, b)
    assert reward(torch.rand(2, 3, 32, 32)).shape == (2,)
