"""Does ELEGANT's drift reach the optimum of the objective it is given? ``J = E[r] - alpha KL`` along the run.

At every evaluation point of an ELEGANT run (``--every`` drift iterations) ``J`` is estimated on ``--eval_samples``
fresh samples of the fine-tuned chain from the learned start law, with its standard error, next to the optimum
``J* = alpha log E_pre[exp(r / alpha)]`` (from ``--optimum_samples`` pretrained samples of the same sampler), so
``J* - J`` is the path KL to the tilted law times ``alpha`` -- what every setting is judged by. Each row also has
the KL spent at every step of the chain (where the KL goes), the cumulative network evaluations (NFE, sample
evaluations as ``trainers/costs.py`` counts them) and the reward.

Tasks: ``tiny_sd`` (the test-size Stable Diffusion pipeline of ``hf_control_ft.testing``, 10 steps, guidance 7.5,
bf16 weights; r = the decoded images' mean brightness; ``--kl_passes bf16`` trains with ``kl_precision="autocast"``,
``fp32`` with ``"upcast"``, ``delta`` with ``"delta"`` (difference propagation), all evaluated with exact passes; no
known optimum, so no gap), ``digits`` (the 8x8 DDPM of ``benchmarks/finetuner_tasks.py``, 15 steps, r = log p_proxy(3 | x), the shipped
config ``examples/configs/digits_elegant.yaml``) and the exact cases of ``benchmarks/tilted_cases.py``
(``linear_2d``, ``bounded_3d``, ``flow_linear_2d``, ``bump_2d``, ``flow_bump_3d``; ``--eta``, ``--steps``; each point
also has the mode-weight TV to the exact target) and ``rare`` (``benchmarks/seiko_tasks.py``'s rare task with its
true reward, alpha 2, the per-round settings of ``benchmarks/seiko_feedback.py``; each point has the rare mode's
weight). With ``--elegant use_ema=true`` every point measures the moving average of the weights.
``--init_from_floor`` (exact cases) starts the drift at the discretisation floor's adapter and ``--tilted_fit N``
(digits) at the maximum-likelihood fit to exact tilted paths (``benchmarks/tilted_fit.py``); both print their
starting point as iteration 0.
``--proximal BETA EVERY`` adds ``BETA`` times the KL to the control frozen every ``EVERY`` iterations (a proximal
outer loop, ``benchmarks/proximal.py``).
``--elegant KEY=VALUE`` overrides config fields (``batch_size=64 train_steps=60``: the same NFE at a larger batch);
``--optimizer sgd`` swaps AdamW for SGD with momentum 0.9 (a measurement only: not a library option).

``--kl_passes bf16|fp16`` trains with every denoiser call (the rollouts and the fine-tuned / pretrained passes whose
difference is the KL) under CPU / CUDA autocast in that dtype -- what GRPO-style trainers do -- while every
evaluation point measures the result with fp32 passes: the exact path KL of what was trained. Each point also gives
the LoRA gradient of the drift loss computed in the training mode against fp32 passes on the same stored
trajectory (``grad_rel_err``, ``grad_cos``): does a half-precision KL's gradient point where the exact one does?

    OMP_NUM_THREADS=1 python benchmarks/elegant_objective.py --task digits --seeds 0 1 2 > j_digits.jsonl
    python benchmarks/elegant_objective.py --task digits --kl_passes bf16 --seeds 0 1 2
    python benchmarks/elegant_objective.py --task digits --elegant batch_size=64 train_steps=60 --every 10
    python benchmarks/elegant_objective.py --from_json j_digits.jsonl j_b64.jsonl --png docs/figures/j_digits.png
    python benchmarks/elegant_objective.py --quick                   # a smoke test (seconds)

Prints one JSON object per evaluation point, then one per run (``"final": true``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hf_control_ft import ElegantConfig, ElegantTrainer  # noqa: E402
from hf_control_ft.trainers.costs import network_evaluations  # noqa: E402
from hf_control_ft.utils.config_cli import parse_flags  # noqa: E402

EXACT = ("linear_2d", "bounded_3d", "flow_linear_2d", "bump_2d", "flow_bump_3d")
_CASES: dict = {}  # the exact cases built (their targets give each point's mode-weight TV)


def _case(args) -> dict:
    return _CASES[args.task]


def build(args, seed: int):
    """``(trainer, reward_fn)`` of the task with ``--elegant`` overrides."""
    flags = {f.name: f for f in dataclasses.fields(ElegantConfig)}
    overrides, _ = parse_flags(flags, ["--" + item for item in args.elegant or []])
    overrides = {k: [m.strip() for m in v.strip("[]").split(",")] if isinstance(v, str) and v.startswith("[") else v
                 for k, v in overrides.items()}  # lora_target_modules=[to_q,to_k]
    if args.task == "tiny_sd":
        from hf_control_ft.testing import tiny_sd_pipeline

        fields = dict(alpha=3e-4, eta=1.0, num_inference_steps=10, learn_initial_noise=False, batch_size=8,
                      train_steps=60, learning_rate=1e-3, lora_rank=4, drift_objective="pathwise", seed=seed,
                      report_to=None)
        if args.quick:
            fields.update(train_steps=4, batch_size=2)
        cfg = ElegantConfig.from_dict({**fields, **overrides})
        trainer = ElegantTrainer.from_pipeline(
            tiny_sd_pipeline(), _brightness, cfg, prompts=["a cat", "a red car", "a dog", "a house"],
            guidance_scale=7.5, mixed_precision="bf16",
            kl_precision={"fp32": "upcast", "delta": "delta"}.get(args.kl_passes, "autocast"))
        return trainer, trainer.reward_fn
    if args.task == "digits":
        from finetuner_tasks import DigitsComparison

        task = DigitsComparison(quick=args.quick).build()
        fields = {**task.base_config.to_dict(), "seed": seed, "output_dir": None, "report_to": None,
                  "checkpointing_steps": 0, "train_steps": 240}  # the budget of benchmarks/digits_fidelity.py
        if args.quick:
            fields.update(value_num_rollouts=64, value_train_steps=20, noise_train_steps=10, train_steps=4)
        cfg = ElegantConfig.from_dict({**fields, **overrides})
        return ElegantTrainer(cfg, model=task.new_model(), scheduler=task.scheduler, reward_fn=task.reward,
                              sample_shape=task.shape), task.reward
    if args.task == "rare":  # the SEIKO rare task with its true reward (benchmarks/seiko_rare_ceiling.py's setting)
        import copy

        from seiko_feedback import UPDATE_SETTINGS
        from seiko_tasks import RareTask

        task = RareTask()
        task.build()
        f = task.config_fields()
        fields = dict(alpha=2.0, num_inference_steps=f["num_inference_steps"], train_steps=30,
                      batch_size=f["batch_size"], learning_rate=f["learning_rate"], lora_rank=f["lora_rank"],
                      value_num_rollouts=f["value_num_rollouts"], seed=seed, output_dir=None, **UPDATE_SETTINGS)
        cfg = ElegantConfig.from_dict({**fields, **overrides})
        _CASES["rare"] = {"rare_task": task}
        return ElegantTrainer(cfg, model=copy.deepcopy(task.model), scheduler=task.scheduler,
                              reward_fn=task.true_reward, sample_shape=task.sample_shape), task.true_reward
    from tilted_cases import build_case, load_denoiser

    case = build_case(args.task, distill_steps=100 if args.quick else 1500,
                      num_reference=20_000 if args.quick else 1_000_000)
    _CASES[args.task] = case
    eta = args.eta if args.eta is not None else case["etas"][0]
    fields = dict(alpha=case["alpha"], eta=eta, num_inference_steps=args.steps or 50, train_steps=400,
                  batch_size=128, learning_rate=1e-3, lora_rank=8, seed=seed, value_num_rollouts=4096,
                  report_to=None)
    if args.quick:
        fields.update(num_inference_steps=10, train_steps=4, batch_size=16, value_num_rollouts=128,
                      value_train_steps=20, noise_train_steps=10, step_value_train_steps=20)
    cfg = ElegantConfig.from_dict({**fields, **overrides})
    dim = case["mixture"].dim
    return ElegantTrainer(cfg, load_denoiser(case["denoiser_state"]), case["scheduler"], case["reward"], (dim,)), \
        case["reward"]


class HalfPrecisionPasses:
    """Runs every call of ``model`` under autocast to ``dtype`` while :attr:`active` (forward hooks on the top-level
    module; the backward of an autocast op keeps its dtypes, so gradients carry the same rounding)."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        self.dtype, self.active, self._contexts = dtype, True, []
        model.register_forward_pre_hook(self._enter)
        model.register_forward_hook(self._exit)

    @contextlib.contextmanager
    def set(self, active: bool):
        """``active`` inside the block, the previous state after."""
        previous, self.active = self.active, active
        try:
            yield
        finally:
            self.active = previous

    def _enter(self, module, args):
        if self.active:
            device = next(module.parameters()).device.type
            ctx = torch.autocast(device_type=device, dtype=self.dtype)
            ctx.__enter__()
            self._contexts.append(ctx)
        else:
            self._contexts.append(None)

    def _exit(self, module, args, output):
        ctx = self._contexts.pop()
        if ctx is not None:
            ctx.__exit__(None, None, None)
            return _to_float(output)
        return output


def _to_float(output):
    if torch.is_tensor(output):
        return output.float()
    if hasattr(output, "sample"):  # diffusers' UNet2DOutput
        output.sample = output.sample.float()
        return output
    if isinstance(output, tuple):
        return tuple(_to_float(o) for o in output)
    return output


def gradient_error(trainer, exact, training, batch: int = 64, seed: int = 7) -> dict:
    """The drift loss's LoRA gradient (``mean(-r + alpha KL)``) computed with the training mode's passes (every network
    call inside ``training()``) against exact passes (inside ``exact()``), both on one trajectory rolled out with
    exact passes: only the backward sweep's recomputation differs."""
    from hf_control_ft.core.control import lora_parameters

    params = [p for p in lora_parameters(trainer.model) if p.requires_grad]
    gen = torch.Generator().manual_seed(seed)
    trainer.process.prepare_batch(batch, gen)
    x_T, _ = trainer.draw_initial_noise(batch, gen, trainer.batch_condition())
    with torch.no_grad(), exact():
        traj = trainer.sampler.rollout(x_T, gen)
    _, dr = trainer.reward_and_gradient(traj.samples)
    grads = []
    for context in (exact, training):
        for p in params:
            p.grad = None
        with context():
            trainer.sampler.backpropagate(traj, -dr / batch, trainer.config.alpha / batch)
        grads.append(torch.cat([p.grad.flatten().double() for p in params]))
    for p in params:
        p.grad = None
    exact_grad, half = grads
    return {"grad_rel_err": round(float((half - exact_grad).norm() / exact_grad.norm()), 5),
            "grad_cos": round(float(torch.nn.functional.cosine_similarity(half, exact_grad, dim=0)), 5)}


def _brightness(images, prompts=None):
    """The tiny SD task's reward: mean brightness of the decoded images, ``(B,)``."""
    return images.float().mean(dim=(1, 2, 3))


def optimum(trainer, reward_fn, n: int, seed: int = 1234) -> tuple[float, float, float]:
    """``(J*, its standard error, the pretrained model's J = E[r])``: ``J* = alpha log mean exp(r / alpha)`` over
    ``n`` pretrained samples (standard error by the delta method)."""
    alpha = trainer.config.alpha
    x = trainer.sample(n, generator=torch.Generator().manual_seed(seed), batch_size=1024, controlled=False)
    with torch.no_grad():
        w = (reward_fn(x).double() / alpha)
    m = float(w.max())
    e = (w - m).exp()
    j = alpha * (m + math.log(float(e.mean())))
    return j, alpha * float(e.std() / e.mean()) / math.sqrt(n), alpha * float(w.mean())


@torch.no_grad()
def evaluate(trainer, reward_fn, n: int, seed: int = 99, case: dict | None = None) -> dict:
    """``J``, its standard error, reward, KLs and the per-step KL on ``n`` samples of the fine-tuned chain."""
    gen = torch.Generator().manual_seed(seed)
    rs, kls, inits, steps, samples = [], [], [], [], []
    batch = min(n, 512)
    exact = trainer.process.exact_kl_context() or contextlib.nullcontext  # half-precision passes: measured exactly
    average = trainer.ema.applied() if trainer.ema is not None else contextlib.nullcontext()  # --use_ema
    with average:
        for start in range(0, n, batch):
            _evaluate_batch(trainer, reward_fn, min(batch, n - start), gen, exact, rs, kls, inits, steps, samples)
    r, kl, kl_init = torch.cat(rs), torch.cat(kls), torch.cat(inits)
    j = r - trainer.config.alpha * (kl + kl_init)
    out = {"J": float(j.mean()), "J_se": float(j.std() / math.sqrt(len(j))), "reward": float(r.mean()),
           "kl": float(kl.mean()), "kl_init": float(kl_init.mean()),
           "kl_steps": [round(float(v), 4) for v in torch.stack(steps).sum(0) / len(r)]}
    if case is not None and "rare_task" in case:  # the rare mode's weight
        out["rare_mode_weight"] = case["rare_task"].evaluate(torch.cat(samples))["rare_mode_weight"]
    elif case is not None:  # an exact case: the mode weights' distance to the target's
        from tilted_cases import evaluate as mode_weights

        out["tv"] = mode_weights(case["target"], torch.cat(samples))["tv"]
    return out


def _evaluate_batch(trainer, reward_fn, b: int, gen, exact, rs, kls, inits, steps, samples) -> None:
    trainer.process.prepare_batch(b, gen)
    x_T, kl_init = trainer.draw_initial_noise(b, gen, trainer.batch_condition())
    with exact():
        traj = trainer.sampler.rollout(x_T, gen, measure_kl=True)
    rs.append(reward_fn(traj.samples).double())
    samples.append(traj.samples)
    kls.append(traj.kl.double())
    inits.append(kl_init.double())
    steps.append(traj.kl_steps.double().sum(1))


def run(args, seed: int) -> dict:
    torch.manual_seed(seed)
    trainer, reward_fn = build(args, seed)
    cfg = trainer.config
    if args.optimizer == "sgd":
        from diffusers.optimization import get_scheduler

        def sgd(params):
            opt = torch.optim.SGD(params, lr=cfg.learning_rate, momentum=0.9)
            return opt, get_scheduler(cfg.lr_scheduler, opt, num_warmup_steps=cfg.lr_warmup_steps,
                                      num_training_steps=cfg.train_steps)

        trainer.make_optimizer = sgd
    passes = None
    if args.kl_passes == "delta" and args.task != "tiny_sd":
        raise SystemExit("--kl_passes delta: a text-to-image process's kl_precision; use --task tiny_sd")
    if args.kl_passes != "fp32" and args.task != "tiny_sd":  # tiny_sd: the process's own kl_precision
        passes = HalfPrecisionPasses(trainer.model, {"bf16": torch.bfloat16, "fp16": torch.float16}[args.kl_passes])
        passes.active = False
    j_star, j_star_se, j_pre = (math.nan,) * 3 if args.task == "tiny_sd" else optimum(trainer, reward_fn,
                                                                                       args.optimum_samples)
    trainer.optimum = None if args.task == "tiny_sd" else j_star
    costs = network_evaluations(cfg)
    per_iteration = (costs["drift_forward"] + costs["drift_backward"]) / cfg.train_steps
    before = costs["stage1_forward"] + costs["step_values_forward"]
    label = args.label or " ".join(args.elegant or []) or "default"
    head = {"task": args.task, "label": label, "seed": seed, "optimizer": args.optimizer,
            "drift_objective": cfg.drift_objective, "eta": cfg.eta, "steps": cfg.num_inference_steps,
            "kl_passes": args.kl_passes,
            "J_star": round(j_star, 4), "J_star_se": round(j_star_se, 4), "J_pretrained": round(j_pre, 4)}
    rows = []

    def point(step: int, extra: dict | None = None) -> None:
        if passes is not None:
            passes.active = False  # measured with fp32 passes: the exact KL of what was trained
        row = {**head, "step": step, "nfe": int(before + per_iteration * step), **evaluate(trainer, reward_fn,
                                                                                          args.eval_samples,
                                                                                          case=_CASES.get(args.task))}
        if passes is not None:
            row.update(gradient_error(trainer, lambda: passes.set(False), lambda: passes.set(True)))
            passes.active = True  # training goes on in the half-precision passes
        elif trainer.process.exact_kl_context() is not None:  # tiny_sd trained with kl_precision="autocast"
            row.update(gradient_error(trainer, trainer.process.exact_kl_context(), contextlib.nullcontext, batch=8))
        row["gap"] = round(j_star - row["J"], 4)
        row.update(extra or {})
        rows.append(row)
        print(json.dumps(row), flush=True)

    t0 = time.perf_counter()
    if args.tilted_fit:  # the drift starts from the fit to exact tilted paths (benchmarks/tilted_fit.py)
        from tilted_fit import fit_control, tilted_paths

        make_optimizer = trainer.make_optimizer

        def fitted_then_optimizer(params):
            gen = torch.Generator().manual_seed(10_000 + seed)
            paths = tilted_paths(trainer, reward_fn, args.tilted_fit, gen)
            info = fit_control(trainer, paths, args.tilted_fit_iterations, 64, args.tilted_fit_lr, gen)
            point(0, {"tilted_fit": info})
            return make_optimizer(params)

        trainer.make_optimizer = fitted_then_optimizer
    if args.init_from_floor:  # exact cases: the drift starts at the discretisation floor's adapter
        from tilted_cases import discretisation_floor

        make_optimizer_ = trainer.make_optimizer

        def floor_then_optimizer(params):
            state = {}
            floor = discretisation_floor(_case(args), cfg.eta, cfg.num_inference_steps, seed=seed, lora_state=state)
            named = dict(trainer.model.named_parameters())
            with torch.no_grad():
                for name, value in state.items():
                    named[name].copy_(value)
            point(0, {"floor_tv_from_normal_start": floor["tv"]})
            return make_optimizer_(params)

        trainer.make_optimizer = floor_then_optimizer

    refresh = None
    if args.proximal:  # mirror descent on the path law (benchmarks/proximal.py)
        from proximal import attach_proximal

        beta, every = args.proximal[0], int(args.proximal[1])
        refresh = attach_proximal(trainer, beta, every)
        head["proximal"] = {"beta": beta, "every": every}
        # the anchor's chain: one more forward pass per random step of every rollout
        per_iteration += cfg.batch_size * cfg.gradient_accumulation_steps * len(trainer.sampler.schedule.random_steps())
    if passes is not None:
        passes.active = True

    def callback(t, step):
        if refresh is not None:
            refresh(step)
        if step % args.every == 0 or step == cfg.train_steps:
            point(step)

    trainer.train(callback=callback)
    final = {**head, "final": True, "gap": rows[-1]["gap"], "J": rows[-1]["J"], "J_se": rows[-1]["J_se"],
             "kl": rows[-1]["kl"], "kl_init": rows[-1]["kl_init"], "reward": rows[-1]["reward"],
             "nfe": rows[-1]["nfe"], "seconds": round(time.perf_counter() - t0, 1),
             "drift_objective": cfg.drift_objective}
    print(json.dumps(final), flush=True)
    return final


def plot(paths: list[str], png: str) -> None:
    """``J* - J`` against NFE, one line per (label, seed), from earlier outputs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for p in paths for line in open(p) if line.startswith("{")]
    series: dict = {}
    for r in rows:
        if not r.get("final"):
            series.setdefault((r["task"], r["label"]), {}).setdefault(r["seed"], []).append((r["nfe"], r["gap"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, ((task, label), seeds) in enumerate(sorted(series.items())):
        for j, (seed, pts) in enumerate(sorted(seeds.items())):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=f"C{i}", alpha=0.8,
                    label=f"{task}: {label}" if j == 0 else None)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("network sample evaluations")
    ax.set_ylabel("J* - J  (alpha x path KL to the tilted law)")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="digits", choices=["digits", "tiny_sd", "rare", *EXACT])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--elegant", nargs="+", default=None, metavar="KEY=VALUE")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    p.add_argument("--kl_passes", default="fp32", choices=["fp32", "bf16", "fp16", "delta"],
                   help="the dtype of every denoiser call while training (evaluation always uses fp32 passes)")
    p.add_argument("--eta", type=float, default=None, help="exact cases: the sampler's eta (default: the case's first)")
    p.add_argument("--steps", type=int, default=None, help="exact cases: sampling steps (default 50)")
    p.add_argument("--every", type=int, default=30, help="drift iterations between evaluations")
    p.add_argument("--eval_samples", type=int, default=1024)
    p.add_argument("--optimum_samples", type=int, default=8192)
    p.add_argument("--label", default=None)
    p.add_argument("--tilted_fit", type=int, default=0, metavar="ROLLOUTS",
                   help="digits: start the drift from the maximum-likelihood fit to the accepted paths of ROLLOUTS "
                        "pretrained rollouts (exact tilted paths; benchmarks/tilted_fit.py)")
    p.add_argument("--tilted_fit_iterations", type=int, default=400)
    p.add_argument("--init_from_floor", action="store_true",
                   help="exact cases: start the drift at the discretisation floor's adapter (its J at iteration 0)")
    p.add_argument("--proximal", type=float, nargs=2, default=None, metavar=("BETA", "EVERY"),
                   help="pathwise: add BETA x the KL to the control frozen every EVERY iterations (mirror descent; "
                        "benchmarks/proximal.py)")
    p.add_argument("--tilted_fit_lr", type=float, default=5e-3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--from_json", nargs="+", default=None, help="plot earlier outputs instead of running")
    p.add_argument("--png", default=None)
    args = p.parse_args(argv)
    if args.from_json:
        plot(args.from_json, args.png or "j_curves.png")
        return
    if args.quick:
        args.every, args.eval_samples, args.optimum_samples = 2, 64, 256
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    for seed in args.seeds:
        run(args, seed)


if __name__ == "__main__":
    main()
