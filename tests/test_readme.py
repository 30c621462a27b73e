"""The README and the pages under docs/ as a user reads them: the quick start runs as written, every file they name
and every relative link exists, every flag their commands give a script or the CLI exists, the accelerate
configs and the example YAML load."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


DOCS = {name: open(os.path.join(ROOT, "docs", name), encoding="utf-8").read()
        for name in sorted(os.listdir(os.path.join(ROOT, "docs"))) if name.endswith(".md")}
PAGES = {"README.md": README, **{f"docs/{name}": text for name, text in DOCS.items()}}


def test_every_repository_path_the_pages_name_exists():
    """README and every page under docs/: each repository path they name, and each relative link or image."""
    paths, missing = set(), []
    for page, text in PAGES.items():
        found = set(re.findall(r"(?<![\w/.-])((?:examples|benchmarks|docs|hf_control_ft|tests|model_cards)/[\w./+-]*\w)",
                               text))
        paths |= found
        missing += [f"{page}: {p}" for p in found if not os.path.exists(os.path.join(ROOT, p))]
        for target in re.findall(r"\]\(([^)#\s]+)\)", text):  # markdown links and images, relative to the page
            if not re.match(r"[a-z]+://", target):
                where = os.path.join(ROOT, os.path.dirname(page), target)
                if not os.path.exists(where):
                    missing.append(f"{page}: link {target}")
    assert len(paths) > 40
    assert not missing, missing


def _commands(text: str) -> list[str]:
    """Shell commands of the pages' bash blocks, continuation lines joined, comments dropped."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        out += [line.split(" #")[0].strip() for line in joined.splitlines() if line.strip() and
                not line.strip().startswith("#")]
    return out


def test_every_flag_the_pages_give_a_script_or_the_cli_exists():
    """The commands as written: each --flag given to a training script is a field of its arguments or config,
    each --flag of an hf-control-ft subcommand is one of its options."""
    import dataclasses

    from hf_control_ft import ElegantConfig, SeikoConfig
    from hf_control_ft.cli import build_parser
    from hf_control_ft.scripts import ElegantScriptArguments, SeikoScriptArguments

    def fields(*classes):
        return {f.name for c in classes for f in dataclasses.fields(c)} | {"config", "help"}

    scripts = {"train_elegant.py": fields(ElegantScriptArguments, ElegantConfig),
               "train_seiko.py": fields(SeikoScriptArguments, SeikoConfig)}
    subcommands = build_parser()._subparsers._group_actions[0].choices
    checked, unknown = 0, []
    for page, text in PAGES.items():
        for command in _commands(text):
            words = command.split()
            script = next((w for w in words if w.endswith(("text_to_image/train_elegant.py",
                                                           "text_to_image/train_seiko.py"))), None)
            if script is not None:
                known = scripts[os.path.basename(script)]
                flags = [w[2:].split("=")[0] for w in words[words.index(script) + 1:] if w.startswith("--")]
            elif len(words) > 1 and words[0] == "hf-control-ft" and words[1] in subcommands:
                known = {a.dest for a in subcommands[words[1]]._actions}
                flags = [w[2:].split("=")[0] for w in words[2:] if w.startswith("--")]
            else:
                continue
            checked += 1
            unknown += [f"{page}: --{f} in {command[:80]}" for f in flags if f not in known]
    assert checked >= 10
    assert not unknown, unknown


def test_accelerate_configs_and_the_example_yaml_load():
    from accelerate.commands.config.config_args import load_config_from_file

    from hf_control_ft import ElegantConfig
    from hf_control_ft.scripts import ElegantScriptArguments
    from hf_control_ft.utils.config_cli import parse_dataclasses

    expected = {"single_gpu": (1, 1), "multi_gpu": (8, 1), "multi_node": (16, 2), "fsdp": (8, 1)}
    for name, (processes, machines) in expected.items():
        config = load_config_from_file(os.path.join(ROOT, "examples", "accelerate", f"{name}.yaml"))
        assert (config.num_processes, config.num_machines, config.mixed_precision) == (processes, machines, "bf16")
        if name == "fsdp":
            assert str(config.distributed_type).endswith("FSDP") and config.fsdp_config["fsdp_version"] == 2
    yaml_path = os.path.join(ROOT, "examples", "text_to_image", "sd15_aesthetic.yaml")
    args, config = parse_dataclasses((ElegantScriptArguments, ElegantConfig),
                                     ["--config", yaml_path, "--prompts_file", "prompts.txt", "--alpha=0.2"])
    assert (args.reward, args.resolution, config.alpha, config.gradient_accumulation_steps) == ("aesthetic", 512, 0.2, 2)


@pytest.mark.slow
def test_quick_start_runs_as_written(tmp_path):
    section = README[README.index("## Quick start"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found = re.search(r"pretrained ([\d.]+), ELEGANT ([\d.]+)", done.stdout)
    pretrained, elegant = float(found.group(1)), float(found.group(2))
    assert elegant < 0.1 < pretrained  # the README prints 0.475 -> 0.056
    assert os.path.isfile(tmp_path / "quickstart-out" / "pytorch_lora_weights.safetensors")
