"""A minimal in-process Hugging Face Hub for tests: the endpoints huggingface_hub 2.x calls for
``create_repo``, ``upload_folder`` / ``create_commit`` (regular, non-LFS uploads), ``repo_info``,
``list_repo_tree``, ``snapshot_download`` and ``hf_hub_download``, for model repos and (``repo_type="dataset"``,
what ``datasets.Dataset.push_to_hub`` uses) dataset repos.

Run on ``127.0.0.1`` with an ephemeral port; point the client at it with ``HfApi(endpoint=server.url)`` or
``endpoint=server.url``. Set ``HF_HUB_DISABLE_XET=1`` (the server never offers xet storage; its preupload
answer is always ``"regular"`` so every file travels base64-encoded inside the NDJSON commit).

``server.refuse_commits[repo_id] = message`` makes the commit endpoint answer 403 with ``message``.
Model repos are in ``server.repos``, dataset repos in ``server.dataset_repos`` (both keyed by repo id).
Files whose name ends with one of ``server.lfs_suffixes`` (default ``.parquet``, as the Hub's
``.gitattributes`` does) are answered ``"lfs"`` by preupload and travel by the basic LFS protocol (batch
request, then a PUT of the content, stored by sha256), as ``datasets`` expects: it deletes its temporary Parquet
shards right after ``preupload_lfs_files``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

REPO = r"(?P<repo>[^/]+/[^/]+)"
KIND = r"(?P<kind>models|datasets)"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Repo:
    def __init__(self, private: bool):
        self.private = private
        self.files: dict[str, bytes] = {}
        self.sha = hashlib.sha1(b"initial").hexdigest()
        self.commits: list[str] = []


class HubServer:
    """Start with ``with HubServer() as hub: ...``; ``hub.url`` is the endpoint, ``hub.requests`` the log of
    ``(method, path, has_authorization)``."""

    def __init__(self):
        self.repos: dict[str, _Repo] = {}
        self.dataset_repos: dict[str, _Repo] = {}
        self.lfs_suffixes: tuple[str, ...] = (".parquet",)
        self.lfs_objects: dict[str, bytes] = {}
        self.refuse_commits: dict[str, str] = {}
        self.requests: list[tuple[str, str, bool]] = []
        self.authorizations: list[str] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def store(self, kind: str) -> dict[str, _Repo]:
        """The repos of one type: ``"models"`` / ``"model"`` or ``"datasets"`` / ``"dataset"``."""
        return self.dataset_repos if kind in ("datasets", "dataset") else self.repos

    # ------------------------------------------------------------------ handler
    def _handler_class(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                return

            def _send(self, status: int, body=b"", content_type="application/json", headers=None, head=False):
                if not isinstance(body, bytes):
                    body = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _error(self, status: int, message: str, code: str | None = None, head=False):
                headers = {"X-Error-Message": message}
                if code:
                    headers["X-Error-Code"] = code
                self._send(status, {"error": message}, headers=headers, head=head)

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _record(self):
                auth = self.headers.get("Authorization")
                with hub._lock:
                    hub.requests.append((self.command, self.path, auth is not None))
                    if auth:
                        hub.authorizations.append(auth)

            def _repo(self, repo_id, head=False, kind="models"):
                repo = hub.store(kind).get(repo_id)
                if repo is None:
                    self._error(404, f"Repository {repo_id} not found", "RepoNotFound", head=head)
                return repo

            # ---------------------------------------------------------- routes
            def do_POST(self):
                self._record()
                path = urlparse(self.path).path
                body = self._body()
                if path == "/api/repos/create":
                    payload = json.loads(body)
                    repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
                    kind = payload.get("type") or "model"
                    url = f"{hub.url}/{repo_id}" if kind == "model" else f"{hub.url}/{kind}s/{repo_id}"
                    with hub._lock:
                        store = hub.store(kind)
                        if repo_id in store:  # the Hub's 409 body also carries the url
                            message = f"You already created this {kind} repo"
                            return self._send(409, {"error": message, "url": url},
                                              headers={"X-Error-Message": message})
                        store[repo_id] = _Repo(payload.get("visibility") == "private")
                    return self._send(200, {"url": url, "name": repo_id})
                if path == "/api/validate-yaml":
                    return self._send(200, {"errors": [], "warnings": []})
                m = re.fullmatch(rf"/api/{KIND}/{REPO}/preupload/(?P<rev>[^/]+)", path)
                if m:
                    if self._repo(m["repo"], kind=m["kind"]) is None:
                        return None
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [
                        {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(hub.lfs_suffixes) else "regular",
                         "shouldIgnore": False, "oid": None} for f in files]})
                m = re.fullmatch(r"(?:/(?P<kind>datasets))?/(?P<repo>[^/]+/[^/]+?)\.git/info/lfs/objects/batch", path)
                if m:
                    if self._repo(m["repo"], kind=m["kind"] or "models") is None:
                        return None
                    objects = json.loads(body)["objects"]
                    return self._send(200, {"transfer": "basic", "objects": [
                        {"oid": o["oid"], "size": o["size"],
                         "actions": {"upload": {"href": f"{hub.url}/lfs-upload/{o['oid']}"}}} for o in objects]})
                m = re.fullmatch(rf"/api/{KIND}/{REPO}/commit/(?P<rev>[^/]+)", path)
                if m:
                    return self._commit(m["repo"], body, m["kind"])
                return self._error(404, f"unknown endpoint POST {path}")

            def _commit(self, repo_id, body, kind="models"):
                repo = self._repo(repo_id, kind=kind)
                if repo is None:
                    return None
                if repo_id in hub.refuse_commits:
                    return self._error(403, hub.refuse_commits[repo_id])
                added, summary = {}, ""
                for line in body.splitlines():
                    if not line.strip():
                        continue
                    item = json.loads(line)
                    if item["key"] == "header":
                        summary = item["value"]["summary"]
                    elif item["key"] == "lfsFile":
                        value = item["value"]
                        if value["oid"] not in hub.lfs_objects:
                            return self._error(400, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                        added[value["path"]] = hub.lfs_objects[value["oid"]]
                    elif item["key"] == "file":
                        value = item["value"]
                        if value.get("encoding") != "base64":
                            return self._error(400, f"unsupported encoding {value.get('encoding')!r}")
                        added[value["path"]] = base64.b64decode(value["content"])
                    else:
                        return self._error(400, f"this test hub supports regular file additions only, got "
                                                f"{item['key']!r}")
                with hub._lock:
                    repo.files.update(added)
                    repo.sha = hashlib.sha1((repo.sha + summary + json.dumps(sorted(added))).encode()).hexdigest()
                    repo.commits.append(summary)
                prefix = "/datasets" if kind == "datasets" else ""
                return self._send(200, {"commitUrl": f"{hub.url}{prefix}/{repo_id}/commit/{repo.sha}",
                                        "commitOid": repo.sha, "pullRequestUrl": None})

            def do_PUT(self):
                self._record()
                path = urlparse(self.path).path
                body = self._body()
                m = re.fullmatch(r"/lfs-upload/(?P<oid>[0-9a-f]{64})", path)
                if m is None:
                    return self._error(404, f"unknown endpoint PUT {path}")
                if hashlib.sha256(body).hexdigest() != m["oid"]:
                    return self._error(400, "LFS upload: content does not match its sha256")
                with hub._lock:
                    hub.lfs_objects[m["oid"]] = body
                return self._send(200, {})

            def do_GET(self):
                self._record()
                self._get(head=False)

            def do_HEAD(self):
                self._record()
                self._get(head=True)

            def _get(self, head: bool):
                path = unquote(urlparse(self.path).path)
                m = re.fullmatch(rf"/api/{KIND}/{REPO}(/revision/(?P<rev>[^/]+))?", path)
                if m:
                    repo = self._repo(m["repo"], head, m["kind"])
                    if repo is None:
                        return None
                    return self._send(200, {"id": m["repo"], "sha": repo.sha, "private": repo.private,
                                            "siblings": [{"rfilename": p} for p in sorted(repo.files)]}, head=head)
                m = re.fullmatch(rf"/api/{KIND}/{REPO}/tree/(?P<rev>[^/]+)(?P<sub>/.*)?", path)
                if m:
                    repo = self._repo(m["repo"], head, m["kind"])
                    if repo is None:
                        return None
                    prefix = (m["sub"] or "").strip("/")
                    recursive = parse_qs(urlparse(self.path).query).get("recursive", ["false"])[0].lower() == "true"
                    under = {p[len(prefix) + 1:] if prefix else p: d for p, d in sorted(repo.files.items())
                             if not prefix or p.startswith(prefix + "/")}
                    if prefix and not under:  # like the Hub: a folder that does not exist is a 404
                        return self._error(404, f"Entry {prefix} not found", "EntryNotFound", head=head)
                    entries, folders = [], set()
                    for rel, d in under.items():
                        full = f"{prefix}/{rel}" if prefix else rel
                        if recursive or "/" not in rel:
                            entries.append({"type": "file", "path": full, "size": len(d), "oid": git_blob_sha1(d)})
                        if not recursive and "/" in rel:
                            folders.add(f"{prefix}/{rel.split('/')[0]}" if prefix else rel.split("/")[0])
                    entries += [{"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest()}
                                for f in sorted(folders)]
                    return self._send(200, entries, head=head)
                m = re.fullmatch(rf"(?:/(?P<kind>datasets))?/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path)
                if m:
                    repo = self._repo(m["repo"], head, m["kind"] or "models")
                    if repo is None:
                        return None
                    data = repo.files.get(m["file"])
                    if data is None:
                        return self._error(404, f"Entry {m['file']} not found", "EntryNotFound", head=head)
                    return self._send(200, data, content_type="application/octet-stream", head=head,
                                      headers={"X-Repo-Commit": repo.sha, "ETag": f'"{git_blob_sha1(data)}"'})
                return self._error(404, f"unknown endpoint GET {path}", head=head)

        return Handler
