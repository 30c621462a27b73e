"""The ``hf-control-ft`` command line: look at and measure a saved control (a directory or a Hub repo id), serve
the rating page of a SEIKO run, serve a reward over HTTP.

    hf-control-ft sample   outputs/digits-elegant --num_samples 64 --output grid.png
    hf-control-ft sample   me/elegant-sd15 --prompt "a photo of a cat" --num_samples 4 --output cats.png
    hf-control-ft evaluate me/elegant-sd15 --reward pickscore --prompt "a photo of a cat" --num_samples 16
    hf-control-ft evaluate outputs/digits-elegant --num_samples 512          # digits metrics (task.json)
    hf-control-ft rate     outputs/seiko-sd15 --raters alice bob             # the rating page of a SEIKO run
    hf-control-ft serve-reward --reward pickscore --port 8000                # for --oracle http://host:8000/score

The base model is ``--base_model``, else the Hub id the save records (``stable_diffusion.json`` of a pipeline
run), else for the digits job (``task.json``) the digits model in ``--cache_dir``: a save never names a path of
the machine it was made on, and none is used. ``evaluate`` samples the
base model (from ``N(0, I)``, no adapter) and the fine-tuned one (learned initial noise + control) with the same
seed and reports the reward's mean and standard deviation and the mean pairwise distance of the samples
(diversity), or, for the digits job, its proxy / genuine classifier metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from .utils.errors import error_line, exit_with_error

TASK_FILE = "task.json"


def read_task(directory: str) -> dict:
    path = os.path.join(directory, TASK_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def resolve(adapter: str, token: str | None = None, revision: str | None = None, endpoint: str | None = None) -> str:
    """A local save directory as is, else the snapshot of the Hub repo ``adapter``."""
    from .serialization.saved import resolve_directory

    if os.path.isdir(adapter):
        return adapter
    if os.path.exists(adapter) or adapter.count("/") != 1:
        exit_with_error(f"{adapter!r} is neither a saved directory nor a Hub repo id (owner/name)")
    try:
        return resolve_directory(adapter, token=token, revision=revision, endpoint=endpoint)
    except Exception as err:  # noqa: BLE001 - unreachable Hub, missing repo: one line
        exit_with_error(f"cannot download {adapter!r} from the Hub: {error_line(err)}")


def load_trainer(directory: str, base_model: str | None, token: str | None = None, cache_dir: str | None = None):
    """An ``ElegantTrainer`` (inference use) on a fresh base pipeline with the saved control.

    The base model is ``base_model``, else the Hub id the save records, else (a digits save) the digits model
    of this machine's ``cache_dir``. A path recorded by the publisher is never used."""
    from .processes.loading import load_base_pipeline
    from .processes.stable_diffusion import load_options
    from .serialization.saved import published_base_model, read_saved
    from .trainers.elegant import ElegantTrainer

    try:
        saved = read_saved(directory)
    except (FileNotFoundError, ValueError) as err:
        exit_with_error(str(err))
    pipeline_run = saved["options_path"] is not None
    dtype = None
    if pipeline_run:
        from .processes.options import load_dtype

        options = load_options(directory)
        recorded = published_base_model(options.base_model, given_as_id=True)  # ids only
        dtype = load_dtype(options.kl_precision, options.mixed_precision)  # the dtypes the process keeps
    elif read_task(directory).get("task") == "digits":
        from .tasks import digits

        recorded = digits.digits_pipeline_path(cache_dir)
    else:
        recorded = None
    base = base_model or recorded
    if not base:
        exit_with_error(f"no base model: pass --base_model (a Hub id or a local diffusers pipeline directory); "
                        f"{directory} does not record one")
    try:
        pipe = load_base_pipeline(base, token=token, **({"torch_dtype": dtype} if dtype is not None else {}))
    except Exception as err:  # noqa: BLE001
        exit_with_error(f"cannot load the base model {base!r}: {error_line(err)} (pass --base_model)")
    if pipeline_run:
        return ElegantTrainer.from_pretrained(directory, pipeline=pipe, report_to=None), True
    return ElegantTrainer.from_pretrained(directory, pipe.unet, pipe.scheduler, report_to=None), False


def draw(trainer, conditional: bool, args, controlled: bool) -> tuple[torch.Tensor, list | None]:
    """``num_samples`` samples (images in ``[0, 1]`` for a pipeline run) and their prompts."""
    gen = torch.Generator().manual_seed(args.seed)
    if conditional:
        given = list(args.prompt or [])
        if getattr(args, "prompts_file", None):
            try:
                with open(args.prompts_file, encoding="utf-8") as fh:
                    given += [line.strip() for line in fh if line.strip()]
            except OSError as err:
                exit_with_error(f"--prompts_file {args.prompts_file!r}: {err.strerror}")
        if not given:
            exit_with_error("this is a text-to-image control: pass --prompt (one or more) or --prompts_file")
        prompts = [given[i % len(given)] for i in range(args.num_samples)]
        latents = trainer.sample(prompts=prompts, generator=gen, controlled=controlled, batch_size=args.batch_size)
        return trainer.decode(latents).float().clamp(0, 1).cpu(), prompts
    return trainer.sample(args.num_samples, generator=gen, controlled=controlled, batch_size=args.batch_size), None


def cmd_sample(args) -> int:
    from .utils.images import image_grid, save_animation, video_grid

    directory = resolve(args.adapter_dir, args.token, args.revision, args.endpoint)
    trainer, conditional = load_trainer(directory, args.base_model, args.token, args.cache_dir)
    samples, _ = draw(trainer, conditional, args, controlled=not args.pretrained)
    if samples.dim() == 5:  # videos: an animated grid (.gif, else an animated PNG)
        fps = getattr(trainer.process.options, "fps", None) or 16
        save_animation(video_grid(samples), args.output, fps, "GIF" if args.output.lower().endswith(".gif") else "PNG")
        print(f"wrote {args.num_samples} {'pretrained' if args.pretrained else 'fine-tuned'} videos to {args.output}")
        return 0
    if conditional:
        grid = image_grid(samples, value_range=(0.0, 1.0))
    else:
        grid = image_grid(samples, scale=max(1, 64 // samples.shape[-1]))
    grid.save(args.output)
    print(f"wrote {args.num_samples} {'pretrained' if args.pretrained else 'fine-tuned'} samples to {args.output}")
    return 0


def _diversity(x: torch.Tensor) -> float:
    flat = x.flatten(1).float()
    d = torch.cdist(flat, flat)
    n = flat.shape[0]
    return float(d.sum() / (n * (n - 1))) if n > 1 else 0.0


def clip_diversity(embeddings: torch.Tensor, prompts: list | None) -> float | None:
    """Mean cosine distance ``1 - cos`` between the CLIP image embeddings of samples *of one prompt* (averaged over
    prompts with at least two samples; all samples for an unconditional model): the diversity a person sees, which
    a reward-collapsed model loses, where pixel distances mostly see colour and position."""
    e = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    groups = {}
    for i, p in enumerate(prompts if prompts is not None else [None] * len(e)):
        groups.setdefault(p, []).append(i)
    values = []
    for idx in groups.values():
        if len(idx) > 1:
            g = e[idx]
            cos = g @ g.T
            n = len(idx)
            values.append(float((1 - cos).sum() / (n * (n - 1))))
    return sum(values) / len(values) if values else None


def cmd_evaluate(args) -> int:
    directory = resolve(args.adapter_dir, args.token, args.revision, args.endpoint)
    task = read_task(directory)
    if args.reward is None and task.get("task") == "digits":
        return _evaluate_digits(args, directory, task)
    if args.reward is None:
        exit_with_error("evaluate needs --reward (a built-in name or 'file.py:function')")
    from .rewards.image_rewards import call_reward
    from .rewards.registry import RewardSpecError, load_reward

    head_hub = {"endpoint": args.endpoint} if args.endpoint and args.aesthetic_head else {}  # the head's download
    try:
        reward = load_reward(args.reward, args.reward_model_name_or_path, args.reward_processor_name_or_path,
                             args.aesthetic_head, token=args.token, **head_hub)
    except RewardSpecError as err:
        exit_with_error(str(err))
    except (OSError, ValueError) as err:  # weights missing, not reachable or malformed: one line, no traceback
        exit_with_error(f"cannot load --reward {args.reward}: {type(err).__name__}: {str(err).splitlines()[0]}")
    trainer, conditional = load_trainer(directory, args.base_model, args.token)
    if isinstance(reward, torch.nn.Module):
        reward = reward.to(trainer.device)
    features = None
    if args.diversity_model not in (None, "none") and conditional:
        from .rewards.clip_rewards import CLIPImageFeatures

        try:
            features = CLIPImageFeatures.from_pretrained(args.diversity_model, token=args.token).to(trainer.device)
        except (OSError, ValueError) as err:
            exit_with_error(f"cannot load --diversity_model {args.diversity_model}: {error_line(err)} (a local CLIP "
                            "checkpoint, or --diversity_model none for pixel distances only)")
    result = {"reward": args.reward, "num_samples": args.num_samples, "seed": args.seed,
              "prompts": args.prompts_file or args.prompt, "diversity_model": args.diversity_model if features else None}
    for name, controlled in (("pretrained", False), ("fine_tuned", True)):
        x, prompts = draw(trainer, conditional, args, controlled)
        with torch.no_grad():
            values = torch.as_tensor(call_reward(reward, x.to(trainer.device), prompts)).float().cpu()
            clip = None if features is None or x.dim() != 4 else clip_diversity(features(x.to(trainer.device)).cpu(),
                                                                                 prompts)
        result[name] = {"reward_mean": float(values.mean()), "reward_std": float(values.std()),
                        "diversity_pairwise_distance": _diversity(x), "diversity_clip_cosine": clip}
    return _print(result, args.output)


def _evaluate_digits(args, directory: str, task: dict) -> int:
    from .tasks import digits

    target = args.target_digit if args.target_digit is not None else task.get("target_digit")
    trainer, _ = load_trainer(directory, args.base_model, args.token, args.cache_dir)
    proxy, genuine = digits.load_or_train_classifiers(args.cache_dir)  # this machine's, never task.json's
    result = {"target_digit": int(target)}
    for name, controlled in (("pretrained", False), ("fine_tuned", True)):
        x = trainer.sample(args.num_samples, generator=torch.Generator().manual_seed(args.seed),
                           controlled=controlled)
        result[name] = digits.digits_metrics(x.cpu(), proxy, genuine, int(target))
    return _print(result, args.output)


def cmd_rate(args) -> int:
    """Serves the rating page of a SEIKO run until interrupted (the trainer, with a ``HumanOracle``, waits for it)."""
    import threading
    import time

    from .feedback.rating import RatingScale
    from .feedback.rating_server import start_rating_server

    if not os.path.isdir(args.output_dir):
        exit_with_error(f"{args.output_dir!r} is not a run directory")
    if args.revoke:
        from .feedback.rating import RatingFiles

        gone = RatingFiles(args.output_dir).revoke_raters(args.revoke)
        unknown = sorted(set(args.revoke) - set(gone))
        print(f"revoked: {', '.join(gone) or 'nobody'}" + (f" (not registered: {', '.join(unknown)})" if unknown else ""))
        return 0 if not unknown else 1
    try:
        scale = RatingScale(*(args.rating_scale or (args.scale_min, args.scale_max, args.scale_step)))
        server = start_rating_server(args.output_dir, scale=scale, ratings_per_query=args.ratings_per_query,
                                     host=args.host, port=args.port, raters=args.raters,
                                     assignment_ttl=args.assignment_ttl, mode=args.mode,
                                     started_by="this page (--rating_mode, --ratings_per_query, --rating_scale)")
    except (ValueError, OSError) as err:
        exit_with_error(error_line(err))
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: the page listens on {args.host}: put TLS (a reverse proxy) in front of it", file=sys.stderr)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:  # stop serving; the page's threads are daemons, so a stuck one cannot hold the exit
        stopper = threading.Thread(target=server.shutdown, daemon=True)
        stopper.start()
        stopper.join(5.0)
    return 0


def cmd_serve_reward(args) -> int:
    """Serves a reward over HTTP (``hf_control_ft/rewards/http.py``'s protocol) until interrupted; the token comes
    from ``--token_file`` or ``$HF_CONTROL_FT_REWARD_TOKEN``, never from the command line."""
    from .processes.options import DTYPES
    from .rewards.http import TOKEN_ENV, RewardServer
    from .rewards.registry import load_reward

    token = os.environ.get(TOKEN_ENV)
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as err:
            exit_with_error(f"--token_file: {error_line(err)}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES.get(args.dtype) if device != "cpu" else None
    try:
        reward = load_reward(args.reward, args.reward_model_name_or_path, args.reward_processor_name_or_path,
                             args.aesthetic_head, torch_dtype=dtype)
        if isinstance(reward, torch.nn.Module):
            reward = reward.to(device).eval()
        server = RewardServer(reward, args.host, args.port, token=token or None, device=device, name=args.reward,
                              max_pixels=args.max_pixels, max_images=args.max_images,
                              max_connections=args.max_connections)
    except (ValueError, OSError) as err:
        exit_with_error(error_line(err))
    print(f"serving --reward {args.reward} at {server.url} ({'Bearer token required' if token else 'no token'})",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _print(result: dict, output: str | None) -> int:
    text = json.dumps(result, indent=2)
    if output:
        with open(output, "w", encoding="utf-8") as f:
            f.write(text)
    print(text)
    return 0


def _common(p: argparse.ArgumentParser, num_samples: int, seed: int) -> None:
    p.add_argument("adapter_dir", help="a saved control directory or a Hub repo id")
    p.add_argument("--base_model", default=None, help="Hub id or local pipeline directory (default: the recorded one)")
    p.add_argument("--cache_dir", default=None, help="digits job: this machine's cache with the digits model and "
                   "classifiers (default: $HF_CONTROL_FT_CACHE or ./cache/digits)")
    p.add_argument("--prompt", nargs="+", default=None, help="prompts (text-to-image controls), cycled over samples")
    p.add_argument("--prompts_file", default=None, help="text-to-image: prompts, one per line (e.g. the held-out "
                   "examples/text_to_image/prompts_heldout.txt), with or instead of --prompt")
    p.add_argument("--num_samples", type=int, default=num_samples)
    p.add_argument("--batch_size", type=int, default=None, help="sampling batch (default: the training batch)")
    p.add_argument("--seed", type=int, default=seed)
    p.add_argument("--revision", default=None, help="Hub revision of adapter_dir")
    p.add_argument("--token", default=None, help="Hub token (default: the cached login; never printed)")
    p.add_argument("--endpoint", default=None, help="Hub endpoint (default: huggingface.co or HF_ENDPOINT)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-control-ft",
                                     description="Look at and measure a saved control (directory or Hub repo).")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample", help="write an image grid of samples from a saved control (videos: an animated "
                                      "grid, .gif or animated .png)")
    _common(s, 64, 0)
    s.add_argument("--output", default="samples.png")
    s.add_argument("--pretrained", action="store_true", help="sample the base model instead (no adapter, N(0, I))")
    s.set_defaults(func=cmd_sample)
    e = sub.add_parser("evaluate", help="reward and diversity of the base vs the fine-tuned model")
    _common(e, 512, 1234)
    e.add_argument("--reward", default=None, help="built-in name or 'file.py:function' (digits job: optional)")
    e.add_argument("--reward_model_name_or_path", default=None, help="CLIP model of a built-in reward")
    e.add_argument("--reward_processor_name_or_path", default=None, help="tokenizer of pickscore / clipscore")
    e.add_argument("--aesthetic_head", default=None, help="--reward aesthetic: the head's .pth / .safetensors, "
                   "local or 'owner/repo/file.pth' on the Hub")
    e.add_argument("--diversity_model", default="openai/clip-vit-large-patch14",
                   help="CLIP image encoder of the within-prompt diversity (mean cosine distance); 'none': pixel "
                        "distances only")
    e.add_argument("--target_digit", type=int, default=None)
    e.add_argument("--output", default=None, help="also write the JSON here")
    e.set_defaults(func=cmd_evaluate)
    r = sub.add_parser("rate", help="serve the rating page of a SEIKO run whose oracle is people (HumanOracle)")
    r.add_argument("output_dir", help="the SEIKO run directory (its ratings/ queue)")
    r.add_argument("--raters", nargs="+", default=None, help="rater names to register (new ones get a login link "
                   "in OUTPUT_DIR/ratings/logins/NAME.url, readable by you only)")
    r.add_argument("--revoke", nargs="+", default=None, metavar="NAME",
                   help="end these raters' access (their tokens stop working at once; their ratings stay) and exit")
    r.add_argument("--rating_host", "--host", dest="host", default="127.0.0.1",
                   help="interface to listen on (default: this machine only; train_seiko.py's --rating_host)")
    r.add_argument("--rating_port", "--port", dest="port", type=int, default=7860)
    r.add_argument("--rating_scale", type=float, nargs=3, default=None, metavar=("MIN", "MAX", "STEP"),
                   help="the scale, as train_seiko.py's --rating_scale (default 1 10 1)")
    r.add_argument("--scale_min", type=float, default=1.0, help=argparse.SUPPRESS)  # the earlier spelling
    r.add_argument("--scale_max", type=float, default=10.0, help=argparse.SUPPRESS)
    r.add_argument("--scale_step", type=float, default=1.0, help=argparse.SUPPRESS)
    r.add_argument("--ratings_per_query", type=int, default=1, help="ratings averaged per query, by different raters")
    r.add_argument("--rating_mode", "--mode", dest="mode", choices=("score", "pairwise"), default="score",
                   help="score: one image on the scale; pairwise: two images, which is better (Bradley-Terry)")
    r.add_argument("--assignment_ttl", type=float, default=600.0,
                   help="seconds a shown query stays reserved for its rater (a closed tab)")
    r.set_defaults(func=cmd_rate)
    v = sub.add_parser("serve-reward", help="serve a reward over HTTP (for --reward / --oracle http://...)")
    v.add_argument("--reward", required=True, help="built-in name, 'file.py:function' or a weighted mix")
    v.add_argument("--reward_model_name_or_path", default=None, help="CLIP model of a built-in reward")
    v.add_argument("--reward_processor_name_or_path", default=None, help="tokenizer of pickscore / clipscore")
    v.add_argument("--aesthetic_head", default=None, help="--reward aesthetic: the head (local or owner/repo/file)")
    v.add_argument("--host", default="127.0.0.1", help="interface (beyond this machine only with a token)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--token_file", default=None, help="file holding the Bearer token clients must send "
                   "(default: $HF_CONTROL_FT_REWARD_TOKEN; none: no token, loopback only)")
    v.add_argument("--device", default=None, help="default: cuda when available")
    v.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="reward model dtype on a GPU")
    v.add_argument("--max_pixels", type=int, default=2048 * 2048,
                   help="pixels per image, checked from the PNG header before decoding (larger: 413)")
    v.add_argument("--max_images", type=int, default=64, help="images per request (more: 413)")
    v.add_argument("--max_connections", type=int, default=32, help="connections served at once (more: 503)")
    v.set_defaults(func=cmd_serve_reward)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
