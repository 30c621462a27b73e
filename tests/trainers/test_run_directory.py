"""Nothing lost: damaged run directories, a second run on the same directory, oracle faults, output-dir reuse,
non-finite gradients and damaged checkpoints."""

import json
import math
import os
import shutil
import threading
import time

import pytest
import torch
from seiko_child import LoggingOracle, build_trainer

from hf_control_ft import ElegantConfig, ElegantTrainer
from hf_control_ft.feedback.oracle import Oracle, OracleOutputError, OracleUnavailableError
from hf_control_ft.feedback.reader import load_feedback
from hf_control_ft.serialization import checkpoints as checkpointing
from hf_control_ft.testing import ddim, make_mlp_denoiser
from hf_control_ft.utils.run_lock import RunLock, RunLockedError


def _answers(output_dir) -> dict:
    ds = load_feedback(str(output_dir))
    return {q: v for q, v, s in zip(ds["query_index"], ds["value"], ds["status"]) if s == "ok"}


@pytest.mark.slow
def test_every_damaged_file_gives_a_named_error_or_keeps_every_answer(tmp_path):
    first = tmp_path / "first"
    build_trainer(first, LoggingOracle(str(tmp_path / "log"))).train()
    answers = _answers(first)
    assert len(answers) > 10
    files = sorted(os.path.relpath(os.path.join(root, n), first) for root, _, names in os.walk(first) for n in names)
    assert any("shards" in f for f in files) and any("trainer_state" in f for f in files)
    outcomes = {}
    for rel in files:
        for damage in ("delete", "truncate"):
            run = tmp_path / f"run-{damage}"
            shutil.rmtree(run, ignore_errors=True)
            shutil.copytree(first, run)
            target = run / rel
            if damage == "delete":
                os.remove(target)
            else:
                data = target.read_bytes()
                target.write_bytes(data[: len(data) // 2])
            try:
                build_trainer(run, LoggingOracle(str(tmp_path / "log2"))).train()
            except Exception as err:  # noqa: BLE001 - the test checks the message names the damaged file
                assert os.path.basename(rel) in str(err), (rel, damage, err)
                outcomes[(rel, damage)] = "named error"
                continue
            after = _answers(run)
            assert all(after.get(q) == v for q, v in answers.items()), (rel, damage)  # every answer, unchanged
            outcomes[(rel, damage)] = "recovered"
    assert "recovered" in outcomes.values() and "named error" in outcomes.values()


def test_a_second_run_on_the_same_directory_fails_at_once_naming_the_holder(tmp_path):
    with RunLock(str(tmp_path)):
        with pytest.raises(RunLockedError, match=rf"{tmp_path}.*pid {os.getpid()}"):
            RunLock(str(tmp_path)).acquire()
        cfg = ElegantConfig(num_inference_steps=3, train_steps=1, batch_size=4, learn_initial_noise=False,
                            report_to=None, output_dir=str(tmp_path))
        trainer = ElegantTrainer(cfg, make_mlp_denoiser(lora=False), ddim(), lambda x: -x.pow(2).sum(1), (2,))
        with pytest.raises(RunLockedError, match="in use by another run"):
            trainer.train()
        with RunLock(str(tmp_path / "seiko")), pytest.raises(RunLockedError, match="seiko.*in use"):
            build_trainer(tmp_path / "seiko", LoggingOracle(str(tmp_path / "log")))  # before reading anything
        seiko = build_trainer(tmp_path / "seiko", LoggingOracle(str(tmp_path / "log")))
        with pytest.raises(RunLockedError, match="seiko.*in use"):  # a second trainer while the first is alive
            build_trainer(tmp_path / "seiko", LoggingOracle(str(tmp_path / "log")))
        seiko.close()
        assert len(build_trainer(tmp_path / "seiko", LoggingOracle(str(tmp_path / "log"))).feedback) == 0
    RunLock(str(tmp_path)).acquire().release()  # released: the next run may start


def _elegant(tmp_path, **kw):
    values = dict(num_inference_steps=3, train_steps=2, batch_size=4, learn_initial_noise=False, report_to=None,
                  output_dir=str(tmp_path), checkpointing_steps=1, lora_rank=2, drift_objective="pathwise")
    values.update(kw)
    return ElegantTrainer(ElegantConfig(**values), make_mlp_denoiser(lora=False), ddim(),
                          lambda x: -x.pow(2).sum(1), (2,))


def test_reusing_a_directory_and_resuming_with_other_settings_are_refused(tmp_path):
    _elegant(tmp_path).train()
    assert [s for s, _ in checkpointing.list_checkpoints(str(tmp_path))] == [1, 2]
    with pytest.raises(FileExistsError, match="already holds a run.*checkpoint-"):
        _elegant(tmp_path).train()
    with pytest.raises(ValueError, match=r"changed \['alpha', 'learning_rate'\]"):
        _elegant(tmp_path, alpha=0.5, learning_rate=1e-2, train_steps=3).train(resume_from_checkpoint="latest")
    resumed = _elegant(tmp_path, train_steps=3)  # more steps: allowed
    resumed.train(resume_from_checkpoint="checkpoint-2")
    assert resumed.global_step == 3
    fresh = _elegant(tmp_path, overwrite_output_dir=True)
    fresh.train()
    assert [s for s, _ in checkpointing.list_checkpoints(str(tmp_path))] == [1, 2] and fresh.global_step == 2


class _NaNGradient(torch.autograd.Function):
    """A reward with finite values and a NaN gradient."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return -x.pow(2).sum(1)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return torch.full_like(x, float("nan"))


def nan_gradient(x):
    return _NaNGradient.apply(x)


def test_non_finite_gradients_are_skipped_counted_and_stop_naming_the_gradient(tmp_path):
    trainer = _elegant(tmp_path, max_nonfinite_steps=3, train_steps=5)
    trainer.set_reward(nan_gradient)
    before = [p.detach().clone() for p in trainer.sampler.model.parameters() if p.requires_grad]
    with pytest.raises(FloatingPointError, match="gradient of the LoRA parameters was non-finite.*values were finite"):
        trainer.train()
    assert trainer.skipped_steps == 3
    after = [p.detach() for p in trainer.sampler.model.parameters() if p.requires_grad]
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # nothing non-finite reached the weights
    for _, path in checkpointing.list_checkpoints(str(tmp_path)):
        checkpointing.validate_checkpoint(path)  # every checkpoint written is finite


def test_damaged_checkpoints_are_named_and_latest_falls_back(tmp_path, caplog):
    _elegant(tmp_path).train()
    newest = tmp_path / "checkpoint-2" / "lora.safetensors"
    newest.write_bytes(newest.read_bytes()[:40])
    with pytest.raises(checkpointing.CheckpointError, match="checkpoint-2/lora.safetensors"):
        checkpointing.resolve_checkpoint(str(tmp_path), "checkpoint-2")
    assert checkpointing.resolve_checkpoint(str(tmp_path), "latest").endswith("checkpoint-1")
    assert "checkpoint-2/lora.safetensors" in caplog.text
    with pytest.raises(FloatingPointError, match="non-finite"):
        checkpointing.write_checkpoint(str(tmp_path), 9, {"w": torch.tensor([1.0, float("nan")])}, {})
    assert not (tmp_path / "checkpoint-9").exists()


def test_latest_skips_a_checkpoint_missing_its_lora_file_and_the_resume_completes(tmp_path, caplog):
    _elegant(tmp_path).train()
    os.remove(tmp_path / "checkpoint-2" / "lora.safetensors")  # incomplete: its state file alone remains
    with pytest.raises(checkpointing.CheckpointError, match="checkpoint-2/lora.safetensors is missing"):
        checkpointing.resolve_checkpoint(str(tmp_path), "checkpoint-2")
    assert checkpointing.resolve_checkpoint(str(tmp_path), "latest").endswith("checkpoint-1")
    summary = _elegant(tmp_path).train(resume_from_checkpoint="latest")
    assert summary["resumed_from"].endswith("checkpoint-1")


# ---------------------------------------------------------------------------------------------- oracle faults
@pytest.mark.parametrize("bad", [{0: 0.1, 1: 0.2}, "12", ["0.5", "0.5"], [True, False], torch.ones(2, 2),
                                 torch.tensor([True, False])])
def test_oracle_values_must_be_numbers(bad):
    oracle = Oracle(lambda s, p: bad, name="assay")
    with pytest.raises(OracleOutputError, match="'assay'"):
        oracle.query(torch.zeros(2, 3))


def test_oracle_timeout_fails_the_items_of_a_slow_call():
    stop = threading.Event()

    def slow(samples, prompts):
        stop.wait(5)
        return torch.zeros(samples.shape[0])

    answers = Oracle(slow, timeout=0.2).query(torch.zeros(1, 2))
    stop.set()
    assert answers[0].status == "failed" and "oracle_timeout" in answers[0].error


_HUNG_ORACLE_RUN = """
import sys, threading
sys.path.insert(0, sys.argv[2])
from seiko_child import build_trainer
from hf_control_ft.feedback.oracle import OracleUnavailableError
calls = []
def hung(samples, prompts):
    calls.append(samples.shape[0])
    threading.Event().wait()  # never answers
hung.__name__ = "hung"
trainer = build_trainer(sys.argv[1], hung, oracle_timeout=0.3, oracle_on_failure="retry", oracle_max_retries=2)
try:
    trainer.train()
except OracleUnavailableError as err:
    print("unavailable", len(calls), trainer.feedback.summary()["feedback/failed"], flush=True)
"""


def test_a_hung_oracle_with_a_timeout_fails_the_round_and_the_process_exits(tmp_path):
    """In a child process: the oracle never returns. The round ends with OracleUnavailableError, every query is
    recorded as failed, the oracle is called once (never again while that call hangs), and the process exits."""
    import subprocess
    import sys

    helpers = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "helpers")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.time()
    done = subprocess.run([sys.executable, "-c", _HUNG_ORACLE_RUN, str(tmp_path / "run"), helpers], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    word, calls, failed = done.stdout.split()
    assert word == "unavailable" and int(calls) == 1 and int(failed) == 12, done.stdout
    assert time.time() - start < 120


def test_answers_obtained_before_a_contract_error_are_recorded(tmp_path):
    """The batch call fails, the one-by-one fallback gets two answers, then the oracle breaks its contract (a
    dict for one sample): the run stops with OracleOutputError and the two answers are on disk."""
    from hf_control_ft.feedback.oracle import OracleOutputError

    calls = []

    def flaky(samples, prompts):
        calls.append(samples.shape[0])
        if samples.shape[0] > 1:
            raise ConnectionError("batch endpoint down")
        if len(calls) == 4:  # the third item asked alone
            return {"score": 1.0}
        return -samples.pow(2).sum(1)

    trainer = build_trainer(tmp_path, flaky, oracle_max_attempts=3)
    with pytest.raises(OracleOutputError, match="dict"):
        trainer.train()
    ds = load_feedback(str(tmp_path))
    assert ds["status"][:5] == ["ok", "ok", "failed", "failed", "failed"], ds["status"][:5]
    assert all(math.isfinite(v) for v in ds["value"][:2]) and ds["attempts"][:3] == [2, 2, 2]
    assert "OracleOutputError" in ds["error"][2]


class Outage:
    """Fails every call while ``down`` (a transient outage), answers otherwise; counts sends per sample."""

    def __init__(self):
        self.down, self.sent = False, 0
        self.__name__ = "outage_oracle"

    def __call__(self, samples, prompts):
        self.sent += samples.shape[0]
        if self.down:
            raise ConnectionError("assay service unreachable")
        return -samples.pow(2).sum(1)


def test_failed_queries_are_asked_again_and_an_outage_stops_the_round_until_a_restart(tmp_path):
    oracle = Outage()
    oracle.down = True
    trainer = build_trainer(tmp_path, oracle, oracle_max_attempts=5, min_answer_fraction=0.5)
    with pytest.raises(OracleUnavailableError, match="round 1: only 0 of 12 queries answered.*restart"):
        trainer.train()
    ds = load_feedback(str(tmp_path))
    assert set(ds["status"]) == {"failed"} and all(a == 2 for a in ds["attempts"])  # batch call + alone
    oracle.down = False  # the outage is over: a restart asks the failed queries again
    trainer = build_trainer(tmp_path, oracle, oracle_max_attempts=5, min_answer_fraction=0.5)
    trainer.train()
    ds = load_feedback(str(tmp_path))
    assert ds["status"].count("ok") == len(ds) == 32 and ds["attempts"][:12] == [3] * 12
    assert all(math.isfinite(v) for v in ds["value"])


def test_run_lock_is_released_when_the_holder_dies(tmp_path):
    import subprocess
    import sys

    code = ("import sys, time; sys.path.insert(0, %r); from hf_control_ft.utils.run_lock import RunLock; "
            "RunLock(%r).acquire(); print('locked', flush=True); time.sleep(60)") % (os.getcwd(), str(tmp_path))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == b"locked"
        with pytest.raises(RunLockedError, match=f"pid {child.pid}"):
            RunLock(str(tmp_path)).acquire()
    finally:
        child.kill()
        child.wait()
    deadline = time.time() + 10
    while True:
        try:
            RunLock(str(tmp_path)).acquire().release()
            break
        except RunLockedError:
            assert time.time() < deadline
            time.sleep(0.1)


# ---------------------------------------------------------------------------------------------- Hub and config
def test_network_errors_of_a_push_are_hub_push_errors_with_the_token_masked(tmp_path):
    from hf_control_ft.feedback.store import FeedbackDataset
    from hf_control_ft.serialization.saved import HubPushError

    token = "hf_secret_token_123456"
    unreachable = "http://127.0.0.1:9"  # nothing listens on the discard port: connection refused
    trainer = _elegant(tmp_path / "run", checkpointing_steps=0)
    with pytest.raises(HubPushError, match="failed") as err:
        trainer.push_to_hub("me/model", token=token, endpoint=unreachable)
    assert token not in str(err.value) and "nothing was kept locally" in str(err.value)
    with pytest.raises(HubPushError, match=r"kept in .*saved") as err:
        trainer.push_to_hub("me/model", token=token, endpoint=unreachable, save_directory=str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "pytorch_lora_weights.safetensors").is_file()
    fb = FeedbackDataset(str(tmp_path / "fb"), (2,))
    fb.add_pending(torch.zeros(2, 2), round_index=1)
    with pytest.raises(HubPushError, match="feedback push") as err:
        fb.push_to_hub("me/feedback", token=token, endpoint=unreachable)
    assert token not in str(err.value)


def test_token_echoed_by_the_server_is_masked_in_every_push(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants
    from hub_server import HubServer

    from hf_control_ft.feedback.store import FeedbackDataset
    from hf_control_ft.serialization.saved import HubPushError

    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_DISABLE_XET", True)
    token = "hf_echoed_token_987654"
    fb = FeedbackDataset(str(tmp_path / "fb"), (2,))
    fb.add_pending(torch.zeros(2, 2), round_index=1)
    with HubServer() as hub:
        hub.refuse_commits["me/feedback"] = f"token {token} has no write access"
        hub.refuse_commits["me/model"] = f"token {token} has no write access"
        with pytest.raises(HubPushError) as err:
            fb.push_to_hub("me/feedback", token=token, endpoint=hub.url)
        assert token not in str(err.value) and "***" in str(err.value)
        with pytest.raises(HubPushError) as err:
            _elegant(tmp_path / "run", checkpointing_steps=0).push_to_hub("me/model", token=token, endpoint=hub.url)
        assert token not in str(err.value) and "***" in str(err.value)


def test_load_control_reads_the_exact_weight_file(tmp_path):
    from hf_control_ft.pipelines.controlled import ControlledStableDiffusionPipeline
    from hf_control_ft.testing import tiny_components, tiny_sd_pipeline, tiny_unet_output

    cfg = ElegantConfig(num_inference_steps=2, train_steps=1, batch_size=2, learn_initial_noise=False,
                        report_to=None, lora_rank=2)
    trainer = ElegantTrainer.from_pipeline(tiny_sd_pipeline(), lambda im, p: im.mean((1, 2, 3)), cfg,
                                           prompts=["a cat"], guidance_scale=1.0)
    trainer.train()
    trainer.save_pretrained(str(tmp_path))
    decoy = tmp_path / "old_pytorch_lora_weights.safetensors"
    from safetensors.torch import load_file, save_file

    save_file({k: torch.zeros_like(v) + 5 for k, v in load_file(tmp_path / "pytorch_lora_weights.safetensors").items()},
              str(decoy))
    pipe = ControlledStableDiffusionPipeline(**tiny_components()).load_control(str(tmp_path))
    assert torch.equal(tiny_unet_output(pipe.unet), tiny_unet_output(trainer.process.lora_model))


@pytest.mark.parametrize("field,value", [("alpha", math.inf), ("learn_initial_noise", "false"),
                                         ("gradient_checkpointing", "yes"), ("learning_rate", "fast"),
                                         ("max_grad_norm", "big"), ("lora_target_modules", []),
                                         ("batch_size", "64"), ("lora_alpha", math.nan)])
def test_config_values_of_the_wrong_kind_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"ElegantConfig.{field}"):
        ElegantConfig(**{field: value})


def test_a_checkpoint_older_than_a_setting_resumes_with_its_default_and_refuses_another_value(tmp_path):
    """Settings added after a checkpoint was written (adam_beta2, regression_weight_power) were trained with the
    field's default: resuming with it works, resuming with another value is refused and names the setting."""
    _elegant(tmp_path).train()
    state_path = tmp_path / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    for key in ("adam_beta1", "adam_beta2", "regression_weight_power"):
        del state["config"][key]  # as an older version wrote it
    state_path.write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"changed \['adam_beta2'\]"):
        _elegant(tmp_path, adam_beta2=0.99, train_steps=3).train(resume_from_checkpoint="checkpoint-2")
    resumed = _elegant(tmp_path, train_steps=3)
    resumed.train(resume_from_checkpoint="checkpoint-2")
    assert resumed.global_step == 3
