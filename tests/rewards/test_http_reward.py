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
from polling import within

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
    while (_Flaky.active or _Flaky.seen < 2) and time.monotonic() < deadline:  # both timed-out attempts arrived
        # and finished sleeping on the server (under load a handler may start after the client gave up)
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
    assert exit_info.value.code == 2 and f"train_seiko.py --oracle {served.url}" in err and TOKEN not in err
    with pytest.raises(SystemExit) as exit_info:  # the VLM judge too, before its 3B model is downloaded
        run_elegant(["--pretrained_model_name_or_path", "no-such-model", "--prompts", "a cat", "--report_to",
                     "none", "--output_dir", "out", "--reward", "brightness:0.5,vlm_judge:1"])
    assert exit_info.value.code == 2 and "train_seiko.py --oracle vlm_judge" in capsys.readouterr().err
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


# --------------------------------------------------------------------------- a hostile client, a paying user


def _bomb_png(side: int = 13000) -> bytes:
    """A ~20 KB PNG whose header announces ``side`` x ``side`` pixels (484 MiB as RGB once decoded)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _raw(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Sends raw bytes to the server and returns everything it answers before closing (or the timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(data)
        out = b""
        try:
            while chunk := conn.recv(65536):
                out += chunk
                if b"\r\n\r\n" in out:
                    head, _, body = out.partition(b"\r\n\r\n")
                    length = [int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")]
                    if length and len(body) >= length[0]:
                        break
        except socket.timeout:
            pass
    return out


def _post(port: int, body: bytes, headers: dict) -> tuple[int, dict]:
    lines = [b"POST /score HTTP/1.1", b"Host: 127.0.0.1"] + [f"{k}: {v}".encode() for k, v in headers.items()]
    answer = _raw(port, b"\r\n".join(lines) + b"\r\n\r\n" + body)
    status = int(answer.split(b" ", 2)[1])
    return status, json.loads(answer.partition(b"\r\n\r\n")[2] or b"{}")


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def _serve_command(tmp_path, *extra):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("HF_CONTROL_FT_REWARD_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-m", "hf_control_ft.cli", "serve-reward", "--reward", "brightness",
                             "--port", str(port), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    assert "serving" in proc.stdout.readline()
    return proc, port


def test_a_decompression_bomb_is_refused_before_decoding(tmp_path):
    """A 20 KB PNG announcing 13000 x 13000 pixels: 413 in under a second, the server's peak memory up < 100 MB."""
    bomb = _bomb_png()
    assert len(bomb) < 64 * 1024
    proc, port = _serve_command(tmp_path)
    try:
        small = base64_png(_images(1)[0])
        status, _ = _post(port, json.dumps({"images": [small]}).encode(), {"Content-Type": "application/json",
                                                                           "Content-Length": len(json.dumps({"images": [small]}))})
        assert status == 200
        before = _peak_rss_mb(proc.pid)
        body = json.dumps({"images": [__import__("base64").b64encode(bomb).decode()] * 4}).encode()
        start = time.monotonic()
        status, answer = _post(port, body, {"Content-Type": "application/json", "Content-Length": len(body)})
        assert time.monotonic() - start < 1.0
        assert status == 400 and "over the limit" in answer["error"]
        assert _peak_rss_mb(proc.pid) - before < 100
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def base64_png(image) -> str:
    import base64

    return base64.b64encode(to_png(image)).decode()


def _open_server(**kw):
    """A token-less server (loopback only) with a short idle timeout."""
    server = RewardServer(BrightnessReward(), "127.0.0.1", 0, handler_timeout=1.0, **kw)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def open_server():
    server = _open_server()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def two_slot_server():
    server = _open_server(max_connections=2)
    yield server
    server.shutdown()
    server.server_close()


def test_every_bad_request_is_answered_with_a_4xx(open_server):
    port = open_server.server_address[1]
    json_headers = {"Content-Type": "application/json"}
    a, b = base64_png(torch.rand(3, 8, 8)), base64_png(torch.rand(3, 4, 4))
    bodies = {
        "deep JSON": b"[" * 100000,
        "a huge number": b'{"images": [' + b"1" + b"0" * 400 + b"]}",
        "mixed sizes": json.dumps({"images": [a, b]}).encode(),
        "no images": b'{"images": []}',
        "not an object": b"[1, 2]",
        "not base64": b'{"images": ["%%%"]}',
        "not a PNG": json.dumps({"images": [__import__("base64").b64encode(b"GIF89a" + b"0" * 40).decode()]}).encode(),
        "too many images": json.dumps({"images": [a] * 65}).encode(),
        "bad prompts": json.dumps({"images": [a], "prompts": [1]}).encode(),
    }
    for name, body in bodies.items():
        status, answer = _post(port, body, {**json_headers, "Content-Length": len(body)})
        assert 400 <= status < 500 and answer.get("error"), name
    assert _post(port, b"{}", {**json_headers, "Content-Length": -1})[0] == 400  # a negative length skips nothing
    assert _post(port, b"{}", {**json_headers, "Content-Length": "x"})[0] == 400
    assert _post(port, b"", json_headers)[0] == 411
    assert _post(port, b"", {**json_headers, "Content-Length": 2**40})[0] == 413
    assert _post(port, b"", {**json_headers, "Transfer-Encoding": "chunked"})[0] == 411


def test_a_token_less_server_refuses_what_a_web_page_could_send(open_server):
    """No token: POSTs must be application/json (a page's simple POST is text/plain) and the Host a loopback name
    (a page that rebinds its own domain to 127.0.0.1 sends its own Host)."""
    port = open_server.server_address[1]
    body = json.dumps({"images": [base64_png(torch.rand(3, 8, 8))]}).encode()
    assert _post(port, body, {"Content-Type": "text/plain", "Content-Length": len(body)})[0] == 415
    answer = _raw(port, b"POST /score HTTP/1.1\r\nHost: evil.example:%d\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n" % (port, len(body)) + body)
    assert answer.startswith(b"HTTP/1.1 403")
    assert _post(port, body, {"Content-Type": "application/json", "Content-Length": len(body)})[0] == 200
    assert HTTPReward(open_server.url)(_images(2)).shape == (2,)


def test_idle_connections_are_closed_and_connections_are_capped(two_slot_server):
    from hf_control_ft.utils.http_server import HANDLER_TIMEOUT

    assert HANDLER_TIMEOUT <= 60
    port = two_slot_server.server_address[1]
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]  # both slots held, nothing sent
    get = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"
    assert within(5.0, lambda: _raw(port, get).startswith(b"HTTP/1.1 503"))  # a third: refused
    started = threading.Thread(target=lambda: None)  # the process can still start threads
    started.start()
    started.join()
    start = time.monotonic()
    for conn in idle:
        conn.settimeout(5)
        assert conn.recv(10) == b""  # closed by the server after its idle timeout (1 s here)
        conn.close()
    assert time.monotonic() - start < 3
    assert within(5.0, lambda: b'"ok": true' in _raw(port, get))  # the slots came back


def _picky(images, prompts):
    """A reward that cannot score an image whose mean is above 0.9 (a ValueError: the server answers 422)."""
    means = images.mean(dim=(1, 2, 3))
    if bool((means > 0.9).any()):
        raise ValueError("cannot score a white image")
    return means


def test_one_unscorable_image_of_64_costs_at_most_72_images(monkeypatch):
    from hf_control_ft.feedback.oracle import Oracle

    server = RewardServer(_picky, "127.0.0.1", 0, token=TOKEN)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        images = torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.8
        images[37] = 1.0
        client = HTTPReward(server.url, token=TOKEN, batch_size=8, backoff=0.01)
        answers = Oracle(client).query(images)
        assert [a.status for a in answers].count("ok") == 63 and answers[37].status == "failed"
        assert "HTTP 422" in answers[37].error and "white image" in answers[37].error
        assert client.images_sent == server.images_received == 72  # 8 requests of 8, then the failed one item by item
        torch.testing.assert_close(torch.tensor([a.value for i, a in enumerate(answers) if i != 37]),
                                   _quantised(images)[[i for i in range(64) if i != 37]].mean(dim=(1, 2, 3)),
                                   atol=1e-6, rtol=0)
    finally:
        server.shutdown()
        server.server_close()


def test_a_down_service_fails_the_batch_at_once_without_asking_item_by_item(flaky):
    from hf_control_ft.feedback.oracle import Oracle

    _Flaky.fail = 10**6
    client = HTTPReward(flaky, batch_size=4, max_retries=1, backoff=0.01)
    answers = Oracle(client).query(torch.rand(8, 3, 8, 8))
    assert all(a.status == "failed" and "HTTP 503" in a.error for a in answers)
    assert _Flaky.seen == 4 and client.images_sent == 16  # 2 requests x 2 attempts; no one-by-one


def test_a_retry_after_a_lost_answer_is_answered_from_the_cache():
    """The first attempt times out on the client while the server scores it; the retry carries the same idempotency
    key and is answered from the server's cache: the batch is scored (and billed) once."""
    calls = []

    def slow(images, prompts):
        calls.append(len(images))
        time.sleep(0.6 if len(calls) == 1 else 0)
        return images.mean(dim=(1, 2, 3))

    server = RewardServer(slow, "127.0.0.1", 0, token=TOKEN)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        images = _images(3)
        scores = HTTPReward(server.url, token=TOKEN, timeout=0.3, max_retries=2, backoff=0.01)(images)
        torch.testing.assert_close(scores, _quantised(images).mean(dim=(1, 2, 3)))
        assert calls == [3] and server.images_scored == 3
    finally:
        server.shutdown()
        server.server_close()


def test_the_token_never_follows_a_redirect():
    seen = []

    class Target(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802
            seen.append(self.headers.get("Authorization"))
            self.send_response(200)
            self.end_headers()

        do_POST = do_GET  # noqa: N815

    target = ThreadingHTTPServer(("127.0.0.1", 0), Target)

    class Redirect(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):  # noqa: N802
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{target.server_address[1]}/steal")
            self.send_header("Content-Length", "0")
            self.end_headers()

    source = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    for server in (target, source):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(RewardServerError, match="redirects are not followed") as err:
            HTTPReward(f"http://127.0.0.1:{source.server_address[1]}/score", token=TOKEN)(_images(1))
        assert seen == [] and TOKEN not in str(err.value)
    finally:
        for server in (target, source):
            server.shutdown()
            server.server_close()
