"""`evl serve`: the JSON API, its validation, path-traversal and oversized/malformed requests, binding,
and (in a real headless Chromium) the page: search, thumbnails, open a result, ask, see the answer."""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import needs
from evl.cli import app

needs.module("faiss", "pip install faiss-cpu (in the serve extra)")
needs.module("fastapi", "pip install -e '.[serve]'")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
SECRET = "evl-secret-outside-the-index"


@pytest.fixture(scope="module")
def served(tmp_path_factory, synthvl, trained):
    """An index of the 12 clips (one linked outside the folder), a frame-QA model, and a file outside."""
    from evl.search.index import build_index
    from evl.techniques.vlap.train import load_vlap_recipe, train_vlap

    tmp = tmp_path_factory.mktemp("served")
    model, caps = trained
    videos = tmp / "videos"
    shutil.copytree(synthvl / "videos", videos)
    (tmp / "secret.txt").write_text(SECRET)
    (videos / "escape.mp4").symlink_to(tmp / "secret.txt")
    build_index(videos, model, tmp / "index")
    ann = synthvl / "annotations"
    summary = train_vlap(load_vlap_recipe(None, [
        f"backbone={model}", f"data.train={ann / 'qa_train.json'}", f"data.videos={synthvl / 'videos'}",
        "model.select=uniform", "model.num_candidates=4", "model.num_frames=2", "model.qformer.hidden_size=32",
        "model.qformer.num_queries=2", "model.qformer.num_heads=2", "model.answerer_heads=2", "model.answerer_layers=1",
        "train.max_steps=2", "train.batch_size=8", "train.ckpt_every=0", f"train.out_dir={tmp / 'qa'}"]))
    return tmp, caps, summary["checkpoint"]


@pytest.fixture(scope="module")
def client(served):
    from fastapi.testclient import TestClient

    from evl.search.app import create_app

    tmp, _, qa = served
    return TestClient(create_app(tmp / "index", qa))


def test_search_thumbnails_and_videos(client, served):
    tmp, caps, _ = served
    page = client.get("/")
    assert page.status_code == 200 and 'id="query"' in page.text
    assert client.get("/api/info").json() == {"items": 12, "kind": "exact", "segment": "None", "can_ask": True,
                                              "rebuilt": None}
    hits = client.get("/api/search", params={"q": next(iter(caps.values()))[0], "k": 5}).json()
    assert len(hits) == 5 and all(h["path"].endswith(".mp4") for h in hits)
    thumb = client.get(f"/api/thumbnail/{hits[0]['item']}")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png" and thumb.content[:4] == b"\x89PNG"
    video = client.get(f"/api/video/{hits[0]['item']}")
    assert video.status_code == 200 and video.content == (tmp / "videos" / hits[0]["path"]).read_bytes()
    part = client.get(f"/api/video/{hits[0]['item']}", headers={"Range": "bytes=0-99"})
    assert part.status_code == 206 and len(part.content) == 100
    answer = client.post("/api/ask", json={"item": hits[0]["item"], "question": "what colour is the square?"}).json()
    assert answer["answer"] and 0 < answer["score"] <= 1 and len(answer["frames"]) == 2
    schema = client.get("/openapi.json").json()
    assert {"/api/search", "/api/ask", "/api/video/{item}", "/api/thumbnail/{item}"} <= set(schema["paths"])


TRAVERSALS = ["../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
              "%252e%252e%252fetc%252fpasswd", "/etc/passwd", "%2Fetc%2Fpasswd", "..", "0/../../secret.txt",
              "0%00", "-1", "1e3", "99999999999999999999999", "0x1"]


@pytest.mark.parametrize("route", ["/api/video/", "/api/thumbnail/"])
@pytest.mark.parametrize("payload", TRAVERSALS)
def test_path_traversal_in_every_parameter_gets_a_4xx_and_never_a_file(client, route, payload):
    r = client.get(route + payload)
    assert 400 <= r.status_code < 500 and SECRET not in r.text and "root:" not in r.text


def test_traversal_in_the_query_and_in_ask_never_reads_a_file(client, served):
    r = client.get("/api/search", params={"q": "../../secret.txt", "k": 3})
    assert r.status_code == 200 and SECRET not in r.text
    for body in ({"item": "../secret.txt", "question": "x"}, {"item": -1, "question": "x"}):
        r = client.post("/api/ask", json=body)
        assert r.status_code == 422 and SECRET not in r.text


def test_a_tampered_index_row_pointing_outside_is_refused(served):
    from fastapi.testclient import TestClient

    from evl.search.app import create_app

    tmp, _, _ = served
    copy = tmp / "tampered"
    shutil.copytree(tmp / "index", copy, dirs_exist_ok=True)
    db = sqlite3.connect(copy / "meta.sqlite")
    db.execute("UPDATE videos SET path = '../secret.txt' WHERE id = (SELECT MIN(id) FROM videos)")
    db.commit()
    item = db.execute("SELECT i.id FROM items i JOIN videos v ON v.id = i.video_id WHERE v.path = '../secret.txt'").fetchone()[0]
    r = TestClient(create_app(copy)).get(f"/api/video/{item}")
    assert r.status_code == 404 and SECRET not in r.text


@pytest.mark.parametrize(("params", "status"), [
    ({"q": "", "k": 3}, 422), ({"q": "x" * 501}, 422), ({"q": "a", "k": 0}, 422), ({"q": "a", "k": 101}, 422),
    ({"q": "a", "k": "ten"}, 422), ({"q": "a", "rerank": -1}, 422), ({"k": 3}, 422), ({"q": "   "}, 400)])
def test_bad_search_parameters(client, params, status):
    assert client.get("/api/search", params=params).status_code == status


def test_oversized_and_malformed_requests(client):
    assert client.post("/api/ask", content=b"{" + b" " * 20_000 + b"}",
                       headers={"Content-Type": "application/json"}).status_code == 413
    assert client.post("/api/ask", content=b"{not json", headers={"Content-Type": "application/json"}).status_code == 422
    assert client.post("/api/ask", json={"question": "what?"}).status_code == 422
    assert client.post("/api/ask", json={"item": 1, "question": ""}).status_code == 422
    assert client.post("/api/ask", json={"item": 1, "question": "q" * 600}).status_code == 422
    assert client.post("/api/ask", json={"item": 10**9, "question": "what?"}).status_code == 404
    assert client.get("/api/thumbnail/" + "9" * 5000).status_code in (404, 414, 422)


def test_without_a_qa_model_asking_says_how_to_get_one(served):
    from fastapi.testclient import TestClient

    from evl.search.app import create_app

    tmp, _, _ = served
    r = TestClient(create_app(tmp / "index")).post("/api/ask", json={"item": 1, "question": "what?"})
    assert r.status_code == 409 and "--ask-model" in r.json()["detail"]


def test_the_server_binds_to_loopback_unless_told(served, monkeypatch):
    import uvicorn

    tmp, _, _ = served
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: seen.update(host=host, port=port))
    assert CliRunner().invoke(app, ["serve", str(tmp / "index")]).exit_code == 0
    assert seen == {"host": "127.0.0.1", "port": 8000}
    result = CliRunner().invoke(app, ["serve", str(tmp / "index"), "--host", "0.0.0.0", "--port", "8123"])
    assert result.exit_code == 0 and seen == {"host": "0.0.0.0", "port": 8123} and "warning" in result.output
    assert "--port 0" in CliRunner().invoke(app, ["serve", str(tmp / "index"), "--port", "0"]).output


# ------------------------------------------------------------------------------------------ real browser


def _browser():
    """Headless Chromium through Selenium; outside CI a skip that says how to get them, in CI a failure."""
    webdriver = needs.module("selenium.webdriver", "pip install selenium (in the dev extra)")
    chromium = needs.program("chromium", "chromium-browser", install="apt-get install chromium (.ci/run does)")
    driver = needs.program("chromedriver", install="apt-get install chromium-driver (.ci/run does)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,1500",
                "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_page_in_a_real_browser_search_open_ask(served, client):
    import socket

    import uvicorn
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser()
    tmp, caps, _ = served
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(client.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(100):
            if server.started:
                break
            time.sleep(0.05)
        wait = WebDriverWait(browser, 30)
        browser.get(f"http://127.0.0.1:{port}/")
        wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "indexed"))
        box = browser.find_element(By.ID, "query")
        box.send_keys(next(iter(caps.values()))[0])
        browser.find_element(By.ID, "search-button").click()
        first = wait.until(ec.presence_of_element_located((By.ID, "hit-0")))
        wait.until(lambda b: b.execute_script(
            "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"))
        assert len(browser.find_elements(By.CSS_SELECTOR, "#results .hit")) == 12
        first.click()
        wait.until(ec.visibility_of_element_located((By.ID, "player")))
        wait.until(lambda b: b.execute_script("return document.getElementById('player').readyState >= 1"))
        browser.find_element(By.ID, "question").send_keys("what colour is the square?")
        browser.find_element(By.ID, "ask-button").click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "answer"), "frames used"))
        assert browser.find_element(By.ID, "answer").text.startswith("answer: ")
        ARTIFACTS.mkdir(exist_ok=True)
        assert browser.save_screenshot(str(ARTIFACTS / "serve_page.png"))
    finally:
        browser.quit()
        server.should_exit = True
        thread.join(timeout=10)
