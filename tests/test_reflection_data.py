"""Reflection data over real HTTP: `srpo serve` + OpenAITeacher end to end, a fault-injecting server (429, 5xx, slow
answers, malformed JSON, dropped and truncated connections), a pipeline killed with SIGKILL and restarted, and a
sentinel API key that must never appear in any log, journal or output."""
import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import types
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from srpo_nb.data import format_question, generate_problems
from srpo_nb.format import parse_completion
from srpo_nb.models import VLLMGenerator, make_generator
from srpo_nb.reflection_data import (OpenAITeacher, ReflectionDataConfig, ReflectionRequest, TeacherError,
                                     Journal, build_reflection_data, load_sft_dataset)

KEY_ENV = "SRPO_TEST_TEACHER_KEY"
SENTINEL = "sk-srpo-SENTINEL-" + os.urandom(6).hex()


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    from srpo_nb.models import build_tiny_qwen25vl
    return build_tiny_qwen25vl(tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.fixture(scope="module")
def tiny_gen(tiny_path):
    return make_generator("hf", tiny_path, device="cpu", batch_size=4)


def _files_without_sentinel(root: Path):
    files = [p for p in Path(root).rglob("*") if p.is_file()]
    assert files
    for p in files:
        assert SENTINEL.encode() not in p.read_bytes(), f"the API key leaked into {p}"
    return files


# ---------------------------------------------------------------------------------------------------------------------
# A fault-injecting OpenAI-compatible server: localhost only, bounded in requests and time, stops by itself.

FAULTS = ("429", "500", "503", "slow", "malformed_body", "not_json_content", "drop", "truncated")


def expected_reflection(question_text: str) -> str:
    return f"The first solution (q{zlib.crc32(question_text.encode()):08x}) misread a value; recheck it."


class FaultHandler(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def _json(self, code, obj, headers=()):
        body = json.dumps(obj).encode()
        self.send_response(code)
        for k, v in headers: self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        auth = self.headers.get("Authorization")
        text = body["messages"][-1]["content"][-1]["text"]
        question = text.split("Problem:\n", 1)[1].split("\n\nReasoning of the first attempt:", 1)[0]
        with srv.lock:
            srv.requests += 1
            srv.auth_ok += auth == f"Bearer {SENTINEL}"
            fault = srv.plan(question)
            srv.served[fault] = srv.served.get(fault, 0) + 1
            if srv.requests >= srv.max_requests: threading.Thread(target=srv.shutdown, daemon=True).start()
        try:
            self._answer(fault, question, auth)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _answer(self, fault, question, auth):
        ok = {"id": "x", "object": "chat.completion", "model": "fault",
              "choices": [{"index": 0, "message": {"role": "assistant",
                                                   "content": json.dumps({"reflection": expected_reflection(question)})},
                           "finish_reason": "stop"}]}
        if fault in ("429", "500", "503"):
            self._json(int(fault), {"error": {"message": "try later"}}, [("Retry-After", "0")] if fault == "429" else [])
        elif fault == "401echo":   # a badly behaved server that echoes the credentials back
            self._json(401, {"error": {"message": f"invalid key in header: {auth}"}})
        elif fault == "slow":
            time.sleep(self.server.slow_s)
            self._json(200, ok)
        elif fault == "malformed_body":
            raw = b'{"choices": [{"message": {"content": "{\\"reflection'
            self.send_response(200); self.send_header("Content-Length", str(len(raw))); self.end_headers()
            self.wfile.write(raw)
        elif fault == "not_json_content":
            self._json(200, {**ok, "choices": [{"index": 0, "message": {"role": "assistant", "content": "Sure! Here it is."}}]})
        elif fault == "drop":
            self.close_connection = True   # nothing at all is sent back
        elif fault == "truncated":
            self.send_response(200); self.send_header("Content-Length", "5000"); self.end_headers()
            self.wfile.write(b'{"choices": [')
            self.close_connection = True
        elif fault == "hang":   # counts the requests in flight; the count drops before the client can see the reply
            srv = self.server
            with srv.lock:
                srv.inflight += 1
                srv.max_inflight = max(srv.max_inflight, srv.inflight)
            time.sleep(srv.slow_s)
            with srv.lock: srv.inflight -= 1
            self._json(200, ok)
        else:
            self._json(200, ok)


@contextlib.contextmanager
def fault_server(plan, max_requests=400, deadline_s=120.0, slow_s=1.0):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FaultHandler)
    srv.daemon_threads = True
    srv.lock = threading.Lock()
    srv.plan, srv.max_requests, srv.slow_s = plan, max_requests, slow_s
    srv.requests = srv.auth_ok = srv.inflight = srv.max_inflight = 0
    srv.served = {}
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    watchdog = threading.Timer(deadline_s, srv.shutdown)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield srv
    finally:
        watchdog.cancel()
        srv.shutdown()
        srv.server_close()


class RoundRobinPlan:
    "Each question's first `faults_per_question` attempts get the next fault in FAULTS order; later ones succeed."
    def __init__(self, faults_per_question=2):
        self.k, self.next, self.seen = faults_per_question, 0, {}

    def __call__(self, question):
        n = self.seen.get(question, 0)
        self.seen[question] = n + 1
        if n >= self.k: return "ok"
        fault = FAULTS[self.next % len(FAULTS)]
        self.next += 1
        return fault


def _request(i, question=None):
    return ReflectionRequest(id=f"r{i}", question=question or f"What is shown in figure {i}?", images=[],
                             cot="I read 3 and 4.", answer="\\boxed{8}", gold="7")


# ---------------------------------------------------------------------------------------------------------------------
# The teacher against each fault

@pytest.mark.parametrize("fault,reason", [("429", "HTTP 429"), ("500", "HTTP 500"), ("503", "HTTP 503"),
                                          ("slow", "timeout after 0.4s"), ("malformed_body", "malformed response body"),
                                          ("not_json_content", "malformed reply: content is not a JSON object"),
                                          ("drop", "connection dropped: RemoteDisconnected"), ("truncated", "connection dropped: IncompleteRead")])
def test_teacher_retries_each_fault(fault, reason, monkeypatch, caplog):
    monkeypatch.setenv(KEY_ENV, SENTINEL)
    seen = {}
    def plan(q):
        seen[q] = seen.get(q, 0) + 1
        return fault if seen[q] == 1 else "ok"
    with fault_server(plan, max_requests=10, deadline_s=30, slow_s=0.8) as srv, caplog.at_level(logging.DEBUG):
        t = OpenAITeacher(model="fault", base_url=srv.url, api_key_env=KEY_ENV, timeout=0.4, max_retries=3,
                          backoff_base=0.01, backoff_max=0.05)
        req = _request(0)
        r = t.reflect(req)
        assert (r.text, r.attempts, t.retries, srv.requests) == (expected_reflection(req.question), 2, 1, 2)
        assert srv.auth_ok == 2   # the key really went out, in the header
    retries = [m for m in caplog.messages if m.startswith("teacher retry")]
    assert len(retries) == 1 and reason in retries[0], retries
    assert SENTINEL not in caplog.text


def test_teacher_fatal_errors_and_redaction(monkeypatch, caplog):
    monkeypatch.setenv(KEY_ENV, SENTINEL)
    with fault_server(lambda q: "401echo" if "auth" in q else "500", max_requests=20, deadline_s=30) as srv, \
         caplog.at_level(logging.DEBUG):
        t = OpenAITeacher(model="fault", base_url=srv.url, api_key_env=KEY_ENV, timeout=2, max_retries=2,
                          backoff_base=0.01, backoff_max=0.02)
        with pytest.raises(TeacherError) as e401:
            t.reflect(_request(0, "auth please"))
        assert srv.requests == 1, "a 401 must not be retried"
        assert "HTTP 401" in str(e401.value) and "[REDACTED]" in str(e401.value) and SENTINEL not in str(e401.value)
        with pytest.raises(TeacherError, match="gave up after 3 attempts; last error: HTTP 500"):
            t.reflect(_request(1))
        assert srv.requests == 4
    assert SENTINEL not in caplog.text and SENTINEL not in repr(t)
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(TeacherError, match=f"set the environment variable {KEY_ENV}"):
        OpenAITeacher(base_url="https://api.example.com/v1", api_key_env=KEY_ENV).check()


def test_teacher_concurrency_limit(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SENTINEL)
    with fault_server(lambda q: "hang", max_requests=20, deadline_s=30, slow_s=0.5) as srv:
        t = OpenAITeacher(model="fault", base_url=srv.url, api_key_env=KEY_ENV, timeout=5, max_concurrency=2)
        threads = [threading.Thread(target=t.reflect, args=(_request(i),)) for i in range(6)]
        for th in threads: th.start()
        for th in threads: th.join(30)
        assert srv.requests == 6 and srv.max_inflight == 2


# ---------------------------------------------------------------------------------------------------------------------
# Integration: `srpo serve` (tiny model) on a free port, OpenAITeacher over real HTTP, a small SFT set

def _serve_command(model_path: Path) -> list:
    try:
        from srpo_nb.cli import SUBCOMMANDS
        has_cli = "serve" in SUBCOMMANDS
    except Exception:
        has_cli = False
    if has_cli:
        return [str(Path(sys.executable).with_name("srpo")), "serve", "--model", str(model_path), "--port", "0"]
    code = f"from srpo_nb.reflection_data import serve; serve({str(model_path)!r}, port=0, device='cpu', max_new_tokens=32)"
    return [sys.executable, "-c", code]


@contextlib.contextmanager
def running_serve(model_path: Path, log_path: Path, timeout=180):
    out = open(log_path, "w+")
    proc = subprocess.Popen(_serve_command(model_path), stdout=out, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"))
    try:
        t0, url = time.time(), None
        while url is None:
            assert proc.poll() is None, f"srpo serve exited: {log_path.read_text()[-2000:]}"
            assert time.time() - t0 < timeout, "srpo serve did not start"
            m = re.search(r"srpo serve: .* at (http://127\.0\.0\.1:\d+/v1)", log_path.read_text())
            url = m.group(1) if m else None
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try: proc.wait(20)
        except subprocess.TimeoutExpired: proc.kill(); proc.wait()
        out.close()


def test_serve_and_openai_teacher_build_sft_set(tiny_path, tiny_gen, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(KEY_ENV, SENTINEL)
    problems = generate_problems(6, seed=3)
    out = tmp_path / "run"
    with running_serve(tiny_path, tmp_path / "serve.log") as url, caplog.at_level(logging.DEBUG):
        import urllib.request
        with urllib.request.urlopen(url + "/models", timeout=10) as r:
            assert json.load(r)["data"][0]["id"] == "tiny"
        cfg = ReflectionDataConfig.from_dict(preset="tiny", out_dir=str(out), max_new_tokens=12, total=4,
                                             teacher="openai", teacher_model="tiny", teacher_base_url=url,
                                             api_key_env=KEY_ENV, teacher_reply="lenient", teacher_max_tokens=12,
                                             teacher_timeout=60, max_concurrency=2, backoff_base=0.05, progress=False)
        ds, summary = build_reflection_data(cfg, problems=problems, generator=tiny_gen)
    assert len(ds) == 4 and sorted(ds["id"]) == sorted(set(ds["id"]))
    assert summary["teacher"] == "openai-compatible:tiny" and summary["rows"] == 4 and summary["failed"] == []
    journal = [json.loads(l) for l in (out / "journal.jsonl").read_text().splitlines()]
    refl = {r["id"]: r for r in journal if r["stage"] == "reflection"}
    assert set(refl) == set(ds["id"]) and all(r["reflection"] and r["teacher"] == "openai-compatible:tiny" for r in refl.values())
    by_id = {p.id: p for p in problems}
    back = load_sft_dataset(out)
    for row in back:
        target = row["messages"][2]["content"][0]["text"]
        parsed = parse_completion(target, "sft")
        assert parsed.ok, parsed.problems
        assert parsed.reflection == refl[row["id"]]["reflection"]
        assert row["messages"][1]["content"][-1]["text"] == format_question(by_id[row["id"]])
        assert row["images"][0].convert("RGB").tobytes() == by_id[row["id"]].images[0].convert("RGB").tobytes()
    _files_without_sentinel(out)
    assert SENTINEL not in (tmp_path / "serve.log").read_text() and SENTINEL not in caplog.text


# ---------------------------------------------------------------------------------------------------------------------
# Faults + SIGKILL + restart: every selected problem exactly once

RUNNER = """
import json, logging, sys
from srpo_nb.reflection_data import ReflectionDataConfig, build_reflection_data
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
cfg = ReflectionDataConfig.from_dict(json.loads(sys.argv[1]))
ds, summary = build_reflection_data(cfg)
print("SUMMARY " + json.dumps(summary))
"""


def _journal_lines(path: Path) -> list:
    if not path.exists(): return []
    return [json.loads(l) for l in path.read_text().split("\n") if l.strip() and l.endswith("}")]


def _run_until(cmd, env, journal, stage, at_least, log, timeout=240):
    "Start the pipeline; SIGKILL it as soon as the journal holds `at_least` records of `stage` (None: run to the end)."
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env)
    t0 = time.time()
    while proc.poll() is None:
        assert time.time() - t0 < timeout, "pipeline run took too long"
        if stage is not None and sum(r["stage"] == stage for r in _journal_lines(journal)) >= at_least:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return "killed"
        time.sleep(0.02)
    return proc.returncode


def test_faults_kill_restart_exactly_once(tiny_path, tmp_path):
    n_problems, total = 12, 10
    out = tmp_path / "run"
    plan = RoundRobinPlan(faults_per_question=2)
    with fault_server(plan, max_requests=300, deadline_s=200, slow_s=1.0) as srv:
        cfg = dict(preset="tiny", problems="generated", num_problems=n_problems, generate_seed=5, policy_model=str(tiny_path),
                   batch_size=1, max_new_tokens=24, total=total, teacher="openai", teacher_model="fault",
                   teacher_base_url=srv.url, api_key_env=KEY_ENV, teacher_reply="json", teacher_timeout=0.5,
                   max_retries=8, backoff_base=0.02, backoff_max=0.1, max_concurrency=3, out_dir=str(out), progress=False)
        cmd = [sys.executable, "-c", RUNNER, json.dumps(cfg)]
        env = dict(os.environ, **{KEY_ENV: SENTINEL, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
        journal = out / "journal.jsonl"
        logs = [open(tmp_path / f"run{i}.log", "w") for i in range(3)]

        # run 1: killed while the policy is still answering
        assert _run_until(cmd, env, journal, "response", 1, logs[0]) == "killed"
        n_resp = sum(r["stage"] == "response" for r in _journal_lines(journal))
        assert 1 <= n_resp < n_problems, n_resp
        print(f"killed with {n_resp} responses journaled")
        # run 2: killed while reflections are arriving
        assert _run_until(cmd, env, journal, "reflection", 3, logs[1]) == "killed"
        n_refl = sum(r["stage"] == "reflection" for r in _journal_lines(journal))
        assert 3 <= n_refl < total, n_refl
        print(f"killed with {n_refl} reflections journaled")
        with open(journal, "a") as f:   # what a kill in the middle of a write leaves behind
            f.write('{"stage": "reflection", "id": "synth-5-half')
        # run 3: to the end
        assert _run_until(cmd, env, journal, None, 0, logs[2]) == 0
        for f in logs: f.close()
        assert srv.requests <= 300 and srv.auth_ok == srv.requests > 0

    text = [(tmp_path / f"run{i}.log").read_text() for i in range(3)]
    summary = json.loads(text[2].split("SUMMARY ", 1)[1])
    assert "dropping a torn last line" in text[2]

    # the journal: every (stage, id) exactly once, nothing lost
    recs = _journal_lines(journal)
    keys = [(r["stage"], r["id"]) for r in recs]
    assert len(keys) == len(set(keys))
    responses = {r["id"] for r in recs if r["stage"] == "response"}
    selection = [r for r in recs if r["stage"] == "selection"]
    from srpo_nb.data import filter_answerable
    n_answerable = len(filter_answerable(generate_problems(n_problems, seed=5))[0])   # the stage's default filter
    assert len(responses) == n_answerable == summary["answerable"]["kept"] and len(selection) == 1
    ids = selection[0]["ids"]
    assert len(ids) == total == len(set(ids))

    # the dataset: exactly the selected problems, once each, each with the reflection the server wrote for IT
    ds = load_sft_dataset(out)
    assert ds["id"] == ids and summary["rows"] == total and summary["failed"] == []
    problems = {p.id: p for p in generate_problems(n_problems, seed=5)}
    for row in ds:
        target = row["messages"][2]["content"][0]["text"]
        assert parse_completion(target, "sft").reflection == expected_reflection(format_question(problems[row["id"]]))

    # the retries show in the log, one kind of fault each, and match what the server served
    log_text = (out / "reflect.log").read_text()
    for reason in ("HTTP 429", "HTTP 500", "HTTP 503", "timeout", "malformed response body",
                   "malformed reply: content is not a JSON object", "RemoteDisconnected", "IncompleteRead"):
        assert re.search(r"teacher retry \d+/8 for \S+: .*" + re.escape(reason), log_text), reason
    assert sum(srv.served.get(f, 0) for f in FAULTS) >= total * 2
    assert summary["retries_total"] >= total   # (attempts of requests lost in the kill are not counted)

    # the key: sent on every request, written nowhere
    _files_without_sentinel(out)
    for t in text: assert SENTINEL not in t


# ---------------------------------------------------------------------------------------------------------------------
# The journal under every possible torn tail; the vLLM backend's translation (vLLM itself needs a GPU)

def test_journal_every_torn_tail(tmp_path):
    path = tmp_path / "j.jsonl"
    j = Journal(path)
    for i in range(3): j.append("reflection", f"id{i}", reflection=f"text {i}")
    full = path.read_bytes()
    last_start = full[:-1].rfind(b"\n") + 1
    for cut in range(last_start, len(full) + 1):
        path.write_bytes(full[:cut])
        j2 = Journal(path)
        want = 3 if cut == len(full) else 2
        assert sorted(j2.done("reflection")) == [f"id{i}" for i in range(want)], cut
        if want == 2: j2.append("reflection", "id2", reflection="again")
        assert len(Journal(path).done("reflection")) == 3


def test_vllm_generator_translation(tiny_path, monkeypatch):
    from PIL import Image
    from srpo_nb.format import THINK_ANSWER_PROMPT, make_messages
    calls = {}
    class SamplingParams:
        def __init__(self, **kw): self.kw = kw
    class LLM:
        def __init__(self, **kw): calls["llm"] = kw
        def generate(self, inputs, params, use_tqdm=False):
            calls["inputs"], calls["params"] = inputs, params.kw
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=f"p{i}s{k}") for k in range(params.kw["n"])])
                    for i in range(len(inputs))]
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams))
    img = Image.new("RGB", (64, 64), "red")
    prompts = [{"messages": make_messages("q1", 1, THINK_ANSWER_PROMPT), "images": [img]},
               {"messages": make_messages("q2", 0)}]
    gen = make_generator("vllm", str(tiny_path), max_images_per_prompt=2)
    out = gen.generate(prompts, n=2, max_new_tokens=7, temperature=0.0, top_p=0.5, seed=3)
    assert out == [["p0s0", "p0s1"], ["p1s0", "p1s1"]]
    assert calls["llm"]["model"] == str(tiny_path) and calls["llm"]["limit_mm_per_prompt"] == {"image": 2}
    assert calls["params"] == dict(n=2, temperature=0.0, top_p=1.0, max_tokens=7, seed=3)
    first, second = calls["inputs"]
    assert first["prompt"].count("<|image_pad|>") == 1 and first["prompt"].endswith("<|im_start|>assistant\n")
    assert first["multi_modal_data"]["image"] is img and "multi_modal_data" not in second
    assert THINK_ANSWER_PROMPT in first["prompt"]
