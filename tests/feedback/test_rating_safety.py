"""The rating page under crashes, full disks, a second page on the same run, careless settings and hostile
clients: a torn line costs that line only, nobody rates a query twice, settings that would deadlock are refused,
access can be revoked, tokens are stored salted, files are the operator's only, a skipped query asked again reaches
people, and every bad request is answered."""

import hashlib
import json
import os
import socket
import time

import pytest
import torch
from test_rating import TOKENS, _call, _queue

from hf_control_ft.feedback.human_oracle import HumanOracle
from hf_control_ft.feedback.rating import RatingFiles, RatingScale, RatingSettingsError, token_matches
from hf_control_ft.feedback.rating_server import start_rating_server
from polling import within


@pytest.fixture
def page(tmp_path):
    servers = []

    def start(**kw):
        server = start_rating_server(str(tmp_path), raters=TOKENS, port=0, announce=False, **kw)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _rate(url, token, value=7):
    _, a = _call(url, "/api/next", token)
    return a, _call(url, "/api/rate", token, {"assignment": a["assignment"], "value": value})


def test_a_torn_ratings_line_costs_that_rating_and_nothing_else(tmp_path, page, caplog):
    """A crash (or a full disk) mid-append leaves half a line: the page and the trainer skip it with a warning, the
    next rating is intact and every later request is answered."""
    oracle, keys = _queue(tmp_path, 3)
    server = page()
    _rate(server.url, "alice-token", 3)
    files = RatingFiles(str(tmp_path))
    with open(files.ratings_path, "ab") as f:
        f.write(b'{"assignment": "torn", "key": "' + keys[1].encode() + b'", "rater": "bob", "val')  # the crash
    a, (status, _) = _rate(server.url, "bob-token", 9)
    assert status == 200
    records, _ = files.read_lines(files.ratings_path)
    assert [(r["rater"], r["value"]) for r in records] == [("alice", 3.0), ("bob", 9.0)]
    assert "skipped a damaged line" in caplog.text
    _, (status, _) = _rate(server.url, "alice-token", 5)
    assert status == 200
    answers = dict(oracle.answers(keys))  # the trainer reads past it too
    assert sorted(a.value for a in answers.values()) == [3.0, 5.0, 9.0]


def test_a_failed_write_leaves_nothing_half_written(tmp_path, monkeypatch):
    """``os.write`` on a full disk writes part of the line, then fails: the part is cut off again."""
    files = RatingFiles(str(tmp_path))
    files.add_rating("k0", "alice", 3.0, "a0")
    real_write = os.write

    def full_disk(fd, data):
        real_write(fd, bytes(data[:10]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(OSError, match="No space"):
        files.add_rating("k1", "alice", 4.0, "a1")
    monkeypatch.setattr(os, "write", real_write)
    files.add_rating("k2", "alice", 5.0, "a2")
    assert [r["key"] for r in files.read_lines(files.ratings_path)[0]] == ["k0", "k2"]
    assert open(files.ratings_path, "rb").read().count(b"\n") == 2


def test_two_pages_on_one_run_cannot_take_a_rating_twice(tmp_path, page):
    _queue(tmp_path, 2)
    first, second = page(), page()
    a1 = _call(first.url, "/api/next", "alice-token")[1]
    a2 = _call(second.url, "/api/next", "alice-token")[1]
    assert a1["prompt"] == a2["prompt"]  # each page alone would hand alice the same query
    assert _call(first.url, "/api/rate", "alice-token", {"assignment": a1["assignment"], "value": 4})[0] == 200
    status, body = _call(second.url, "/api/rate", "alice-token", {"assignment": a2["assignment"], "value": 8})
    assert status == 409 and "already answered" in body["error"]
    records = RatingFiles(str(tmp_path)).read_lines(RatingFiles(str(tmp_path)).ratings_path)[0]
    assert [(r["rater"], r["value"]) for r in records] == [("alice", 4.0)]


def test_a_page_with_other_rating_settings_than_the_trainers_is_refused(tmp_path):
    """ratings_per_query 2 in the trainer, 1 on the page: the page would hand each query to one rater and the
    trainer wait for a second one forever."""
    HumanOracle(str(tmp_path), ratings_per_query=2).enqueue(torch.zeros(1, 16), ["a"], round_index=1)
    with pytest.raises(RatingSettingsError, match="ratings_per_query=1 .*the run's: 2"):
        start_rating_server(str(tmp_path), raters=TOKENS, port=0, announce=False, ratings_per_query=1,
                            started_by="this page (--ratings_per_query)")
    with pytest.raises(RatingSettingsError, match="mode='pairwise'"):
        HumanOracle(str(tmp_path), ratings_per_query=2, mode="pairwise").enqueue(torch.zeros(1, 16), ["a"])
    with pytest.raises(RatingSettingsError, match="scale"):
        HumanOracle(str(tmp_path), ratings_per_query=2, scale=RatingScale(0, 5, 1)).enqueue(torch.zeros(1, 16), ["a"])
    server = start_rating_server(str(tmp_path), raters=TOKENS, port=0, announce=False, ratings_per_query=2)
    server.shutdown()
    server.server_close()


def test_a_revoked_rater_is_out_at_once_and_tokens_are_stored_salted(tmp_path, page):
    _queue(tmp_path, 2)
    server = page()
    assert _call(server.url, "/api/next", "bob-token")[0] == 200
    files = RatingFiles(str(tmp_path))
    stored = files.raters()["bob"]
    assert stored.startswith("pbkdf2_sha256$") and "bob-token" not in stored
    assert stored != hashlib.sha256(b"bob-token").hexdigest() and token_matches("bob-token", stored)
    assert files.raters()["alice"] != stored.replace("bob", "alice")  # a salt per rater
    assert files.revoke_raters(["bob", "nobody"]) == ["bob"]
    assert _call(server.url, "/api/next", "bob-token")[0] == 401  # the running page, no restart
    assert _call(server.url, "/api/next", "alice-token")[0] == 200
    legacy = {"carol": hashlib.sha256(b"carol-token").hexdigest()}  # raters.json of an earlier version still works
    registry = {**files.raters(), **legacy}
    with open(files.raters_path, "w") as f:
        json.dump(registry, f)
    assert _call(server.url, "/api/next", "carol-token")[1]["rater"] == "carol"


def test_rating_files_are_the_operators_only(tmp_path, page):
    oracle, keys = _queue(tmp_path, 1)
    server = page()
    _rate(server.url, "alice-token")
    ratings = tmp_path / "ratings"
    for path in (ratings, ratings / "images"):
        assert oct(path.stat().st_mode & 0o777) == "0o700", path
    for path in (ratings / "queue.jsonl", ratings / "ratings.jsonl", ratings / "raters.json",
                 ratings / "settings.json", ratings / "images" / f"{keys[0]}.png"):
        assert oct(path.stat().st_mode & 0o777) == "0o600", path


def test_a_skipped_query_asked_again_reaches_people_again(tmp_path, page):
    """Everybody skipped it: a failed query. The trainer asks it again (same image, same prompt, same key): it is
    queued again, shown again, and its new rating is the answer."""
    oracle, keys = _queue(tmp_path, 1)
    server = page()
    _, a = _call(server.url, "/api/next", "alice-token")
    assert _call(server.url, "/api/rate", "alice-token", {"assignment": a["assignment"], "skip": True})[0] == 200
    answers = dict(oracle.answers(keys))
    assert answers[0].status == "failed"
    assert _call(server.url, "/api/next", "alice-token")[1]["assignment"] is None
    time.sleep(0.01)
    again = oracle.enqueue(torch.linspace(-1, 1, 16).reshape(1, 16), ["prompt 0"], round_index=2)
    assert again == keys[:1]
    a, (status, _) = _rate(server.url, "alice-token", 6)  # the same rater may answer it now
    assert status == 200 and a["prompt"] == "prompt 0"
    answers = dict(oracle.answers(again))
    assert answers[0].status == "ok" and answers[0].value == 6.0
    # a query with a rating is never queued again
    oracle.enqueue(torch.linspace(-1, 1, 16).reshape(1, 16), ["prompt 0"], round_index=3)
    assert len(RatingFiles(str(tmp_path)).read_lines(RatingFiles(str(tmp_path)).queue_path)[0]) == 2


def _raw(port, data):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(data)
        return conn.recv(65536)


def test_bad_requests_to_the_page_are_answered_and_connections_bounded(tmp_path, page):
    _queue(tmp_path, 1)
    server = page(max_connections=4)
    port = server.server_address[1]
    head = b"POST /api/rate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer alice-token\r\nContent-Type: application/json\r\n"
    assert _raw(port, head + b"Content-Length: -1\r\n\r\n").startswith(b"HTTP/1.1 400")  # the 4 KiB cap not skipped
    assert _raw(port, head + b"Content-Length: 5000\r\n\r\n").startswith(b"HTTP/1.1 413")
    assert _raw(port, head + b"Content-Length: 6\r\n\r\n[[[[[[").startswith(b"HTTP/1.1 400")
    assert _raw(port, head + b"Content-Length: 2\r\n\r\n[]").startswith(b"HTTP/1.1 400")
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
    get = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    assert within(5.0, lambda: _raw(port, get).startswith(b"HTTP/1.1 503"))  # once the server has counted them
    for conn in held:
        conn.close()
    assert within(5.0, lambda: _raw(port, get).startswith(b"HTTP/1.1 200"))  # and once it has let them go
