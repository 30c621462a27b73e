"""The feedback dataset pushed to a (local, in-process) Hub as a dataset repo with ``datasets``' ``push_to_hub``."""

import math

import datasets.config
import torch
from datasets import Dataset
from hub_server import HubServer
from huggingface_hub import hf_hub_download

from hf_control_ft.feedback.oracle import OracleAnswer
from hf_control_ft.feedback.store import FeedbackDataset


def test_feedback_push_to_hub_writes_a_loadable_dataset_repo(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_DISABLE_XET", True)
    fb = FeedbackDataset(str(tmp_path / "fb"), (1, 2))
    q = fb.add_pending(torch.arange(6.0).reshape(3, 1, 2), round_index=1, prompts=["a cat", "the dog", "a car"])
    fb.record(q[:2], [OracleAnswer(1.5, "ok", "", 1), OracleAnswer(math.nan, "failed", "assay crashed", 2)], 0)
    endpoint_before = datasets.config.HF_ENDPOINT
    token = "hf_test_feedback_token_789"
    with HubServer() as hub:
        first = fb.push_to_hub("me/feedback", token=token, endpoint=hub.url)
        assert datasets.config.HF_ENDPOINT == endpoint_before  # restored after the push
        repo = hub.dataset_repos["me/feedback"]
        assert "me/feedback" not in hub.repos  # a dataset repo, not a model repo
        assert first.oid == repo.sha and repo.commits == ["feedback: 3 queries"]
        assert {"README.md", "data/train-00000-of-00001.parquet"} <= set(repo.files)
        assert all(auth == f"Bearer {token}" for auth in hub.authorizations)

        fb.record([2], [OracleAnswer(-0.25, "ok", "", 1)], 1)  # a later push replaces the rows
        fb.add_pending(torch.full((1, 1, 2), 9.0), round_index=2, prompts=["a cat"])
        fb.push_to_hub("me/feedback", token=token, endpoint=hub.url)
        assert repo.commits == ["feedback: 3 queries", "feedback: 4 queries"]
        assert [p for p in repo.files if p.endswith(".parquet")] == ["data/train-00000-of-00001.parquet"]
        card = repo.files["README.md"].decode()
        assert card.startswith("---\n") and "num_examples: 4" in card

        path = hf_hub_download("me/feedback", "data/train-00000-of-00001.parquet", repo_type="dataset",
                               endpoint=hub.url, cache_dir=str(tmp_path / "cache"))
    pulled = Dataset.from_parquet(path, cache_dir=str(tmp_path / "pq"))
    assert pulled.num_rows == 4 and pulled["query_index"] == [0, 1, 2, 3] and pulled["round"] == [1, 1, 1, 2]
    assert pulled["prompt"] == ["a cat", "the dog", "a car", "a cat"]
    assert pulled["status"] == ["ok", "failed", "ok", "pending"] and pulled["error"][1] == "assay crashed"
    assert pulled["value"][0] == 1.5 and pulled["value"][2] == -0.25 and math.isnan(pulled["value"][1])
    torch.testing.assert_close(torch.tensor(pulled["sample"]).reshape(4, 1, 2), fb.samples([0, 1, 2, 3]))
