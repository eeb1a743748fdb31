"""--push_to_hub against a small local stand-in for the Hub API (HF_ENDPOINT), speaking what huggingface_hub sends."""
import base64
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import run_job
from resume_helpers import resume_args, with_env

TOKEN = "hf_testSECRETtoken0123456789"


class FakeHub(BaseHTTPRequestHandler):
    """create_repo, validate-yaml, preupload (every file 'regular': sent inline) and commit (ndjson)."""

    failing = False
    requests: list = []
    commits: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.requests.append((self.path, self.headers.get("Authorization"), body))
        if self.failing:
            return self.reply(403, {"error": "forbidden"})
        if self.path == "/api/repos/create":
            return self.reply(200, {"url": f"http://127.0.0.1/{json.loads(body)['name']}"})
        if self.path == "/api/validate-yaml":
            return self.reply(200, {})
        if "/preupload/" in self.path:
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                     for f in json.loads(body)["files"]]
            return self.reply(200, {"files": files})
        if "/commit/" in self.path:
            items = [json.loads(line) for line in body.splitlines() if line.strip()]
            self.commits.append({item["value"]["path"]: base64.b64decode(item["value"]["content"])
                                 for item in items if item["key"] == "file"})
            return self.reply(200, {"commitUrl": "http://127.0.0.1/commit/1", "commitOid": "0" * 40})
        return self.reply(404, {"error": self.path})

    def reply(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_hub(job_env):
    def start(failing: bool):
        handler = type("Hub", (FakeHub,), {"failing": failing, "requests": [], "commits": []})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        env = with_env(job_env, HF_ENDPOINT=f"http://127.0.0.1:{server.server_address[1]}", HF_HUB_OFFLINE=0,
                       HF_HUB_DISABLE_TELEMETRY=1)
        return handler, env

    servers = []
    yield start
    for server in servers:
        server.shutdown()


def assert_token_nowhere(result, out) -> None:
    assert TOKEN not in result.stdout + result.stderr
    for root, _, files in os.walk(out):  # model card, trainer_state.json args, TensorBoard events, ...
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                assert TOKEN.encode() not in handle.read(), os.path.join(root, name)


def test_push_every_save_uploads_checkpoints_and_final_model_with_a_model_card(
        fake_hub, corpus, tokenizer_dir, tmp_path):
    hub, env = fake_hub(failing=False)
    out = tmp_path / "run"
    result = run_job("trainer.mlm", resume_args(corpus, tokenizer_dir, out, 1, "--push_to_hub", "--hub_model_id",
                                                "me/tiny-mlm", "--hub_token", TOKEN, "--hub_private_repo",
                                                "--hub_strategy", "every_save", "--report_to", "tensorboard"), env)
    create = [json.loads(body) for path, _, body in hub.requests if path == "/api/repos/create"]
    assert [(c["organization"], c["name"], c["visibility"]) for c in create] == [("me", "tiny-mlm", "private")]
    assert all(auth == f"Bearer {TOKEN}" for _, auth, _ in hub.requests)
    assert len(hub.commits) == 4  # checkpoints 4, 8, 12 and the end
    assert {"model.safetensors", "config.json", "tokenizer.json", "trainer_state.json"} <= set(hub.commits[0])
    assert not any(name.endswith(".pt") for commit in hub.commits for name in commit)
    final = hub.commits[-1]
    assert final["model.safetensors"] == (out / "model.safetensors").read_bytes()
    card = final["README.md"].decode()
    assert card == (out / "README.md").read_text()
    assert "Task: masked-language modelling." in card and f"Data: {corpus['train']}." in card
    assert "| learning_rate | 0.005 |" in card and "| hub_token | <redacted> |" in card
    assert f"| tokenizer_name | {tokenizer_dir} |" in card  # a tokenizer is no secret
    assert "| eval_perplexity |" in card and "| 12 | " in card  # final metrics and the curve's last point
    assert not any(name.startswith(("checkpoint-", ".hub_snapshot")) for name in final)
    assert not os.path.exists(out / ".hub_snapshot")
    assert_token_nowhere(result, out)


def test_a_failed_upload_is_a_warning_and_training_finishes(fake_hub, corpus, tokenizer_dir, tmp_path):
    hub, env = fake_hub(failing=True)
    out = tmp_path / "run"
    result = run_job("trainer.mlm", resume_args(corpus, tokenizer_dir, out, 1, "--push_to_hub", "--hub_strategy",
                                                "every_save"), with_env(env, HF_TOKEN=TOKEN))
    assert hub.requests  # it did try
    assert "push to the Hub repository run failed (training goes on, local files are intact)" in result.stdout
    assert os.path.isfile(out / "model.safetensors") and os.path.isdir(out / "checkpoint-12")
    assert_token_nowhere(result, out)
