"""Shared pieces of the per-family process tests (tests/processes/): a tiny config, a reward, and the check that
the sampler's per-step KL is the closed form on the family's guided network."""

import torch

from hf_control_ft import ElegantConfig
from hf_control_ft.core.control import pretrained_mode
from hf_control_ft.core.kl import gaussian_kl
from hf_control_ft.testing import scale_lora


def tiny_config(cls=ElegantConfig, **kw):
    base = dict(alpha=0.05, eta=0.5, num_inference_steps=4, train_steps=2, batch_size=2, value_num_rollouts=4,
                value_train_steps=2, noise_train_steps=2, noise_batch_size=4, aux_hidden=8, learning_rate=5e-2,
                lora_rank=2, report_to=None)
    base.update(kw)
    return cls(**base)


def redness(images, prompts):
    return images[:, 0].mean(dim=(1, 2)) - images[:, 1:].mean(dim=(1, 2, 3))


def mean_image_oracle(images, prompts):
    return images.mean(dim=(1, 2, 3)).tolist()


def assert_step_kls_are_closed_form(trainer, prompts, rtol=2e-3, atol=1e-6):
    """After scaling the LoRA up, every step's KL of a measured rollout equals ``gaussian_kl`` of the fine-tuned
    and pretrained means of the guided network (summed over every latent dimension)."""
    scale_lora(trainer.process.lora_model, 0.2, seed=3)
    trainer.process.set_conditions(prompts)
    g = torch.Generator().manual_seed(0)
    traj = trainer.sampler.rollout(torch.randn((len(prompts), *trainer.sample_shape), generator=g), g, measure_kl=True)
    schedule, net = trainer.schedule, trainer.process.model
    for k in range(len(schedule)):
        if not schedule.is_stochastic(k):
            continue
        x, t = traj.states[k], schedule.timestep(k).expand(len(prompts))
        with torch.no_grad():
            mu_ft = schedule.mean(net(x, t), x, k)
            with pretrained_mode(trainer.process.lora_model):
                mu_pre = schedule.mean(net(x, t), x, k)
        torch.testing.assert_close(traj.kl_steps[k], gaussian_kl(mu_ft, mu_pre, schedule.std[k]), rtol=rtol, atol=atol)
    assert float(traj.kl.min()) > 0
    return traj


def train_save_and_reload(trainer, make_pipeline, fingerprint, network_of, directory, prompts) -> str:
    """Trains (the LoRA moves, the KL is positive), saves to ``directory``, checks that the family's stock
    ``load_lora_weights`` on a fresh pipeline reproduces the trained network exactly (and differs from the base)
    and that ``ElegantTrainer.from_pretrained`` reproduces the samples; returns the model card's text.

    ``fingerprint(network)``: the network's output on fixed inputs; ``network_of(pipeline)``: its UNet or
    transformer."""
    import os

    from hf_control_ft import ElegantTrainer
    from hf_control_ft.core.control import lora_parameters

    before = [p.detach().clone() for p in lora_parameters(trainer.model)]
    summary = trainer.train()
    assert summary["train/kl"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, lora_parameters(trainer.model)))
    trainer.save_pretrained(str(directory))
    stock = make_pipeline()
    base = fingerprint(network_of(stock))
    stock.load_lora_weights(str(directory))  # the family pipeline's own loader
    ours = fingerprint(trainer.process.lora_model)
    assert torch.equal(fingerprint(network_of(stock)), ours)
    assert not torch.allclose(base, ours, atol=1e-6)
    again = ElegantTrainer.from_pretrained(str(directory), pipeline=make_pipeline())
    torch.testing.assert_close(again.sample(prompts=prompts, generator=torch.Generator().manual_seed(0)),
                               trainer.sample(prompts=prompts, generator=torch.Generator().manual_seed(0)))
    return open(os.path.join(directory, "README.md")).read()


def run_one_seiko_round(pipeline, prompts, options: dict, directory, oracle=mean_image_oracle):
    """One SEIKO round of 4 queries (3 steps, 1 drift iteration) on a tiny family pipeline: ``(trainer, metrics)``."""
    from hf_control_ft import SeikoConfig, SeikoTrainer

    cfg = tiny_config(SeikoConfig, num_rounds=1, queries_per_round=4, num_inference_steps=3, train_steps=1,
                      reward_train_steps=3, output_dir=str(directory))
    trainer = SeikoTrainer.from_pipeline(pipeline, oracle, cfg, prompts, **options)
    return trainer, trainer.train()
