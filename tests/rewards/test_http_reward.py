"""A reward served over HTTP, end to end on the loopback interface: the client's batching, concurrency limit,
retries and timeouts, the server's token check, and ``hf-control-ft serve-reward`` as a user starts it. The
token never appears in a name or an error."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from hf_control_ft.rewards.http import HTTPReward, RewardServer, RewardServerError
from hf_control_ft.rewards.image_rewards import BrightnessReward
from hf_control_ft.rewards.registry import RewardSpecError, check_spec, load_reward
from hf_control_ft.scripts import run_elegant
from hf_control_ft.utils.images import from_png, to_png

TOKEN = "reward-secret-7f3a"


def _images(n, seed=0):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _quantised(images):  # what the server sees: 8-bit PNGs
    return torch.stack([from_png(to_png(x)) for x in images])


@pytest.fixture
def served():
    server = RewardServer(BrightnessReward(), "127.0.0.1", 0, token=TOKEN)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_scores_come_back_in_order_for_a_batch_split_into_requests(served):
    images = _images(7)
    reward = HTTPReward(served.url, token=TOKEN, batch_size=3, max_concurrency=2)
    scores = reward(images, [f"p{i}" for i in range(7)])
    assert torch.allclose(scores, BrightnessReward()(_quantised(images)), atol=1e-6)
    assert not scores.requires_grad and reward.__name__ == served.url


def test_a_served_image_reward_scores_videos_frame_by_frame(served):
    videos = torch.rand(2, 3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    scores = HTTPReward(served.url, token=TOKEN, batch_size=4)(videos, ["a", "b"])
    frames = BrightnessReward()(_quantised(videos.flatten(0, 1))).reshape(2, 3)
    assert torch.allclose(scores, frames.mean(1), atol=1e-6)


def test_the_server_refuses_a_missing_or_wrong_token_and_the_error_never_shows_it(served, monkeypatch):
    monkeypatch.delenv("HF_CONTROL_FT_REWARD_TOKEN", raising=False)
    for token in (None, "wrong-token"):
        with pytest.raises(RewardServerError, match="HTTP 401") as err:
            HTTPReward(served.url, token=token, max_retries=2, backoff=0.01)(_images(2))
        assert "after 1 attempt" in str(err.value)  # a 401 is not retried
        assert "wrong-token" not in str(err.value)
    monkeypatch.setenv("HF_CONTROL_FT_REWARD_TOKEN", TOKEN)  # the token from the environment
    assert HTTPReward(served.url)(_images(2)).shape == (2,)
    url = served.url.replace("http://", f"http://user:{TOKEN}@")  # credentials in a URL never show either
    assert TOKEN not in HTTPReward(url).__name__ and TOKEN not in repr(HTTPReward(url))


class _Flaky(BaseHTTPRequestHandler):
    """Answers 503 to the first ``fail`` requests, then brightness scores; sleeps ``delay`` s per request and records
    the largest number of requests in flight at once."""

    fail, delay, seen, active, peak = 0, 0.0, 0, 0, 0
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802
        cls = type(self)
        with cls.lock:
            cls.seen += 1
            cls.active += 1
            cls.peak = max(cls.peak, cls.active)
            failing = cls.seen <= cls.fail
        try:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            time.sleep(cls.delay)
            if failing:
                self.send_response(503)
                self.end_headers()
                return
            n = len(body["images"])
            payload = json.dumps({"scores": [float(i) for i in range(n)]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (the timeout test)
            pass
        finally:
            with cls.lock:
                cls.active -= 1


@pytest.fixture
def flaky():
    _Flaky.fail, _Flaky.delay, _Flaky.seen, _Flaky.active, _Flaky.peak = 0, 0.0, 0, 0, 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/score"
    server.shutdown()
    server.server_close()


def test_5xx_answers_are_retried_with_backoff(flaky):
    _Flaky.fail = 2
    scores = HTTPReward(flaky, max_retries=3, backoff=0.01)(_images(2))
    assert scores.tolist() == [0.0, 1.0] and _Flaky.seen == 3
    _Flaky.fail, _Flaky.seen = 10, 0
    with pytest.raises(RewardServerError, match="HTTP 503 .*after 2 attempt"):
        HTTPReward(flaky, max_retries=1, backoff=0.01)(_images(2))


def test_a_slow_server_times_out_and_the_concurrency_limit_holds(flaky):
    _Flaky.delay = 1.0
    start = time.monotonic()
    with pytest.raises(RewardServerError, match="timed out"):
        HTTPReward(flaky, timeout=0.2, max_retries=1, backoff=0.01)(_images(1))
    assert time.monotonic() - start < 3.0
    deadline = time.monotonic() + 5
    while _Flaky.active and time.monotonic() < deadline:  # the timed-out requests still sleep on the server
        time.sleep(0.05)
    _Flaky.delay, _Flaky.peak = 0.3, 0
    scores = HTTPReward(flaky, batch_size=2, max_concurrency=3)(_images(12))
    assert scores.tolist() == [0.0, 1.0] * 6 and _Flaky.peak == 3  # 6 requests, 3 in flight at most


def test_specs_and_elegant_refusal(served, tmp_path, monkeypatch, capsys):
    assert isinstance(load_reward(served.url), HTTPReward)
    check_spec(served.url)
    with pytest.raises(RewardSpecError, match="http"):
        check_spec("http://")
    monkeypatch.setenv("HF_CONTROL_FT_REWARD_TOKEN", TOKEN)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:  # a served reward has no gradient: SEIKO is named
        run_elegant(["--pretrained_model_name_or_path", "no-such-model", "--prompts", "a cat", "--report_to",
                     "none", "--output_dir", "out", "--reward", served.url])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and f"train_seiko.py --oracle {served.url}" in err and TOKEN not in err
    with pytest.raises(ValueError, match="needs a token"):
        RewardServer(BrightnessReward(), "0.0.0.0", 0)


def test_serve_reward_command(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "token").write_text(TOKEN + "\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("HF_CONTROL_FT_REWARD_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-m", "hf_control_ft.cli", "serve-reward", "--reward", "brightness",
                             "--port", str(port), "--token_file", str(tmp_path / "token")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/score" in line and TOKEN not in line
        request = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"Authorization": f"Bearer {TOKEN}"})
        assert json.loads(urllib.request.urlopen(request, timeout=10).read()) == {"reward": "brightness", "ok": True}
        images = _images(3, seed=1)
        scores = HTTPReward(f"http://127.0.0.1:{port}/score", token=TOKEN)(images)
        assert torch.allclose(scores, BrightnessReward()(_quantised(images)), atol=1e-6)
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert TOKEN not in out + err
    done = subprocess.run([sys.executable, "-m", "hf_control_ft.cli", "serve-reward", "--reward", "brightness",
                           "--host", "0.0.0.0", "--port", str(port)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode != 0 and "needs a token" in done.stderr
