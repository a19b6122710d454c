"""The OpenAI-compatible teacher against real HTTP servers on 127.0.0.1: canned completions, failures
(429/500 → retries), hangs (→ timeouts), a killed and resumed run, and user errors."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from clsgen_dist.config import DataConfig
from clsgen_dist.construct_cli import build_data_main
from clsgen_dist.data.construct import PromptSpec, build_explanations, read_input
from clsgen_dist.data.teachers import GenerationSettings, HTTPTeacher, TeacherError
from tests.conftest import REVIEWS, write_jsonl
from tests.integration._run import PY, REPO, clean_env, free_port, launch

NAMES = ["negative", "positive"]
DATA = DataConfig(label_names=NAMES, instruction="Is this movie review positive or negative?")
CONTRARIAN = {REVIEWS[3][0], REVIEWS[6][0]}  # the canned teacher argues the wrong side for these


def canned(content: str) -> tuple[str, str, str]:
    """(kind, ident, completion) for a user message built from the default templates."""
    if "Based on this explanation" in content:  # the stance judge
        expl = content.split("Explanation:\n", 1)[1].split("\n\nBased on", 1)[0]
        return "judge", expl, "Positive." if "praises" in expl else "negative"
    text = content.split("Text:\n", 1)[1].split("\n\n", 1)[0]
    m = re.search(r"Correct answer: (\w+)", content)
    if m:  # label-conditioned: a rationale for the gold label (or against it, for the contrarian texts)
        good = (m.group(1) == "positive") != (text in CONTRARIAN)
        return "gen", text, f'The review {"praises" if good else "criticises"} the film: "{text}"'
    y = dict(REVIEWS)[text]
    return "gen", text, f'Because "{text}".\nVerdict: {NAMES[y]}'


class FakeChat:
    """A chat-completions server in a thread. ``plan(kind, ident, attempt)`` → "ok", an HTTP status,
    (status, error message: "{auth}" in it echoes the Authorization header), "hang", "null" (a 200
    whose content is null: a content filter), "no_choices" (a 200 with ``choices: []``) or
    "cut_502" (a 502 whose body ends before its Content-Length, then the connection closes) or
    "restate" (the answer is the gold label's name alone, as told in the prompt) or "trickle" (the
    answer sent 4 bytes every 50 ms); requests
    beyond ``allow`` wait for ``gate``. Every request is counted on arrival; ``answered`` holds the
    items that got a completion."""

    def __init__(self, plan=None):
        self.plan = plan or (lambda kind, ident, attempt: "ok")
        self.counts: Counter = Counter()
        self.total = 0
        self.order: list[tuple[str, str]] = []
        self.allow: int | None = None
        self.gate = threading.Event()
        self.release = threading.Event()
        self.auth: list[str | None] = []
        self.answered: set[tuple[str, str]] = set()
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                try:
                    fake.handle(self)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout, kill)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        body = json.loads(h.rfile.read(int(h.headers["Content-Length"])))
        assert h.path == "/v1/chat/completions" and body["model"] == "fake-teacher"
        kind, ident, completion = canned(body["messages"][-1]["content"])
        with self.lock:
            self.counts[(kind, ident)] += 1
            self.total += 1
            self.order.append((kind, ident))
            attempt, n = self.counts[(kind, ident)], self.total
            self.auth.append(h.headers.get("Authorization"))
        if self.allow is not None and n > self.allow:
            self.gate.wait(30)
        action = self.plan(kind, ident, attempt)
        if action == "hang":
            self.release.wait(10)
            return
        if action == "cut_502":
            h.send_response(502)
            h.send_header("Content-Length", "500")
            h.end_headers()
            h.wfile.write(b"Bad Gateway")
            h.close_connection = True
            return
        trickle = action == "trickle"
        if trickle:
            action = "ok"
        if action == "restate":
            told = re.search(r"Correct answer: (\w+)", body["messages"][-1]["content"]).group(1)
            completion, action = f"**{told.title()}.**", "ok"
        if action in ("null", "no_choices"):
            choices = [] if action == "no_choices" else [
                {"index": 0, "message": {"role": "assistant", "content": None, "refusal": "filtered"},
                 "finish_reason": "content_filter"}]
            payload = json.dumps({"id": "x", "object": "chat.completion", "choices": choices}).encode()
            h.send_response(200)
        elif action != "ok":
            action, message = action if isinstance(action, tuple) else (action, "busy")
            message = message.replace("{auth}", h.headers.get("Authorization") or "")
            payload = json.dumps({"error": {"message": message}}).encode()
            h.send_response(action)
            if action == 429:
                h.send_header("Retry-After", "0")
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": completion}, "finish_reason": "stop"}
            payload = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                                  "choices": [choice]}).encode()
            with self.lock:
                self.answered.add((kind, ident))
            h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        if trickle:
            for i in range(0, len(payload), 4):
                h.wfile.write(payload[i:i + 4])
                h.wfile.flush()
                time.sleep(0.05)
            return
        h.wfile.write(payload)

    def gens(self) -> Counter:
        return Counter({ident: c for (kind, ident), c in self.counts.items() if kind == "gen"})

    def close(self) -> None:
        self.release.set()
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
def server_factory():
    made = []

    def make(plan=None):
        made.append(FakeChat(plan))
        return made[-1]

    yield make
    for s in made:
        s.close()


@pytest.fixture
def rows():
    return [{"id": f"r{i}", "text": t, "label": y} for i, (t, y) in enumerate(REVIEWS)]


def _build(tmp_path, rows, server, name="out", mode="conditioned", **kw):
    exs = read_input(write_jsonl(tmp_path / "in.jsonl", rows), DATA)
    opts = dict(concurrency=4, timeout=5.0, max_retries=3, backoff=0.01)
    opts.update(kw)
    teacher = HTTPTeacher(server.url, "fake-teacher", settings=GenerationSettings(max_new_tokens=32), **opts)
    stats = build_explanations(exs, teacher, PromptSpec.from_data(DATA, mode=mode), tmp_path / f"{name}.jsonl")
    out = [json.loads(x) for x in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    return out, stats, teacher


def test_conditioned_end_to_end_with_stance_judge(tmp_path, rows, server_factory):
    server = server_factory()
    out, stats, _ = _build(tmp_path, rows, server)
    assert [r["id"] for r in out] == [r["id"] for r in rows]
    for r in out:
        contrarian = r["text"] in CONTRARIAN
        assert r["consistent"] is not contrarian and r["verdict"] == (1 - r["label"] if contrarian else r["label"])
        assert r["stance"] == float(r["verdict"])
        assert r["raw_explanation"].endswith(f'"{r["text"]}"')
        assert r["explanation"] == (None if contrarian else r["raw_explanation"])
        assert r["teacher"] == f"openai:fake-teacher@{server.url.split('//')[1]}"
    assert set(server.counts.values()) == {1} and len(server.counts) == 24  # one rationale + one judge each
    assert stats["per_class"]["negative"]["cls_only"] == 1 and stats["per_class"]["positive"]["cls_only"] == 1


def test_retries_on_429_and_500_lose_nothing(tmp_path, rows, server_factory):
    server = server_factory()
    ref, _, _ = _build(tmp_path, rows, server, name="ref", mode="unconditioned")
    flaky_items = {t for t, _ in REVIEWS[::2]}
    server.counts.clear()
    # every other item: 429, then 500, then success
    server.plan = lambda kind, ident, attempt: 429 if attempt == 1 else 500 if attempt == 2 else "ok"
    server.plan = (lambda plan: lambda kind, ident, attempt: plan(kind, ident, attempt) if ident in flaky_items
                   else "ok")(server.plan)
    out, _, teacher = _build(tmp_path, rows, server, mode="unconditioned")
    assert out == ref and all(r["consistent"] for r in out)
    assert teacher.retries == 2 * len(flaky_items) and teacher.requests == 12 + 2 * len(flaky_items)


def test_timeouts_are_retried(tmp_path, rows, server_factory):
    server = server_factory()
    ref, _, _ = _build(tmp_path, rows, server, name="ref", mode="unconditioned")
    hang_on = {REVIEWS[1][0], REVIEWS[4][0], REVIEWS[9][0]}
    server.counts.clear()
    server.plan = lambda kind, ident, attempt: "hang" if ident in hang_on and attempt == 1 else "ok"
    t0 = time.perf_counter()
    out, _, teacher = _build(tmp_path, rows, server, mode="unconditioned", timeout=0.5)
    assert out == ref and teacher.retries == 3
    assert time.perf_counter() - t0 < 5  # the three hangs overlap (concurrency 4)


def test_timeout_bounds_the_whole_attempt(tmp_path, rows, server_factory):
    """A server that trickles its answer (every read well within the socket timeout, the whole answer
    far beyond it) is timed out after --timeout and retried, not waited for."""
    server = server_factory()
    ref, _, _ = _build(tmp_path, rows, server, name="ref", mode="unconditioned")
    slow = REVIEWS[2][0]
    server.counts.clear()
    server.plan = lambda kind, ident, attempt: "trickle" if ident == slow and attempt == 1 else "ok"
    t0 = time.perf_counter()
    out, _, teacher = _build(tmp_path, rows, server, mode="unconditioned", timeout=0.5)
    assert out == ref and teacher.retries == 1 and server.gens()[slow] == 2
    assert time.perf_counter() - t0 < 3  # the trickle alone takes ~4 s


def test_fatal_errors_are_one_clear_message_without_the_key(tmp_path, rows, server_factory, monkeypatch):
    monkeypatch.setenv("TEACHER_KEY", "sk-very-secret")
    server = server_factory(lambda kind, ident, attempt: 401)
    with pytest.raises(TeacherError, match=r"refused the request: HTTP 401") as e:
        _build(tmp_path, rows, server, mode="unconditioned", api_key_env="TEACHER_KEY")
    assert "sk-very-secret" not in str(e.value) and server.auth[0] == "Bearer sk-very-secret"
    assert "sk-very-secret" not in repr(HTTPTeacher(server.url, "m", api_key_env="TEACHER_KEY"))
    server = server_factory(lambda kind, ident, attempt: 503)
    with pytest.raises(TeacherError, match=r"failed 2 attempts .*last error: HTTP 503"):
        _build(tmp_path, rows, server, mode="unconditioned", max_retries=1)
    # a server that echoes the key in its error body: the message shows *** instead
    server = server_factory(lambda kind, ident, attempt: (401, "bad key {auth}"))
    with pytest.raises(TeacherError, match=r"HTTP 401 Unauthorized: .*bad key Bearer \*\*\*") as e:
        _build(tmp_path, rows, server, mode="unconditioned", api_key_env="TEACHER_KEY")
    assert "sk-very-secret" not in str(e.value)


def test_a_refused_item_is_classification_only_and_asked_again(tmp_path, rows, server_factory):
    """HTTP 400 for one prompt (e.g. longer than the teacher's context) costs that item its
    explanation, not the build; it is not cached, so a rerun asks for it (and only it) again."""
    long_one = REVIEWS[2][0]
    server = server_factory(lambda kind, ident, attempt: (400, "maximum context length is 8 tokens")
                            if ident == long_one else "ok")
    out, stats, _ = _build(tmp_path, rows, server, mode="unconditioned")
    assert stats["refused"] == 1 and [r["explanation"] is None for r in out] == [i == 2 for i in range(12)]
    assert all(r["consistent"] for i, r in enumerate(out) if i != 2)
    server.counts.clear()
    server.plan = lambda kind, ident, attempt: "ok"
    out, stats, _ = _build(tmp_path, rows, server, mode="unconditioned")
    assert server.gens() == Counter({long_one: 1}) and stats["refused"] == 0 and out[2]["consistent"]
    server = server_factory(lambda kind, ident, attempt: 400)  # every item: a setup fault, not the items'
    with pytest.raises(TeacherError, match="the teacher refused every item; the first refusal: .*HTTP 400"):
        _build(tmp_path, rows, server, name="all", mode="unconditioned")


def test_a_fatal_error_keeps_the_finished_items(tmp_path, rows, server_factory):
    """When one request fails for good, every item the teacher had already answered is cached: the
    rerun asks only for the others."""
    bad = REVIEWS[7][0]
    server = server_factory(lambda kind, ident, attempt: 403 if ident == bad else "ok")
    with pytest.raises(TeacherError, match="HTTP 403"):
        _build(tmp_path, rows, server, mode="unconditioned")
    first = {ident for kind, ident in server.answered}
    assert len(first) >= 4  # the items before the failing one, at least
    server.counts.clear()
    server.plan = lambda kind, ident, attempt: "ok"
    _build(tmp_path, rows, server, mode="unconditioned")
    assert not set(server.gens()) & first and set(server.gens()) | first == {t for t, _ in REVIEWS}


def test_killed_run_resumes_without_regenerating(tmp_path, rows, server_factory):
    server = server_factory()
    f = write_jsonl(tmp_path / "in.jsonl", rows)

    def args(name):
        return ["--input", str(f), "--output", str(tmp_path / f"{name}.jsonl"), "--teacher-url", server.url,
                "--teacher-model", "fake-teacher", "--concurrency", "2", "--max-new-tokens", "32",
                "data.label_names=[negative,positive]"]

    assert build_data_main(args("ref")) == 0  # uninterrupted reference
    server.counts.clear()
    server.order.clear()
    server.total, server.allow = 0, 8  # 8 requests are answered, later ones hang until the gate opens
    env = {**clean_env(), "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    proc = subprocess.Popen([PY, str(REPO / "launch" / "build_data.py"), *args("out")], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    cache = tmp_path / "out.cache.jsonl"

    def cached() -> set[str]:  # texts of the complete cache lines
        lines = cache.read_text().splitlines(keepends=True) if cache.is_file() else []
        return {json.loads(x)["raw"].split(': "', 1)[1][:-1] for x in lines if x.endswith("\n")}

    # Stuck state: both workers wait on a held request (10 arrived), and every item whose judge
    # request was answered is complete (4, or 3 when a worker's held request is a judge request).
    deadline = time.time() + 120
    while server.total < 10 or len(cached()) < sum(k == "judge" for k, _ in server.order[:8]):
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, f"stuck: {server.total} requests, {len(cached())} cached"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "out.stats.json").exists()
    done = cached()
    assert len(done) in (3, 4)
    first = server.gens()
    server.gate.set()
    proc = launch("build_data.py", args("out"), timeout=120)
    again = server.gens() - first
    assert sorted(again) == sorted(t for t, _ in REVIEWS if t not in done)  # only the missing items
    assert set(again.values()) == {1}
    assert (tmp_path / "out.jsonl").read_bytes() == (tmp_path / "ref.jsonl").read_bytes()
    stats = json.loads((tmp_path / "out.stats.json").read_text())
    assert (stats["generated"], stats["from_cache"]) == (12 - len(done), len(done))


def test_ctrl_c_says_what_it_waits_for_and_a_second_one_quits(tmp_path, rows, server_factory):
    """Ctrl-C while requests hang: one line says what the run waits for (the chunks in flight, up
    to --timeout) and that Ctrl-C again quits; the second quits at once with status 130 and no
    traceback; the cache keeps the items completed before, and a rerun asks only for the others."""
    import signal

    server = server_factory()
    server.allow = 4  # the first 4 requests (2 items: generation + judge) are answered, the rest hang
    f = write_jsonl(tmp_path / "in.jsonl", rows)
    args = ["--input", str(f), "--output", str(tmp_path / "out.jsonl"), "--teacher-url", server.url,
            "--teacher-model", "fake-teacher", "--concurrency", "2", "--max-new-tokens", "32", "--timeout", "60",
            "data.label_names=[negative,positive]"]
    env = {**clean_env(), "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    proc = subprocess.Popen([PY, str(REPO / "launch" / "build_data.py"), *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    cache = tmp_path / "out.cache.jsonl"
    deadline = time.time() + 120
    # both workers wait on a held request (6 arrived); every item whose judge request was answered is cached
    while server.total < 6 or len(cached := (cache.read_text().splitlines() if cache.is_file() else [])) < sum(
            k == "judge" for k, _ in server.order[:4]):
        assert proc.poll() is None and time.time() < deadline, f"stuck at {server.total} requests"
        time.sleep(0.05)
    before = len(cached)
    assert before in (1, 2)
    proc.send_signal(signal.SIGINT)
    err = ""
    while "Ctrl-C again quits now" not in err:  # the warning arrives; the run goes on waiting
        line = proc.stderr.readline()
        assert line, err
        err += line
    assert "waiting for the 2 chunk(s) with a request in flight (each request up to --timeout 60s)" in err
    time.sleep(0.3)
    assert proc.poll() is None
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    err += proc.stderr.read()
    assert proc.wait(timeout=10) == 130 and time.time() - t0 < 5, err
    assert "Traceback" not in err and "quitting without the requests in flight" in err
    assert not (tmp_path / "out.jsonl").exists()
    assert len([json.loads(x) for x in cache.read_text().splitlines()]) == before
    server.gate.set()
    server.counts.clear()
    launch("build_data.py", args, timeout=120, env={"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"})
    assert sum(server.gens().values()) == len(rows) - before  # only the items not cached before


def test_unreachable_endpoint_and_bad_input_exit_2_without_traceback(tmp_path, rows, capsys):
    f = write_jsonl(tmp_path / "in.jsonl", rows)
    port = free_port()
    proc = launch("build_data.py", ["--input", str(f), "--output", str(tmp_path / "o.jsonl"), "--teacher-url",
                                    f"http://127.0.0.1:{port}/v1", "--teacher-model", "m"], check=False, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: cannot reach the teacher endpoint http://127.0.0.1:{port}/v1/chat/completions: Connection refused; "
        f"is the server running and is --teacher-url right?")
    assert not (tmp_path / "o.jsonl").exists()

    def main_err(rows_, *extra):
        g = write_jsonl(tmp_path / "bad.jsonl", rows_)
        with pytest.raises(SystemExit) as e:
            build_data_main(["--input", str(g), "--output", str(tmp_path / "o.jsonl"), "--teacher-url",
                             f"http://127.0.0.1:{port}", "--teacher-model", "m", *extra])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
        return err

    assert f"{tmp_path / 'bad.jsonl'}: missing field 'text'" in main_err([{"body": "x", "label": 1}])
    assert "line 2: field 'label' = 'maybe' is not a label" in main_err([{"text": "a", "label": 0},
                                                                        {"text": "b", "label": "maybe"}])
    assert "line 1: field 'label' is missing" in main_err([{"text": "a"}, {"text": "b", "label": 1}])
    assert "--api-key-env NOPE_KEY: that environment variable is not set" in main_err(rows, "--api-key-env", "NOPE_KEY")


def test_two_ranks_share_the_work(tmp_path, rows, server_factory):
    server = server_factory()
    f = write_jsonl(tmp_path / "in.jsonl", rows)
    common = ["--input", str(f), "--teacher-url", server.url, "--teacher-model", "fake-teacher",
              "data.label_names=[negative,positive]"]
    assert build_data_main([*common, "--output", str(tmp_path / "one.jsonl")]) == 0
    server.counts.clear()
    proc = launch("build_data.py", [*common, "--output", str(tmp_path / "two.jsonl")], launcher="torchrun", nproc=2,
                  timeout=300)
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert proc.stdout.count(f"wrote {tmp_path / 'two.jsonl'}: 12 examples") == 1  # the summary: rank 0 only
    assert set(server.gens().values()) == {1} and len(server.gens()) == 12


def test_output_paths_and_existing_explanations_are_checked_first(tmp_path, rows, capsys):
    """Before any teacher is asked: the output may not be the input (nor its stats or cache file),
    it is JSONL whatever its name, and an input that already has explanations is not silently
    replaced. Each is one line, exit 2, and the input file is untouched."""
    f = write_jsonl(tmp_path / "in.jsonl", rows)
    given = write_jsonl(tmp_path / "given.jsonl", [{**r, "explanation": "A human rationale."} if i == 3 else r
                                                   for i, r in enumerate(rows)])
    before = {p: p.read_bytes() for p in (f, given)}
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens: these must fail before any request

    def err(*argv):
        with pytest.raises(SystemExit) as e:
            build_data_main([*argv, "--teacher-url", url, "--teacher-model", "m"])
        out = capsys.readouterr().err
        assert e.value.code == 2 and "Traceback" not in out and len(out.strip().splitlines()) == 1, out
        return out

    assert f"is the --input file {f}" in err("--input", str(f), "--output", str(f))
    assert "is the --input file" in err("--input", str(tmp_path / "in.jsonl"), "--output",
                                        str(tmp_path / "sub" / ".." / "in.jsonl"))
    cache_named = tmp_path / "x.cache.jsonl"
    cache_named.write_bytes(f.read_bytes())
    assert "is the --input file" in err("--input", str(cache_named), "--output", str(tmp_path / "x.jsonl"))
    assert "the output is JSON Lines; name it *.jsonl" in err("--input", str(f), "--output", str(tmp_path / "o.csv"))
    msg = err("--input", str(given), "--output", str(tmp_path / "o.jsonl"))
    assert "1 of 12 rows already have an explanation ('explanation', e.g. id" in msg and "--replace-existing" in msg
    assert {p: p.read_bytes() for p in (f, given)} == before
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "o.csv").exists()


def test_answers_without_text_are_refusals_of_that_item(tmp_path, rows, server_factory):
    """A 200 whose content is null (a content filter) or that has no choices, and a refused judge
    request, cost their item its explanation, not the build, and are not retried; none of them is
    cached, so a rerun asks for those items again (and only them). A 502 whose body is cut short is
    retried like any 5xx."""
    filtered, empty, judged, cut = REVIEWS[0][0], REVIEWS[1][0], REVIEWS[4][0], REVIEWS[5][0]

    def plan(kind, ident, attempt):
        if kind == "gen" and ident == filtered:
            return "null"
        if kind == "gen" and ident == empty:
            return "no_choices"
        if kind == "judge" and judged in ident:
            return (400, "judge prompt refused")
        if kind == "gen" and ident == cut and attempt == 1:
            return "cut_502"
        return "ok"

    server = server_factory(plan)
    out, stats, teacher = _build(tmp_path, rows, server)
    assert stats["refused"] == 3 and teacher.retries == 1  # only the cut 502 was retried
    assert [r["explanation"] is None for r in out] == [i in (0, 1, 3, 4, 6) for i in range(12)]  # 3, 6: contrarian
    assert out[4]["stance"] is None and out[5]["consistent"]
    assert server.gens()[filtered] == 1 and server.gens()[empty] == 1 and server.gens()[cut] == 2
    server.counts.clear()
    server.plan = lambda kind, ident, attempt: "ok"
    out, stats, _ = _build(tmp_path, rows, server)
    assert set(server.gens()) == {filtered, empty, judged} and stats["refused"] == 0  # the whole item again
    assert sum(c for (kind, _), c in server.counts.items() if kind == "judge") == 3
    assert [r["explanation"] is None for r in out] == [i in (3, 6) for i in range(12)]


def test_retry_after_seconds_and_dates():
    import email.utils

    from clsgen_dist.data.teachers import _retry_after

    assert _retry_after({"Retry-After": "2.5"}) == 2.5 and _retry_after({"Retry-After": " 3 "}) == 3.0
    soon = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < _retry_after({"Retry-After": soon}) <= 31
    assert _retry_after({"Retry-After": "soon"}) is None and _retry_after({}) is None and _retry_after(None) is None


def test_a_restated_label_is_no_rationale(tmp_path, rows, server_factory):
    """An endpoint that answers the label it was told ("**Positive.**") gives no reason: the item
    is classification-only, not an LM target that teaches the model to skip the explanation."""
    lazy = {REVIEWS[0][0], REVIEWS[1][0]}
    server = server_factory(lambda kind, ident, attempt: "restate" if kind == "gen" and ident in lazy else "ok")
    out, stats, _ = _build(tmp_path, rows, server)
    assert [r["explanation"] is None for r in out] == [i in (0, 1, 3, 6) for i in range(12)]  # 3, 6: contrarian
    assert out[0]["raw_explanation"] == "**Positive.**" and out[1]["raw_explanation"] == "**Negative.**"
    assert not out[0]["consistent"] and stats["per_class"]["positive"]["cls_only"] == 2
    assert not [ident for kind, ident in server.counts if kind == "judge" and ident.startswith("**")]  # not judged


def test_repeated_rows_share_an_item_and_are_not_counted_as_cached(tmp_path, rows, server_factory):
    server = server_factory()
    out, stats, _ = _build(tmp_path, rows + rows[:3], server, mode="unconditioned")
    assert len(out) == 15 and out[12:] == out[:3]  # every row written, the repeats with their item's answer
    assert (stats["generated"], stats["from_cache"], stats["duplicates"]) == (12, 0, 3)
    assert set(server.gens().values()) == {1}
