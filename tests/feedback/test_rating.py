"""People as the oracle: the rating page's access rules, and a SEIKO run rated through it (HTTP and a real browser)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

from hf_control_ft.feedback.human_oracle import HumanOracle
from hf_control_ft.feedback.rating import RatingFiles, RatingScale
from hf_control_ft.feedback.rating_server import start_rating_server
from hf_control_ft.feedback.reader import load_feedback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHILD = os.path.join(ROOT, "tests", "helpers", "rating_child.py")
TOKENS = {"alice": "alice-token", "bob": "bob-token"}


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(url, path, token=None, body=None):
    """``(status, json)`` of one request (errors included)."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url.rstrip("/") + path, data=data, headers=headers)) as r:
            raw = r.read()
            return r.status, (json.loads(raw) if r.headers["Content-Type"] == "application/json" else raw)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _queue(tmp_path, n, ratings_per_query=1):
    oracle = HumanOracle(str(tmp_path), ratings_per_query=ratings_per_query, value_range=(-1, 1))
    samples = torch.linspace(-1, 1, n * 16).reshape(n, 16)
    return oracle, oracle.enqueue(samples, [f"prompt {i}" for i in range(n)], round_index=1)


def test_the_page_shows_and_accepts_nothing_that_is_not_authorised(tmp_path):
    oracle, keys = _queue(tmp_path, 3)
    server = start_rating_server(str(tmp_path), raters=TOKENS, port=0, announce=False)
    url = server.url
    try:
        for token in (None, "wrong", "alice-token "[:-2]):  # no token, an unknown one, a prefix of a real one
            status, body = _call(url, "/api/next", token)
            assert status == 401 and "prompt" not in body and "assignment" not in body
        status, a = _call(url, "/api/next", "alice-token")
        assert status == 200 and a["rater"] == "alice" and a["prompt"] == "prompt 0" and a["scale"] == list(range(1, 11))
        _, b = _call(url, "/api/next", "bob-token")  # two raters at once: different queries
        assert b["prompt"] == "prompt 1" and b["assignment"] != a["assignment"]
        status, png = _call(url, a["images"][0], "alice-token")
        assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n" and len(a["images"]) == 1
        assert _call(url, a["images"][0], "bob-token")[0] == 403  # bob cannot see alice's query
        assert _call(url, a["images"][0])[0] == 401
        assert _call(url, a["images"][0][:-1] + "1", "alice-token")[0] == 403  # no second image of a score query
        # bob cannot answer alice's assignment, nor one the server never issued; nobody can name another rater
        assert _call(url, "/api/rate", "bob-token", {"assignment": a["assignment"], "value": 9})[0] == 403
        assert _call(url, "/api/rate", "alice-token", {"assignment": "made-up", "value": 9})[0] == 403
        assert _call(url, "/api/rate", "alice-token", {"assignment": a["assignment"], "value": 9,
                                                       "rater": "bob"})[0] == 400
        for bad in (11, 0, 2.5, "7", None, float("nan"), True):  # off the scale, off its step, not a number
            status, body = _call(url, "/api/rate", "alice-token", {"assignment": a["assignment"], "value": bad})
            assert status == 400, bad
        assert _call(url, "/api/rate", "alice-token", {"assignment": a["assignment"], "value": 7})[0] == 200
        assert _call(url, "/api/rate", "alice-token", {"assignment": a["assignment"], "value": 8})[0] == 409  # replay
        assert _call(url, "/api/next", "alice-token")[1]["prompt"] == "prompt 2"  # not bob's open query
        ratings = RatingFiles(str(tmp_path)).read_lines(RatingFiles(str(tmp_path)).ratings_path)[0]
        assert [(r["key"], r["rater"], r["value"]) for r in ratings] == [(keys[0], "alice", 7.0)]
    finally:
        server.shutdown()
        server.server_close()


def test_each_query_is_rated_by_different_raters_and_averaged(tmp_path):
    oracle, keys = _queue(tmp_path, 2, ratings_per_query=2)
    server = start_rating_server(str(tmp_path), raters=TOKENS, port=0, announce=False, ratings_per_query=2)
    try:
        seen, given = {"alice": [], "bob": []}, {"prompt 0": [], "prompt 1": []}
        for rater, value in (("alice", 2), ("bob", 4), ("alice", 10), ("bob", 10)):
            _, a = _call(server.url, "/api/next", TOKENS[rater])
            seen[rater].append(a["prompt"])
            given[a["prompt"]].append(value)
            assert _call(server.url, "/api/rate", TOKENS[rater], {"assignment": a["assignment"], "value": value})[0] == 200
        assert sorted(seen["alice"]) == sorted(seen["bob"]) == ["prompt 0", "prompt 1"]  # never twice to one rater
        assert _call(server.url, "/api/next", "alice-token")[1]["assignment"] is None
        answers = dict(oracle.answers(keys))
        assert [answers[i].value for i in (0, 1)] == [sum(given[p]) / 2 for p in ("prompt 0", "prompt 1")]
        assert sorted(given["prompt 0"] + given["prompt 1"]) == [2, 4, 10, 10] and answers[0].status == "ok"
    finally:
        server.shutdown()
        server.server_close()


def test_pairwise_mode_turns_preferences_into_bradley_terry_values(tmp_path):
    oracle = HumanOracle(str(tmp_path), ratings_per_query=2, mode="pairwise", value_range=(-1, 1))
    keys = oracle.enqueue(torch.linspace(-1, 1, 3 * 16).reshape(3, 16), ["a cat", "a cat", "a dog"], round_index=1)
    server = start_rating_server(str(tmp_path), raters=TOKENS, port=0, announce=False, ratings_per_query=2,
                                 mode="pairwise")
    order = {keys[0]: 0, keys[1]: 1, keys[2]: 2}  # the rater prefers the lower index
    pairs, shown_first = set(), None
    try:
        while True:
            _, a = _call(server.url, "/api/next", TOKENS["alice"] if len(pairs) % 2 == 0 else TOKENS["bob"])
            if a["assignment"] is None:
                break
            assert len(a["images"]) == 2
            assert _call(server.url, "/api/rate", "alice-token", {"assignment": a["assignment"], "value": 1})[0] in (400, 403)
            shown = server.board.open[a["assignment"]][1]
            shown_first = shown_first or set(shown)
            pairs.add((a["rater"],) + tuple(sorted(shown)))
            better = 0 if order[shown[0]] < order[shown[1]] else 1
            token = TOKENS[a["rater"]]
            assert _call(server.url, "/api/rate", token, {"assignment": a["assignment"], "better": 2})[0] == 400
            assert _call(server.url, "/api/rate", token, {"assignment": a["assignment"], "better": better})[0] == 200
        answers = dict(oracle.answers(keys))
        assert shown_first == {keys[0], keys[1]}  # two samples of one prompt first, when the round has them
        values = [answers[i].value for i in range(3)]
        assert values[0] > values[1] > values[2] and all(a.status == "ok" for a in answers.values())
        assert len(pairs) == len(set(pairs))  # no rater saw one pair twice
    finally:
        server.shutdown()
        server.server_close()


def test_a_busy_port_names_the_flag(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        oracle = HumanOracle(str(tmp_path), serve=True, port=busy.getsockname()[1], raters=["alice"])
        with pytest.raises(OSError, match="cannot serve the rating page on 127.0.0.1:.*--rating_port"):
            oracle.enqueue(torch.zeros(1, 16))
    assert RatingFiles(str(tmp_path)).raters() == {}  # no token was made that nobody was shown


def test_rating_scale_and_samples_as_images():
    scale = RatingScale(-1, 1, 0.5)
    assert scale.values() == [-1, -0.5, 0, 0.5, 1] and scale.accepts(0.5) and not scale.accepts(0.25)
    with pytest.raises(ValueError, match="minimum < maximum"):
        RatingScale(5, 1)


def test_videos_are_refused_with_one_clear_line(tmp_path):
    oracle = HumanOracle(str(tmp_path))
    with pytest.raises(ValueError, match="rating page shows images.*videos"):
        oracle.enqueue(torch.rand(2, 5, 3, 8, 8), ["a", "b"])


def _start_child(out, port):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-u", CHILD, str(out), str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            status, body = _call(url, "/api/progress", "alice-token")
            if status == 200 and body["progress"]["total"] > body["progress"]["done"]:
                return proc, url
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(proc.communicate()[0][-3000:])


def _rate(url, token, n, value=6):
    for _ in range(n):
        a = _call(url, "/api/next", token)[1]
        assert a["assignment"], a
        assert _call(url, "/api/rate", token, {"assignment": a["assignment"], "value": value})[0] == 200


def _check_nothing_lost(out, queries=8):
    files = RatingFiles(str(out))
    queue = files.read_lines(files.queue_path)[0]
    ratings = files.read_lines(files.ratings_path)[0]
    assert len(queue) == len({q["key"] for q in queue}) == queries  # no query queued twice
    assert len(ratings) == len({r["key"] for r in ratings}) == queries  # each rated once, nobody asked twice
    fb = load_feedback(str(out))
    assert fb["status"] == ["ok"] * queries
    by_key = {r["key"]: r["value"] for r in ratings}
    assert sorted(fb["value"]) == sorted(by_key.values())
    return ratings


def test_a_killed_trainer_loses_no_rating_and_asks_nothing_twice(tmp_path):
    out, port = tmp_path / "run", _port()
    proc, url = _start_child(out, port)
    try:
        _rate(url, "alice-token", 2, value=3)  # half of round 1
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc, url = _start_child(out, port)  # the restarted trainer serves the 2 queries still open
        progress = _call(url, "/api/progress", "bob-token")[1]["progress"]
        assert progress == {"round": 1, "done": 2, "total": 4, "ratings": 2}
        _rate(url, "bob-token", 2, value=8)
        deadline = time.time() + 60
        while time.time() < deadline and _call(url, "/api/progress", "alice-token")[1]["progress"]["round"] != 2:
            time.sleep(0.2)
        _rate(url, "alice-token", 4, value=5)
        log, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # a failed assertion never leaves a trainer (and its port) behind
            proc.kill()
    assert proc.returncode == 0 and "finished" in log, log[-3000:]
    ratings = _check_nothing_lost(out)
    assert sorted(r["value"] for r in ratings) == [3, 3, 5, 5, 5, 5, 8, 8]


def _chromium():
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None and os.environ.get("CI"):
        raise AssertionError("CI needs Debian's chromium for the browser tests (.ci/run installs it)")
    return path


@pytest.mark.slow
def test_people_rate_a_seiko_run_in_a_real_browser(tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    out, port = tmp_path / "run", _port()
    proc, url = _start_child(out, port)
    try:
        _browser_session(sync_playwright, chromium, url)
        log, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "finished" in log, log[-3000:]
    ratings = _check_nothing_lost(out)
    assert sorted(r["value"] for r in ratings) == [1, 2, 4, 5, 6, 7, 9, 10]
    assert {r["rater"] for r in ratings} == {"alice"}


def _browser_session(sync_playwright, chromium, url):
    """One rater in Chromium: a wrong token, half a round, the tab closed, the login link, the rest of both rounds."""
    shot = os.environ.get("HF_CONTROL_FT_SCREENSHOT")  # set to write a picture of the page
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 800, "height": 760})
        page = context.new_page()
        page.goto(url)
        page.fill("#token", "not-a-token")  # a wrong token shows nothing
        page.click("#login")
        page.wait_for_selector("#status:has-text('not valid')")
        assert page.is_hidden("#rate-view")
        page.fill("#token", "alice-token")
        page.click("#login")

        def rate(page, value):
            page.wait_for_selector("#image[data-assignment]")
            before = page.get_attribute("#image", "data-assignment")
            page.click(f".score[data-value='{value}']")
            for _ in range(600):  # the next query, or "nothing to rate" (polled: the page's CSP forbids eval)
                if page.get_attribute("#image", "data-assignment") != before or page.is_visible("#waiting"):
                    break
                page.wait_for_timeout(50)

        page.wait_for_selector("#progress:has-text('Round 1: 0 of 4')")
        if shot:
            page.screenshot(path=shot)
        rate(page, 7)
        rate(page, 9)
        page.close()  # the tab is closed mid-round
        page = context.new_page()
        page.goto(f"{url}/#token=alice-token")  # the login link
        page.wait_for_selector("#progress:has-text('Round 1: 2 of 4')")
        assert "token" not in page.url
        rate(page, 2)
        rate(page, 4)
        page.wait_for_selector("#progress:has-text('Round 2: 0 of 4')", timeout=60_000)  # round 1 trained
        for value in (1, 5, 6, 10):
            rate(page, value)
        page.wait_for_selector("#waiting:not(.hidden)")
        browser.close()


def test_the_seiko_script_with_people_as_the_oracle(tmp_path, monkeypatch):
    """``train_seiko.py --oracle human``: the script serves the page itself; people rate a round of a tiny Stable
    Diffusion run over HTTP and the script saves the fine-tuned model."""
    import threading

    from hf_control_ft.scripts import run_seiko
    from hf_control_ft.testing import tiny_sd_pipeline

    tiny_sd_pipeline().save_pretrained(tmp_path / "tiny-sd")
    out, port = tmp_path / "seiko", _port()
    RatingFiles(str(out)).add_raters(["alice"], tokens={"alice": "alice-token"})  # an organisation's own token
    argv = ["--pretrained_model_name_or_path", str(tmp_path / "tiny-sd"), "--prompts", "a red cat", "the sea",
            "--oracle", "human", "--raters", "alice", "--rating_port", str(port), "--rating_scale", "0", "1", "0.5",
            "--num_inference_steps=3", "--batch_size", "2", "--value_num_rollouts", "4", "--value_train_steps", "2",
            "--noise_train_steps", "2", "--noise_batch_size", "8", "--num_validation_images", "1", "--num_rounds", "1",
            "--queries_per_round", "4", "--reward_train_steps", "3", "--train_steps", "1", "--output_dir", str(out),
            "--report_to", "none", "--feature_model_name_or_path", "pixels",
            "--resolution", "16", "--gradient_accumulation_steps", "1", "--rollout_batch_size", "4",  # not SD 1.5's
            "--checkpointing_steps", "0"]                                                           # preset
    result = {}
    thread = threading.Thread(target=lambda: result.update(code=run_seiko(argv)), daemon=True)
    thread.start()
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 120
    while time.time() < deadline:
        try:
            if _call(url, "/api/progress", "alice-token")[1]["progress"]["total"] == 4:
                break
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.2)
    for value in (0, 0.5, 1, 1):
        a = _call(url, "/api/next", "alice-token")[1]
        assert a["prompt"] in ("a red cat", "the sea") and len(a["images"]) == 1
        png = _call(url, a["images"][0], "alice-token")[1]
        assert png[:4] == b"\x89PNG"
        assert _call(url, "/api/rate", "alice-token", {"assignment": a["assignment"], "value": value})[0] == 200
    thread.join(300)
    assert result.get("code") == 0
    fb = load_feedback(str(out))
    assert fb["status"] == ["ok"] * 4 and sorted(fb["value"]) == [0, 0.5, 1, 1]
    assert os.path.isfile(out / "pytorch_lora_weights.safetensors")


def test_hf_control_ft_rate_serves_a_run_from_another_process(tmp_path):
    """``hf-control-ft rate OUTPUT_DIR``: the page of a run whose trainer runs elsewhere; a new rater's login link
    is written to a file only its owner reads, never to standard output; Ctrl-C stops it."""
    out, port = tmp_path / "run", _port()
    HumanOracle(str(out)).enqueue(torch.zeros(2, 16), ["a", "b"], round_index=1)  # what a trainer queued
    proc = subprocess.Popen([sys.executable, "-m", "hf_control_ft.cli", "rate", str(out), "--raters", "carol",
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": ROOT})
    try:
        lines = [proc.stdout.readline() for _ in range(2)]
        assert lines[0].startswith(f"rating page for {out}: http://127.0.0.1:{port}/")
        login = out / "ratings" / "logins" / "carol.url"
        assert "#token=" not in lines[1] and str(login.parent) in lines[1] and "carol" in lines[1]
        assert oct(login.stat().st_mode & 0o777) == "0o600"
        token = login.read_text().strip().split("#token=")[1]
        status, body = _call(f"http://127.0.0.1:{port}", "/api/progress", token)
        assert status == 200 and body["rater"] == "carol" and body["progress"]["total"] == 2
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)  # drains both pipes: a full stderr pipe would block the child
        assert proc.returncode == 0, stderr[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            stdout, stderr = proc.communicate()
    printed = stdout + stderr
    assert token not in printed + "".join(lines) and token not in json.dumps(RatingFiles(str(out)).raters())
