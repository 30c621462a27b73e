"""Prompt-conditional start law and values (docs/algorithms.md §3): per-condition exactness on a class-conditional
mixture, bit-for-bit save/load of per-prompt start samples, and no change for unconditional models."""

import pytest
import torch
from diffusers import DDIMScheduler

from hf_control_ft import ElegantConfig, ElegantTrainer, InitialNoiseModel
from hf_control_ft.core.control import lora_parameters
from hf_control_ft.pipelines.controlled import ControlledStableDiffusionPipeline
from hf_control_ft.processes import ClassConditionalProcess
from hf_control_ft.tasks.gaussian_mixture import class_conditional_mixtures, distill_mixture_denoiser
from hf_control_ft.testing import ddim, make_mlp_denoiser, tiny_components, tiny_sd_pipeline

PROMPTS = ["a cat", "the dog", "a red car"]


def _mixture_trainer(denoiser_state, scheduler, reward, **kw):
    from hf_control_ft.models.networks import MLPDenoiser

    model = MLPDenoiser(**denoiser_state["config"])
    model.load_state_dict(denoiser_state["weights"])
    cfg = ElegantConfig(alpha=2.0, eta=0.2, num_inference_steps=20, train_steps=40, batch_size=64, learning_rate=1e-3,
                        lora_rank=8, value_num_rollouts=1024, value_train_steps=100, noise_train_steps=50,
                        step_value_train_steps=300, report_to=None, drift_objective="value_guided", **kw)
    process = ClassConditionalProcess(model.requires_grad_(False), scheduler, (2,), cfg, num_classes=3)
    return ElegantTrainer(cfg, reward_fn=reward, process=process)


def _worst_tv(trainer, targets, controlled=True):
    tvs = []
    for label, target in enumerate(targets):
        x = trainer.sample(prompts=torch.full((2048,), label), generator=torch.Generator().manual_seed(label),
                           batch_size=1024, controlled=controlled)
        tvs.append(target.mode_weight_tv(x))
    return max(tvs), tvs


@pytest.mark.slow
def test_conditional_start_law_moves_every_prompt_toward_its_own_target():
    mixtures = class_conditional_mixtures()
    c = torch.tensor([0.5, 0.3])
    targets = [m.tilted_linear(c, 2.0) for m in mixtures]
    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=True)
    den = distill_mixture_denoiser(mixtures, scheduler, steps=400, seed=0)
    state = {"config": {k: v for k, v in dict(den.config).items() if not k.startswith("_")},
             "weights": den.state_dict()}

    def reward(x):
        return x @ c.to(x)

    conditional = _mixture_trainer(state, scheduler, reward)
    pretrained, _ = _worst_tv(conditional, targets, controlled=False)
    conditional.train()
    worst_conditional, per_prompt = _worst_tv(conditional, targets)
    agnostic = _mixture_trainer(state, scheduler, reward, conditional_initial_noise=False)
    agnostic.train()
    worst_agnostic, _ = _worst_tv(agnostic, targets)
    assert conditional.initial_noise.cond_dim == 3 and agnostic.initial_noise.cond_dim == 0
    assert worst_conditional < 0.6 * pretrained, (per_prompt, pretrained)
    assert worst_conditional < worst_agnostic, (worst_conditional, worst_agnostic)


def test_unconditional_models_are_unchanged_by_the_feature():
    def run(flag):
        cfg = ElegantConfig(num_inference_steps=4, train_steps=2, batch_size=8, value_num_rollouts=16,
                            value_train_steps=5, noise_train_steps=3, noise_num_steps=3, aux_hidden=16,
                            report_to=None, conditional_initial_noise=flag)
        trainer = ElegantTrainer(cfg, make_mlp_denoiser(lora=False), ddim(), lambda x: -x.pow(2).sum(1), (2,))
        trainer.train()
        return trainer

    a, b = run(True), run(False)
    assert a.initial_noise.cond_dim == 0 and a.process.condition_dim == 0
    assert all(torch.equal(x, y) for x, y in zip(lora_parameters(a.model), lora_parameters(b.model)))
    assert all(torch.equal(x, y) for x, y in zip(a.initial_noise.parameters(), b.initial_noise.parameters()))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(a.sample(16, g1), b.sample(16, g2))


def test_per_prompt_start_samples_survive_save_and_load_bit_for_bit(tmp_path):
    cfg = ElegantConfig(alpha=0.05, num_inference_steps=3, train_steps=1, batch_size=2, value_num_rollouts=4,
                        value_train_steps=3, noise_train_steps=3, noise_num_steps=2, noise_batch_size=3, aux_hidden=8,
                        lora_rank=2, report_to=None)
    trainer = ElegantTrainer.from_pipeline(tiny_sd_pipeline(), lambda im, p: im.mean((1, 2, 3)), cfg,
                                           prompts=PROMPTS, guidance_scale=2.0)
    trainer.train()
    width = trainer.process.condition_dim
    assert trainer.initial_noise.cond_dim == width == 32
    with torch.no_grad():  # make the conditional drift visibly prompt-dependent
        for p in trainer.initial_noise.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    trainer.save_pretrained(str(tmp_path))
    loaded = InitialNoiseModel.from_pretrained(str(tmp_path / "initial_noise"))
    assert loaded.cond_dim == width
    cond = trainer.process.condition_features(["a cat", "the dog", "a bird on a wire"])  # the last one is unseen
    x = trainer.initial_noise.sample(3, torch.Generator().manual_seed(0), condition=cond)
    y = loaded.sample(3, torch.Generator().manual_seed(0), condition=cond)
    assert torch.equal(x, y) and torch.isfinite(y).all()
    same_noise = [trainer.initial_noise.sample(1, torch.Generator().manual_seed(0), condition=cond[i:i + 1])
                  for i in range(2)]
    assert not torch.equal(same_noise[0], same_noise[1])  # each prompt has its own start law
    # the controlled pipeline draws the same per-prompt start noise and samples as the trainer
    pipe = ControlledStableDiffusionPipeline(**tiny_components()).load_control(str(tmp_path))
    latents = pipe(PROMPTS[:2], generator=torch.Generator().manual_seed(5), output_type="latent").images
    expected = trainer.sample(prompts=PROMPTS[:2], generator=torch.Generator().manual_seed(5))
    assert torch.equal(latents, expected)


def test_class_conditional_process_validates_labels():
    cfg = ElegantConfig(num_inference_steps=4, report_to=None, learn_initial_noise=False)
    model = make_mlp_denoiser(lora=False)
    with pytest.raises(ValueError, match="num_classes"):
        ClassConditionalProcess(model, ddim(), (2,), cfg, num_classes=1)
    process = ClassConditionalProcess(model, ddim(), (2,), cfg, num_classes=3, class_probs=[0.0, 0.0, 1.0])
    assert process.draw_conditions(5, torch.Generator().manual_seed(0)).tolist() == [2] * 5
    with pytest.raises(ValueError, match=r"class labels must be in \[0, 3\)"):
        process.set_conditions([0, 3])
    assert process.condition_features([1]).tolist() == [[0.0, 1.0, 0.0]]
