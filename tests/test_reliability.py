"""Reliability faults a new user meets: a hostile or careless HTTP client against `srpo serve`, a teacher endpoint
that refuses the key or echoes it back, config files with typos, run folders that already hold something, and
kills in the middle of a checkpoint save. Each test names the fault it injects."""
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from srpo_nb.core import ConfigError, RunFolderError
from srpo_nb.data import generate_problems
from srpo_nb.models import make_generator
from srpo_nb.reflection_data import (ChatServer, NoRowsError, OpenAITeacher, ReflectionDataConfig, ReflectionRequest,
                                     TeacherAuthError, TeacherError, build_reflection_data)

KEY_ENV = "SRPO_TEST_RELIABILITY_KEY"
SENTINEL = "sk-srpo-SENTINEL-" + os.urandom(8).hex()
SRPO = str(Path(sys.executable).with_name("srpo"))


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    from srpo_nb.models import build_tiny_qwen25vl
    return build_tiny_qwen25vl(tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.fixture(scope="module")
def tiny_gen(tiny_path):
    return make_generator("hf", tiny_path, device="cpu", batch_size=1)


class Spy:
    "A generation backend that records its calls and delegates to a real one (or answers a fixed text)."
    def __init__(self, inner=None, text="<think>3 and 4</think><answer>\\boxed{7}</answer>"):
        self.inner, self.text, self.calls = inner, text, []
        self.processor = getattr(inner, "processor", None)
        self.model = getattr(inner, "model", None)

    def generate(self, prompts, n=1, **kw):
        self.calls.append(dict(n_prompts=len(prompts), **kw))
        if self.inner is not None: return self.inner.generate(prompts, n=n, **kw)
        return [[self.text] * n for _ in prompts]


@contextlib.contextmanager
def chat_server(backend, **kw):
    srv = ChatServer(backend, "tiny", **kw).start()
    try: yield srv
    finally: srv.stop()


def post(url, body, timeout=10):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + "/chat/completions", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r: return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def raw_http(srv, request: bytes, wait=5.0) -> bytes:
    "Send raw bytes to the server; return everything it sends back before closing (or `wait` seconds)."
    host, port = srv.server_address[:2]
    with socket.create_connection((host, port), timeout=wait) as s:
        s.sendall(request)
        out = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk: break
                out += chunk
                if b"\r\n\r\n" in out:
                    head, _, body = out.partition(b"\r\n\r\n")
                    n = next((int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")), None)
                    if n is not None and len(body) >= n: break
        except socket.timeout:
            pass
    return out


def status(resp: bytes) -> int:
    return int(resp.split(b" ", 2)[1]) if resp else 0


MSG = lambda text: {"messages": [{"role": "user", "content": text}]}


# ---------------------------------------------------------------------------------------------------------------------
# srpo serve: a prompt-token limit, a cap on max_tokens, 4xx for client mistakes, 405, timeouts, clients that leave

def test_serve_prompt_limit_answered_before_generation(tiny_gen):
    spy = Spy(tiny_gen)
    with chat_server(spy, max_new_tokens=4, max_prompt_tokens=64) as srv:
        code, body = post(srv.url, MSG("seven " * 150))      # 900 characters, > 64 tokens: tokenized, refused
        assert code == 400 and body["error"]["code"] == "context_length_exceeded", body
        assert "over the limit of 64 tokens" in body["error"]["message"]
        t0 = time.time()
        code, body = post(srv.url, MSG("x" * 5_000_000))     # 5 MB: refused by its length, never tokenized
        assert code == 413 and time.time() - t0 < 3, (code, time.time() - t0)
        assert spy.calls == []                                # nothing was generated for either
        code, body = post(srv.url, MSG("hi"))
        assert code == 200 and body["usage"]["prompt_tokens"] > 1
    assert srv.max_prompt_tokens == 64
    with chat_server(spy) as default:                         # default limit: the model's context
        assert default.max_prompt_tokens == tiny_gen.model.config.text_config.max_position_embeddings


def test_serve_caps_max_tokens(tiny_gen):
    spy = Spy(tiny_gen)
    with chat_server(spy, max_new_tokens=5) as srv:
        code, body = post(srv.url, {**MSG("hi"), "max_tokens": 100000})
        assert code == 200
        code, _ = post(srv.url, {**MSG("hi"), "max_completion_tokens": 3})
        assert code == 200
    assert [c["max_new_tokens"] for c in spy.calls] == [5, 3]   # what the model was asked for: never more than the cap


@pytest.mark.parametrize("request_bytes,want", [
    (b"GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    (b"PUT /v1/models HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405),
    (b"DELETE /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    (b"POST /v1/models HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", 405),
    (b"DELETE /nowhere HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n", 411),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", 400),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n\xff\xfe\xfd\xfc", 400),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n[]", 400),
    (b'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 63\r\n\r\n'
     b'{"messages": [{"role": "user", "content": [{"type": "image"}]}]}', 400),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411),
])
def test_serve_client_mistakes_are_4xx(tiny_gen, request_bytes, want):
    spy = Spy(tiny_gen)
    with chat_server(spy, max_new_tokens=4) as srv:
        resp = raw_http(srv, request_bytes)
        assert status(resp) == want, resp[:300]
        if want == 405: assert b"\r\nAllow: " in resp
        assert spy.calls == []
        assert post(srv.url, MSG("still serving"))[0] == 200   # and the server keeps serving


def test_serve_short_body_times_out(tiny_gen):
    with chat_server(Spy(tiny_gen), max_new_tokens=4, socket_timeout=0.5) as srv:
        t0 = time.time()
        resp = raw_http(srv, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"messa", wait=5)
        assert status(resp) == 408 and time.time() - t0 < 3, (resp[:200], time.time() - t0)
        assert post(srv.url, MSG("hi"))[0] == 200


def test_serve_stops_generating_when_the_client_leaves(tiny_path, caplog):
    gen = make_generator("hf", tiny_path, device="cpu", batch_size=1)
    gen.model.generation_config.eos_token_id = None          # never stops early: only max_tokens ends a reply
    steps = []
    gen.model.register_forward_pre_hook(lambda m, a: steps.append(time.time()))
    with chat_server(gen, max_new_tokens=4000) as srv, caplog.at_level(logging.INFO):
        host, port = srv.server_address[:2]
        body = json.dumps({**MSG("count"), "max_tokens": 4000}).encode()
        s = socket.create_connection((host, port))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        t0 = time.time()
        while len(steps) < 20 and time.time() - t0 < 30: time.sleep(0.02)
        assert len(steps) >= 20
        s.close()                                             # the client gives up
        t_close = time.time()
        code, reply = post(srv.url, {**MSG("hi"), "max_tokens": 2}, timeout=8)   # served once the lock is free
        waited = time.time() - t_close
    assert code == 200 and waited < 5, waited
    after = [t for t in steps if t > t_close + 0.5]
    assert len(steps) < 1000 and len(after) <= 10, (len(steps), len(after))
    assert any("generation stopped after" in m for m in caplog.messages), caplog.messages


# ---------------------------------------------------------------------------------------------------------------------
# The teacher: redaction before truncation, the key checked first, auth errors stop the stage, no rows = failure

class EchoHandler(BaseHTTPRequestHandler):
    "Answers every request with `server.reply(auth) -> (status, raw body)`."
    def log_message(self, *a): pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with self.server.lock: self.server.requests += 1
        code, raw = self.server.reply(self.headers.get("Authorization", ""))
        self.send_response(code); self.send_header("Content-Length", str(len(raw))); self.end_headers()
        self.wfile.write(raw)


@contextlib.contextmanager
def echo_server(reply):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), EchoHandler)
    srv.daemon_threads, srv.lock, srv.requests, srv.reply = True, threading.Lock(), 0, reply
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try: yield srv
    finally: srv.shutdown(); srv.server_close()


def _pieces(secret: str, n: int = 8):
    "Every n-character piece of the secret: none may appear anywhere."
    return [secret[i:i + n] for i in range(len(secret) - n + 1)]


@pytest.mark.parametrize("where", ["error_body", "malformed_body"])
def test_teacher_redacts_before_cutting(where, monkeypatch, caplog):
    monkeypatch.setenv(KEY_ENV, SENTINEL)
    head = len("Bearer ") + 12   # the cut falls 12 characters into the key
    if where == "error_body":   # a 400 body whose echoed key straddles the 300-character cut
        reply = lambda auth: (400, b"e" * (300 - head) + auth.encode())
    else:                       # a 200 body that is not JSON, the key straddling the 80-character cut
        reply = lambda auth: (200, b"m" * (80 - head) + auth.encode())
    with echo_server(reply) as srv, caplog.at_level(logging.DEBUG):
        t = OpenAITeacher(model="m", base_url=srv.url, api_key_env=KEY_ENV, timeout=5, max_retries=1,
                          backoff_base=0.01, backoff_max=0.02)
        with pytest.raises(TeacherError) as e:
            t.reflect(ReflectionRequest(id="r0", question="q", images=[], cot="c", answer="a", gold="g"))
    text = str(e.value) + "\n" + caplog.text
    leaks = [p for p in _pieces(SENTINEL) if p in text]
    assert not leaks, f"part of the key leaked: {leaks[:3]}"


def test_teacher_key_checked_before_rollouts(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    spy = Spy()
    cfg = ReflectionDataConfig.from_dict(preset="tiny", teacher="openai", teacher_base_url="https://api.example.invalid/v1",
                                         api_key_env=KEY_ENV, out_dir=str(tmp_path / "r"), progress=False)
    with pytest.raises(TeacherError, match=f"set the environment variable {KEY_ENV}"):
        build_reflection_data(cfg, problems=generate_problems(4, seed=1), generator=spy)
    assert spy.calls == [], "the policy was rolled out before the missing key was noticed"


def test_teacher_auth_error_stops_the_stage(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SENTINEL)
    with echo_server(lambda auth: (401, b'{"error": {"message": "bad key"}}')) as srv:
        cfg = ReflectionDataConfig.from_dict(preset="tiny", teacher="openai", teacher_base_url=srv.url, api_key_env=KEY_ENV,
                                             total=6, max_concurrency=1, max_retries=3, backoff_base=0.01,
                                             out_dir=str(tmp_path / "r"), progress=False)
        with pytest.raises(TeacherAuthError, match="HTTP 401"):
            build_reflection_data(cfg, problems=generate_problems(8, seed=1), generator=Spy())
        assert srv.requests <= 2, f"{srv.requests} requests after a 401"


def test_stage_without_rows_exits_nonzero(tiny_path, tmp_path, capsys):
    from srpo_nb.cli import main
    cfg = tmp_path / "r.json"
    cfg.write_text(json.dumps({"preset": "tiny", "policy_model": str(tiny_path), "num_problems": 2, "max_new_tokens": 4,
                               "total": 0, "out_dir": str(tmp_path / "r"), "progress": False}))
    assert main(["data", "reflect", "--config", str(cfg)]) == 1     # `srpo data reflect`, in this process
    err = capsys.readouterr().err
    assert "srpo data reflect: error: no SFT rows" in err, err[-1500:]
    assert (tmp_path / "r" / "summary.json").exists()   # what happened is still written down


# ---------------------------------------------------------------------------------------------------------------------
# Configs and the command line: bad values named in one or two lines, before any model loads

def test_config_types_from_yaml(tmp_path):
    from srpo_nb.sft import SFTConfig
    p = tmp_path / "sft.yaml"
    p.write_text("preset: tiny\nlearning_rate: 1e-3\nweight_decay: 0\n")
    cfg = SFTConfig.from_file(p)
    assert isinstance(cfg.learning_rate, float) and cfg.learning_rate == 1e-3 and cfg.weight_decay == 0.0
    p.write_text("preset: tiny\nmax_steps: ten\n")
    with pytest.raises(ConfigError, match=r"SFTConfig\.max_steps='ten': expected an integer"):
        SFTConfig.from_file(p)


def test_cli_user_errors_are_two_lines(tmp_path):
    env = dict(os.environ, SRPO_NB_HOME=str(tmp_path / "home"))
    bad = tmp_path / "sft.yaml"
    bad.write_text("preset: tiny\nmax_steps: ten\n")
    out = subprocess.run([SRPO, "sft", "--config", str(bad)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 2, out.stderr[-2000:]
    assert "max_steps='ten'" in out.stderr and "Traceback" not in out.stderr
    dbg = subprocess.run([SRPO, "sft", "--config", str(bad), "--debug"], capture_output=True, text=True, env=env, timeout=120)
    assert dbg.returncode == 1 and "Traceback" in dbg.stderr and "ConfigError" in dbg.stderr
    missing = tmp_path / "runs" / "no-such-model"
    (tmp_path / "runs").mkdir()
    out = subprocess.run([SRPO, "serve", "--model", str(missing), "--port", "0"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 1 and f"model folder not found: '{missing}'" in out.stderr, out.stderr[-2000:]
    assert len(out.stderr.strip().splitlines()) == 2
    (tmp_path / "empty").mkdir()
    out = subprocess.run([SRPO, "serve", "--model", str(tmp_path / "empty")], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 1 and "holds no config.json: not a saved model" in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize("argv,named", [
    (["sft", "--preset", "tiny", "--max-steps", "0"], "SFTConfig.max_steps=0 is out of range"),
    (["grpo", "--preset", "tiny", "--max-steps", "0"], "GRPOTrainConfig.max_steps=0 is out of range"),
    (["data", "reflect", "--preset", "tiny", "--out-dir", "{tmp}/r"], None),
])
def test_cli_bad_values_stop_before_any_model_loads(argv, named, tmp_path, capsys, monkeypatch):
    import srpo_nb.grpo, srpo_nb.models, srpo_nb.sft
    from srpo_nb.cli import main
    def no_loading(*a, **k): raise AssertionError("a model was loaded")
    for m in (srpo_nb.models, srpo_nb.sft, srpo_nb.grpo): monkeypatch.setattr(m, "load_policy", no_loading)
    if named is None:   # a bad field in a config file, found before the rollouts
        (tmp_path / "r.yaml").write_text("preset: tiny\nbatch_size: 0\n")
        argv, named = ["data", "reflect", "--config", str(tmp_path / "r.yaml")], "ReflectionDataConfig.batch_size=0 is out of range"
    assert main([a.format(tmp=tmp_path) for a in argv]) == 1
    err = capsys.readouterr().err
    assert named in err and len(err.strip().splitlines()) == 2, err


# ---------------------------------------------------------------------------------------------------------------------
# The demo never deletes what it did not write

def test_demo_keeps_the_users_files(tmp_path, monkeypatch):
    import srpo_nb.demo as demo
    class Stop(Exception): pass
    def stop(*a, **k): raise Stop()
    monkeypatch.setattr(demo, "tiny_model_path", stop)       # stop each demo right after it prepared its folder
    run = tmp_path / "demo"
    with pytest.raises(Stop): demo.run_demo(out_dir=str(run), verbose=False)
    (run / "sft").mkdir(); (run / "sft" / "config.yaml").write_text("x")   # the first demo's own output
    (run / "notes.md").write_text("the user's notes")                       # the user's file
    with pytest.raises(Stop): demo.run_demo(out_dir=str(run), verbose=False)
    assert (run / "notes.md").read_text() == "the user's notes"
    assert not (run / "sft").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Run folders and checkpoints: a kill in the middle of a checkpoint save, then `latest`, resume, resume again

KILL_RUNNER = """
import json, os, signal, sys
import transformers
stage, cfg, kill_at = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
save = transformers.Trainer._save_optimizer_and_scheduler
def torn_save(self, output_dir):
    if self.state.global_step == kill_at:   # the weights are written; the optimizer file is half written; then the kill
        with open(os.path.join(output_dir, "optimizer.pt"), "wb") as f: f.write(b"half an optimizer")
        os.kill(os.getpid(), signal.SIGKILL)
    return save(self, output_dir)
transformers.Trainer._save_optimizer_and_scheduler = torn_save
if stage == "sft":
    from srpo_nb.sft import SFTConfig as C, train_sft as train
else:
    from srpo_nb.grpo import GRPOTrainConfig as C, train_grpo as train
res = train(C.from_dict(cfg))
print("RESULT " + json.dumps({"global_step": res.global_step}))
"""


def killed_during_save(stage, cfg, kill_at, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", SRPO_NB_HOME=str(tmp_path / "home"))
    out = subprocess.run([sys.executable, "-c", KILL_RUNNER, stage, json.dumps(cfg), str(kill_at)], capture_output=True,
                         text=True, env=env, timeout=600)
    assert out.returncode == -9, (out.returncode, out.stderr[-3000:])
    return out


def steps_logged(path, key):
    "The steps of the records in a metrics.jsonl that hold `key`."
    return [r["step"] for r in map(json.loads, Path(path).read_text().splitlines()) if key in r]


def test_sft_kill_during_checkpoint_save_then_resume(tiny_path, tmp_path, capsys):
    from srpo_nb.core import is_complete_checkpoint, latest_complete_checkpoint, read_run_marker
    from srpo_nb.sft import SFTConfig, train_sft
    out = tmp_path / "sft"
    cfg = dict(preset="tiny", model=str(tiny_path), output_dir=str(out), max_steps=3, save_steps=1, max_rows=2,
               per_device_train_batch_size=1, gradient_accumulation_steps=1, max_length=512)
    killed_during_save("sft", cfg, 2, tmp_path)
    torn = out / "checkpoint-2"
    assert torn.is_dir() and (torn / "optimizer.pt").read_bytes() == b"half an optimizer"
    assert not is_complete_checkpoint(torn) and latest_complete_checkpoint(out).name == "checkpoint-1"
    assert read_run_marker(out)["finished"] is False
    resumed = train_sft(SFTConfig.from_dict({**cfg, "resume_from_checkpoint": "latest"}))
    assert resumed.global_step == 3 and latest_complete_checkpoint(out).name == "checkpoint-3"
    assert steps_logged(out / "metrics.jsonl", "loss") == [1, 2, 3]   # step 2 logged once, not twice
    assert read_run_marker(out)["finished"] is True
    final_mtime = (out / "final" / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    again = train_sft(SFTConfig.from_dict({**cfg, "resume_from_checkpoint": "latest"}))   # a finished run resumed
    assert again.global_step == 3 and "already finished" in capsys.readouterr().out
    assert (out / "final" / "model.safetensors").stat().st_mtime_ns == final_mtime and not (out / "checkpoint-4").exists()
    with pytest.raises(RunFolderError, match="holds an earlier sft run"):   # a new run into the same folder
        train_sft(SFTConfig.from_dict(cfg))
    with pytest.raises(ConfigError, match=r"max_steps=0 is out of range"):
        SFTConfig.from_dict({**cfg, "max_steps": 0})


def test_grpo_kill_during_checkpoint_save_then_resume(tiny_path, tmp_path, capsys):
    from srpo_nb.core import latest_complete_checkpoint, read_run_marker
    from srpo_nb.grpo import GRPOTrainConfig, train_grpo
    out = tmp_path / "grpo"
    cfg = dict(preset="tiny", model=str(tiny_path), output_dir=str(out), max_problems=8, max_steps=2, save_steps=1,
               verbose=False, tensorboard=False, log_completions=False)
    killed_during_save("grpo", cfg, 2, tmp_path)
    assert (out / "checkpoint-2").is_dir() and latest_complete_checkpoint(out).name == "checkpoint-1"
    resumed = train_grpo(GRPOTrainConfig.from_dict({**cfg, "resume_from_checkpoint": "latest"}))
    assert resumed.global_step == 2
    assert steps_logged(out / "metrics.jsonl", "reward") == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["filter_totals"]["groups"] == 2 * 2, summary   # 2 groups a step, over the whole run, not the last step
    assert read_run_marker(out)["finished"] is True
    final_mtime = max(p.stat().st_mtime_ns for p in (out / "final").iterdir())
    capsys.readouterr()
    again = train_grpo(GRPOTrainConfig.from_dict({**cfg, "resume_from_checkpoint": "latest"}))
    assert again.global_step == 2 and "already finished" in capsys.readouterr().out
    assert max(p.stat().st_mtime_ns for p in (out / "final").iterdir()) == final_mtime
    assert not (out / "checkpoint-3").exists()
    with pytest.raises(RunFolderError, match="holds an earlier grpo run"):
        train_grpo(GRPOTrainConfig.from_dict(cfg))
    fresh = train_grpo(GRPOTrainConfig.from_dict({**cfg, "overwrite": True, "max_steps": 1}))   # started over, explicitly
    assert fresh.global_step == 1 and sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
