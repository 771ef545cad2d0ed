"""`detr serve`: a real server process on a free loopback port, every endpoint, errors, batching,
the queue bound, API keys, SIGTERM, and the page in headless Chromium."""

import concurrent.futures
import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("fastapi", reason="needs the serving extra: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx", reason="needs httpx (the test extra)")

import detr  # noqa: E402
from detr import load_config  # noqa: E402
from detr.constraints import Constraints  # noqa: E402
from tests.conftest import ROOT, detr_cli  # noqa: E402
from tests.test_tasks import labelled_config  # noqa: E402

SENTENCES = ["we have two red dogs.", "she counts one old cat.", "they buy three new books.", "you paint one big boat.",
             "we see four small birds.", "he has a green car."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `detr serve` process on a free loopback port."""

    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "detr", "serve", *args, "--port", str(self.port)],
                                     cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stderr.read().decode())
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError("the server did not start")

    def post(self, path: str, body, **kw) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=60, **kw)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)


@pytest.fixture(scope="module")
def runs(toy_run, tmp_path_factory):
    out = {"de": toy_run / "run"}
    for task in ("classify", "tag"):
        tmp = tmp_path_factory.mktemp(f"serve_{task}")
        detr.train(load_config(labelled_config(tmp, task, **{"train.max_steps": 40, "train.eval_every": 40})))
        out[task] = tmp / "run"
    return out


@pytest.fixture(scope="module")
def server(runs):
    # two workers per model: every route below runs on a model that two threads compute with at once
    srv = Server(*(f"{name}={path}" for name, path in runs.items()), "--max-wait-ms", "50", "--workers", "2",
                 "--threads", "1")
    yield srv
    srv.stop()


def test_models_health_ready_and_openapi(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/ready").json() == {"ready": True, "models": ["de", "classify", "tag"]}
    models = {m["name"]: m for m in httpx.get(server.url + "/v1/models").json()["models"]}
    assert models["de"]["task"] == "translate" and models["de"]["languages"] == {"src": "en", "tgt": "de"}
    assert models["classify"]["labels"] == ["neg", "pos"] and models["de"]["decode"]["beam_size"] == 4
    schema = httpx.get(server.url + "/openapi.json").json()
    assert {"/v1/translate", "/v1/generate", "/v1/classify", "/v1/tag", "/v1/inspect"} <= set(schema["paths"])
    # a streamed generation answers server-sent events: the schema says so (schemathesis flagged it)
    assert "text/event-stream" in schema["paths"]["/v1/generate"]["post"]["responses"]["200"]["content"]


def test_translate_equals_the_offline_translator(server, runs):
    translator = detr.load(runs["de"])
    got = server.post("/v1/translate", {"model": "de", "texts": SENTENCES + [""]}).json()
    assert got["translations"] == translator.translate(SENTENCES + [""])
    nbest = server.post("/v1/translate", {"text": SENTENCES[0], "decode": {"beam_size": 3, "nbest": 3}}).json()
    offline = translator.translate_nbest([SENTENCES[0]], translator.options(beam_size=3, nbest=3))[0]
    assert [(h["text"], round(h["score"], 4)) for h in nbest["nbest"][0]] == [(t, round(s, 4)) for t, s in offline]
    for steered in ({"beam_size": 4, "nbest": 4, "beam_groups": 2, "diversity_penalty": 1.0},
                    {"beam_size": 4, "nbest": 4, "rerank_anti_lm": 0.5}):
        got = server.post("/v1/translate", {"texts": SENTENCES, "decode": steered}).json()
        offline = translator.translate_nbest(SENTENCES, translator.options(**steered))
        assert [[h["text"] for h in found] for found in got["nbest"]] == [[t for t, _ in found] for found in offline]
    aligned = server.post("/v1/translate", {"text": SENTENCES[0], "alignment": True}).json()
    assert aligned["alignments"][0] and "-" in aligned["alignments"][0]


def test_translate_with_constraints_and_score_equal_the_offline_translator(server, runs):
    translator = detr.load(runs["de"])
    wishes = [{"include": ["Hunde"]}, {"prefix": "wir"}, {"exclude": ["sie"]}]
    got = server.post("/v1/translate", {"texts": SENTENCES[:3], "constraints": wishes}).json()
    offline = translator.translate(SENTENCES[:3], None, [Constraints.from_dict(w, "x") for w in wishes])
    assert got["translations"] == offline and "Hunde" in offline[0] and offline[1].startswith("wir")
    bad = server.post("/v1/translate", {"texts": SENTENCES[:2], "constraints": wishes})
    assert bad.status_code == 422 and "constraints: 3 entries for 2 texts" in bad.json()["error"]["message"]
    bad = server.post("/v1/translate", {"text": "x", "constraints": [{"include": ["ab"], "exclude": ["ab"]}]})
    assert bad.status_code == 422 and "constraints[0]: the included phrase 'ab'" in bad.json()["error"]["message"]
    scores = server.post("/v1/score", {"sources": SENTENCES[:2], "targets": offline[:2]}).json()["scores"]
    expected = translator.score(SENTENCES[:2], offline[:2])
    assert [s["logprob"] for s in scores] == pytest.approx([s.total for s in expected], abs=1e-5)
    bad = server.post("/v1/score", {"sources": SENTENCES[:2], "targets": offline[:1]})
    assert bad.status_code == 422 and "1 targets for 2 sources" in bad.json()["error"]["message"]


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(server, runs):
    translator = detr.load(runs["de"])
    expected = {s: translator.translate([s])[0] for s in SENTENCES}
    before = batch_counts(server)
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda i: server.post("/v1/translate", {"text": SENTENCES[i % 6]}).json(), range(32)))
    assert [a["translations"][0] for a in answers] == [expected[SENTENCES[i % 6]] for i in range(32)]
    calls, requests = (a - b for a, b in zip(batch_counts(server), before))
    assert requests / calls > 1.5  # requests shared the model's decoding steps


def test_the_serve_extra_gives_uvicorn_its_c_http_parser_and_event_loop():
    import uvicorn

    config = uvicorn.Config(lambda scope, receive, send: None)
    config.load()
    assert config.http_protocol_class.__name__ == "HttpToolsProtocol"
    assert config.get_loop_factory().__module__.startswith("uvloop")


def test_decoding_options_validated_once_are_not_confused_with_equal_values_of_other_types(server):
    for beam in (1, 1, 2):  # validated once per setting and kept
        assert server.post("/v1/translate", {"text": SENTENCES[0], "decode": {"beam_size": beam}}).status_code == 200
    for wrong in (True, 1.0, 2.0):  # equal to a kept setting in Python, yet not an int
        bad = server.post("/v1/translate", {"text": SENTENCES[0], "decode": {"beam_size": wrong}})
        assert bad.status_code == 422 and "decode.beam_size: expected int" in bad.json()["error"]["message"]


def test_requests_are_counted_by_route_and_status(server):
    ok = request_count(server, "/v1/translate", "200")
    assert server.post("/v1/translate", {"text": SENTENCES[0]}).status_code == 200
    assert server.post("/v1/translate", {"text": SENTENCES[0], "model": "nobody"}).status_code == 404
    assert request_count(server, "/v1/translate", "200") == ok + 1
    assert request_count(server, "/v1/translate", "404") >= 1


def batch_counts(server) -> tuple[float, float]:
    text = httpx.get(server.url + "/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line.startswith("detr_")}
    return values.get('detr_batch_requests_count{model="de"}', 0), values.get('detr_batch_requests_sum{model="de"}', 0)


def test_generate_and_its_stream_equal_the_offline_samples(server, runs):
    translator = detr.load(runs["de"])
    options = {"num_samples": 2, "seed": 5, "temperature": 1.5, "max_len_b": 8}
    offline = translator.generate([SENTENCES[1]], translator.options(**options))[0]
    got = server.post("/v1/generate", {"text": SENTENCES[1], "decode": options}).json()
    assert [s["text"] for s in got["samples"][0]] == [t for t, _ in offline]
    with httpx.stream("POST", server.url + "/v1/generate", timeout=60,
                      json={"text": SENTENCES[1], "decode": options, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [block for block in response.read().decode().split("\n\n") if block.strip()]
    deltas = [json.loads(e.split("data: ", 1)[1]) for e in events if not e.startswith("event:")]
    done = json.loads(events[-1].split("data: ", 1)[1])
    assert events[-1].startswith("event: done") and [s["text"] for s in done["samples"]] == [t for t, _ in offline]
    for row in (0, 1):  # the pieces sent as they were drawn add up to the final text
        assert "".join(d["delta"] for d in deltas if d["sample"] == row) == offline[row][0]


def test_classify_tag_and_inspect(server, runs):
    labels = server.post("/v1/classify", {"model": "classify", "texts": ["the film was superb", ""],
                                          "probs": True}).json()
    offline = detr.load(runs["classify"]).classify(["the film was superb", ""])
    assert labels["labels"] == [label for label, _ in offline]
    assert labels["probabilities"][0] == pytest.approx(offline[0][1])
    tags = server.post("/v1/tag", {"model": "tag", "text": "Anna visited Paris ."}).json()
    assert [p["word"] for p in tags["tags"][0]] == ["Anna", "visited", "Paris", "."]
    maps = server.post("/v1/inspect", {"model": "de", "text": SENTENCES[0]}).json()["outputs"][0]
    assert len(maps["cross"]) == 2 and len(maps["cross"][0][0]) == len(maps["tgt_tokens"])


@pytest.mark.parametrize("path,body,status,message", [
    ("/v1/translate", {"model": "nope", "text": "x"}, 404, "no model named 'nope'"),
    ("/v1/translate", {"text": "x", "decode": {"beam": 2}}, 422, "decode.beam: not a decoding option"),
    ("/v1/translate", {"text": "x", "decode": {"beam_size": 0}}, 422, "decode.beam_size must be positive"),
    ("/v1/translate", {"text": "x", "decode": {"backward_weight": 1.0}}, 422, "needs a backward run"),
    ("/v1/translate", {"text": "x", "decode": {"rerank_anti_lm": -1.0}}, 422,
     "decode.rerank_anti_lm must not be negative"),
    ("/v1/translate", {"text": "x", "decode": {"beam_size": 4, "beam_groups": 3}}, 422,
     "decode.beam_groups=3 must divide decode.beam_size=4"),
    ("/v1/translate", {"text": "x", "texts": ["y"]}, 422, "exactly one of 'text' and 'texts'"),
    ("/v1/translate", {"text": "x", "colour": "red"}, 422, "colour"),
    ("/v1/translate", {"text": "x" * 5001}, 413, "text: 5001 characters"),
    ("/v1/translate", {"texts": ["x"] * 65}, 413, "texts: 65 texts"),
    ("/v1/translate", {"texts": ["x", "y" * 6000]}, 413, "texts[1]"),
    ("/v1/classify", {"model": "de", "text": "x"}, 409, "is a translate model"),
    ("/v1/generate", {"texts": ["a", "b"], "stream": True}, 422, "stream"),
])
def test_bad_requests_get_a_status_and_a_json_error(server, path, body, status, message):
    response = server.post(path, body)
    assert response.status_code == status and message in response.json()["error"]["message"]


def test_malformed_and_oversized_bodies(server):
    for body in (b"{not json", b"\xff\xfe"):  # bad JSON, and bytes that are not even UTF-8 (found by fuzzing)
        bad = httpx.post(server.url + "/v1/translate", content=body, headers={"content-type": "application/json"})
        assert bad.status_code == 422 and "not valid JSON" in bad.json()["error"]["message"]
    missing = httpx.get(server.url + "/v2/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"
    before = request_count(server, "other", "413")  # refused before routing
    big = httpx.post(server.url + "/v1/translate", content=b" " * 1_000_001,
                     headers={"content-type": "application/json"})
    assert big.status_code == 413 and big.json()["error"]["type"] == "too_large"
    assert request_count(server, "other", "413") == before + 1


def request_count(server, endpoint: str, status: str) -> float:
    """`detr_requests_total` of one route and status, from /metrics."""
    wanted = f'detr_requests_total{{endpoint="{endpoint}",status="{status}"}}'
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(wanted):
            return float(line.split(" ")[1])
    return 0.0


def test_a_client_that_goes_away_does_not_stall_the_server(server):
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/translate", json={"texts": SENTENCES * 10, "decode": {"beam_size": 4}},
                   timeout=0.05)
    assert server.post("/v1/translate", {"text": SENTENCES[0]}).status_code == 200


def test_api_keys_a_full_queue_and_sigterm(runs, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# one key per line\nsecret-one\nsecret-two\n")
    srv = Server(str(runs["de"]), "--api-key-file", str(keys), "--max-queue", "1", "--max-wait-ms", "1500")
    try:
        assert httpx.get(srv.url + "/health").status_code == 200  # open without a key
        assert srv.post("/v1/translate", {"text": "x"}).status_code == 401
        wrong = srv.post("/v1/translate", {"text": "x"}, headers={"Authorization": "Bearer secret"})
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "unauthorized"
        auth = {"Authorization": "Bearer secret-two"}
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            first = pool.submit(srv.post, "/v1/translate", {"text": SENTENCES[0]}, headers=auth)
            time.sleep(0.4)  # the first request now waits up to 1.5 s for company, filling the queue of 1
            second = srv.post("/v1/translate", {"text": SENTENCES[1]}, headers=auth)
            assert second.status_code == 429 and second.headers["retry-after"] == "1"
            assert first.result().status_code == 200
            in_flight = pool.submit(srv.post, "/v1/translate", {"text": SENTENCES[2]}, headers=auth)
            time.sleep(0.4)
            srv.proc.send_signal(signal.SIGTERM)  # graceful: the request in flight is answered first
            assert in_flight.result().status_code == 200
        assert srv.proc.wait(30) == 0
    finally:
        srv.stop()


def child_processes(pid: int) -> list[int]:
    return [int(child) for child in open(f"/proc/{pid}/task/{pid}/children").read().split()]


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for its parent)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_several_processes_share_the_port_and_the_metrics_and_stop_gracefully(runs):
    srv = Server(f"de={runs['de']}", "--processes", "2", "--max-wait-ms", "50")
    try:
        assert len(child_processes(srv.proc.pid)) == 2
        translator = detr.load(runs["de"])
        expected = {s: translator.translate([s])[0] for s in SENTENCES}
        with concurrent.futures.ThreadPoolExecutor(16) as pool:  # a new connection each: the kernel spreads them
            answers = list(pool.map(lambda i: srv.post("/v1/translate", {"text": SENTENCES[i % 6]}).json(),
                                    range(24)))
        assert [a["translations"][0] for a in answers] == [expected[SENTENCES[i % 6]] for i in range(24)]
        # whichever process answers /metrics counts every process's requests (24 connections reached both
        # processes but with a chance of 2 ** -23)
        assert [request_count(srv, "/v1/translate", "200") for _ in range(6)] == [24.0] * 6
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            in_flight = [pool.submit(srv.post, "/v1/translate", {"texts": SENTENCES * 4, "decode": {"beam_size": 4}})
                         for _ in range(4)]
            time.sleep(0.3)
            srv.proc.send_signal(signal.SIGTERM)  # to the parent: each process finishes what it has in flight
            assert [f.result().status_code for f in in_flight] == [200] * 4
        assert srv.proc.wait(30) == 0
        assert "2 processes" in srv.proc.stderr.read().decode()
    finally:
        srv.stop()


def test_the_processes_of_a_server_whose_parent_is_killed_stop(runs):
    srv = Server(str(runs["de"]), "--processes", "2")
    children = child_processes(srv.proc.pid)
    srv.proc.kill()
    srv.proc.wait(10)
    deadline = time.time() + 30
    while any(map(alive, children)) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(map(alive, children))
    with socket.socket() as s:  # the port is free again
        s.bind(("127.0.0.1", srv.port))


def test_several_processes_where_they_cannot_serve_get_one_line(runs, tmp_path):
    srv = Server(str(runs["de"]), "--processes", "2")
    try:  # the port is held by a server that shares it among its processes: a second one is refused
        out = detr_cli("serve", str(runs["de"]), "--processes", "2", "--port", str(srv.port), timeout=120)
        assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith(
            f"detr: error: serve: cannot listen on 127.0.0.1:{srv.port}: Address already in use")
    finally:
        srv.stop()
    out = detr_cli("serve", str(runs["de"]), "--processes", "2", "--engine", "ctranslate2", timeout=60)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1] == (
        "detr: error: serve.processes=2 is for the torch engine: --engine ctranslate2 computes on threads of its "
        "own (give --workers instead)")
    out = detr_cli("serve", str(runs["de"]), "--processes", "2", "--device", "cuda", timeout=60)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1] == (
        "detr: error: serve.processes=2 runs on the CPU only (a forked process cannot use the CUDA its parent "
        "started): serve --device cuda with --processes 1")
    # processes that cannot build their app: the error once, exit 2
    out = detr_cli("serve", str(runs["de"]), "--processes", "2", "--port", str(free_port()),
                   "--assistant", str(tmp_path / "nowhere"), timeout=120)
    assert out.returncode == 2 and out.stderr.count("detr: error:") == 1
    assert out.stderr.strip().splitlines()[-1].startswith(
        f"detr: error: {tmp_path / 'nowhere'}")


def test_a_public_address_needs_a_key(runs):
    out = detr_cli("serve", str(runs["de"]), "--host", "0.0.0.0", timeout=60)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1] == (
        "detr: error: serve.host=0.0.0.0 is reachable from other machines: give --api-key-file, or "
        "--insecure-public to serve without keys")


@contextlib.contextmanager
def chromium_browser():
    """A headless Chromium driven by selenium, or skip the test with the reason."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("chromium and chromedriver are not installed (.ci/run installs Debian's chromium, chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the test extra)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
                 "--disable-dev-shm-usage"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    try:
        yield browser
    finally:
        browser.quit()


def test_the_page_translates_and_draws_the_heatmap_in_chromium(server, runs):
    with chromium_browser() as browser:
        from selenium import webdriver
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "ready")
        browser.find_element(By.ID, "src").send_keys(SENTENCES[0])
        browser.find_element(By.ID, "go").click()
        wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error"))
        assert browser.find_element(By.ID, "out").text == detr.load(runs["de"]).translate([SENTENCES[0]])[0]
        cells = browser.find_elements(By.CSS_SELECTOR, "#heat td")
        tokens = browser.find_elements(By.CSS_SELECTOR, "#tgtToks .tok")
        assert len(cells) > 0 and len(tokens) > 0
        webdriver.ActionChains(browser).move_to_element(tokens[0]).perform()  # hover: the source is shaded
        shaded = [t.value_of_css_property("background-color") for t in
                  browser.find_elements(By.CSS_SELECTOR, "#srcToks .tok")]
        assert any(color != "rgba(0, 0, 0, 0)" for color in shaded)


def test_each_model_thread_gets_its_share_of_the_cores():
    """The main thread serves HTTP on one intra-op thread; each model's worker threads set their own count
    (by default, with the torch engine, a worker of one thread per core the model has; `--workers`,
    `--threads` or another engine otherwise) without touching the main thread's. In a fresh
    interpreter: the test process has set its threads already."""
    from detr.config import ServeConfig
    from detr.serve import worker_plan

    cores = torch.get_num_threads()
    assert worker_plan(ServeConfig(), 1) == (cores, 1)
    assert worker_plan(ServeConfig(), 2 * cores) == (1, 1)
    assert worker_plan(ServeConfig(threads=3), 2) == (max(1, cores // 2 // 3), 3)
    assert worker_plan(ServeConfig(workers=1), 1) == (1, cores)
    assert worker_plan(ServeConfig(workers=2, threads=5), 1) == (2, 5)
    assert worker_plan(ServeConfig(engine="ctranslate2"), 1) == (1, cores)
    assert worker_plan(ServeConfig(assistant="folder"), 1) == (max(1, cores // 2), 1)
    assert worker_plan(ServeConfig(processes=cores), 1) == (1, 1)
    assert worker_plan(ServeConfig(processes=2 * cores, workers=1), 1) == (1, 1)
    script = ("import torch\n"
              "from detr.serve.app import intra_op\n"
              "from detr.serve.batcher import Batcher, Job\n"
              "main = torch.get_num_threads()\n"
              "b = Batcher('m', 10, 0.0, 10, on_start=intra_op(main + 1))\n"
              "inner = b.submit(Job('k', [0], 1, lambda xs: [torch.get_num_threads()])).result(30)[0]\n"
              "b.stop()\n"
              "print(main, inner, torch.get_num_threads())\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    main, inner, main_after = map(int, out.stdout.split())
    assert (inner, main_after) == (main + 1, main)
