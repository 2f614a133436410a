"""The review page (issue 16): `fairtune review` serves an audit's image grids and judged mixes; a real
browser (headless Chromium, driven by selenium) clicks the flag buttons and the rows land in the SQLite
file; off loopback every request needs the token."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from test_audit_callback import JUDGE_ARGS, color_judge_dir  # noqa: F401 - a fixture

from fairtune.data import content_hash

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
N = 6


@pytest.fixture(scope="module")
def audit_dir(color_judge_dir, tmp_path_factory):  # noqa: F811
    """`fairtune audit` of the shipped base model on two prompts (6 images each, 5 DDIM steps)."""
    from fairtune.data import TargetConfig
    from fairtune.eval import GenerationConfig, JudgeConfig, audit
    from fairtune.models import ClassifierConfig

    root = tmp_path_factory.mktemp("review")
    prompts = root / "prompts.yaml"
    prompts.write_text(
        yaml.safe_dump({"digit 1": "a handwritten digit 1", "digit 8": "a handwritten digit 8"})
    )
    judge = ClassifierConfig(
        module="fairtune.colored_digits.SmallCNN", init_args=dict(JUDGE_ARGS),
        weights=str(color_judge_dir / "color_cnn.safetensors"),
    )  # fmt: skip
    audit(
        model="colored-digits-16", prompts=prompts, out=root / "audit",
        judges=JudgeConfig(kind="classifier", attribute="color", classes=["red", "blue"], classifier=judge,
                           reference=None),
        target=TargetConfig(attributes=["color"]), generation=GenerationConfig(n_per_prompt=N, steps=5),
        progress=False,
    )  # fmt: skip
    return root / "audit"


def test_the_audit_keeps_every_image_for_review(audit_dir):
    metrics = json.loads((audit_dir / "metrics.json").read_text())
    files = sorted(p.relative_to(audit_dir).as_posix() for p in (audit_dir / "images").rglob("*.png"))
    assert files == [f"images/0/{b:03d}/{i:04d}.png" for b in range(2) for i in range(N)]
    assert [e["prompt"] for e in metrics["prompts"]] == ["a handwritten digit 1", "a handwritten digit 8"]


def _get(url: str, headers: dict | None = None, data: bytes | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_off_loopback_every_request_needs_the_token(audit_dir, tmp_path, capsys):
    from fairtune.cli import serve_review

    server = serve_review(audit_dir, str(tmp_path / "f.sqlite"), host="0.0.0.0", port=0, background=True)
    try:
        assert "every request needs the token" in capsys.readouterr().err
        port = server.server_address[1]
        base = f"http://127.0.0.1:{port}"
        assert _get(base + "/")[0] == 401
        assert _get(base + "/img/0/0")[0] == 401
        body = json.dumps({"key": "prompts/digit 1", "scope": "prompt", "reviewer": "x"}).encode()
        json_type = {"Content-Type": "application/json"}
        assert _get(base + "/api/flag", json_type, body)[0] == 401
        status, page = _get(f"{base}/?token={server.token}")
        assert status == 200 and b"a handwritten digit 8" in page
        ok = {**json_type, "X-Review-Token": server.token}
        assert _get(base + "/img/1/5", ok)[1][:4] == b"\x89PNG"
        assert _get(base + "/api/flag", {"X-Review-Token": server.token}, body)[0] == 415  # not JSON
        bad = json.dumps({"key": "prompts/digit 1", "scope": "prompt", "reviewer": "x", "direction": "green"})
        status, err = _get(base + "/api/flag", ok, bad.encode())
        assert status == 400 and b"direction must be one of" in err
        assert _get(base + "/api/flag", ok, body)[0] == 200
    finally:
        server.shutdown()
        server.server_close()
    assert [r[0] for r in sqlite3.connect(tmp_path / "f.sqlite").execute("SELECT scope FROM flags")] == [
        "prompt"
    ]


@pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Chromium and chromedriver (Debian: apt-get install -y chromium chromium-driver)",
)
def test_a_reviewer_flags_an_image_and_a_prompt_in_a_real_browser(audit_dir, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from fairtune.cli import serve_review

    db = tmp_path / "flags.sqlite"
    server = serve_review(audit_dir, str(db), port=0, reviewer="default-reviewer", background=True)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,900"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        assert server.token is None  # loopback: no login
        driver.get(server.url)
        wait = WebDriverWait(driver, 10)
        sections = driver.find_elements(By.CSS_SELECTOR, "section.prompt")
        assert [s.find_element(By.TAG_NAME, "h2").text for s in sections] == [
            "a handwritten digit 1", "a handwritten digit 8",
        ]  # fmt: skip
        # every image of the grid loaded from the audit folder
        assert (
            driver.execute_script(
                "return [...document.images].filter(i => i.complete && i.naturalWidth === 16).length"
            )
            == 2 * N
        )
        reviewer = driver.find_element(By.ID, "reviewer")
        reviewer.clear()
        reviewer.send_keys("ana")
        first = sections[0]
        first.find_element(By.CSS_SELECTOR, ".note").send_keys("mostly red")
        first.find_element(By.CSS_SELECTOR, ".flag-image[data-index='3']").click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "flagged image 3"))
        assert "flagged" in first.find_element(By.CSS_SELECTOR, "figure[data-index='3']").get_attribute(
            "class"
        )
        second = sections[1]
        second.find_element(By.CSS_SELECTOR, ".direction option[value='blue']").click()
        second.find_element(By.CSS_SELECTOR, ".flag-prompt").click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "flagged prompt"))
        driver.find_element(By.ID, "propose-prompt").send_keys("a drawing of the number 8")
        driver.find_element(By.ID, "propose-concept").send_keys("digit 8")
        driver.find_element(By.ID, "propose").click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "proposed"))
        # a reload (another reviewer, later) shows what is already flagged
        driver.refresh()
        sections = driver.find_elements(By.CSS_SELECTOR, "section.prompt")
        figure = sections[0].find_element(By.CSS_SELECTOR, "figure[data-index='3']")
        assert "flagged" in figure.get_attribute("class")
        assert "flagged" not in sections[0].get_attribute("class")
        assert "flagged" in sections[1].get_attribute("class")
        assert sections[1].find_element(By.CSS_SELECTOR, ".count").text == "flagged 1x"
        driver.save_screenshot(str(os.environ.get("FAIRTUNE_REVIEW_SCREENSHOT", tmp_path / "review.png")))
    finally:
        driver.quit()
        server.shutdown()
        server.server_close()

    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    rows = [dict(r) for r in con.execute("SELECT * FROM flags ORDER BY id")]
    assert len(rows) == 2
    img, prm = rows
    settings = json.loads(img["settings"])
    assert (img["scope"], img["prompt"], img["concept"], img["image_index"], img["seed"]) == (
        "image", "a handwritten digit 1", "digit 1", 3, settings["seed"] + 3,
    )  # fmt: skip
    assert (img["reviewer"], img["note"], img["attribute"]) == ("ana", "mostly red", "color")
    assert img["audit_run"] == str(Path(audit_dir).resolve()) and settings["steps"] == 5
    from fairtune.models import resolve_shipped

    shipped = resolve_shipped("colored-digits-16")
    assert shipped.is_dir() and img["model"] == "colored-digits-16"
    assert img["model_hash"] == content_hash(shipped)
    assert (prm["scope"], prm["prompt"], prm["direction"], prm["image_index"]) == (
        "prompt", "a handwritten digit 8", "blue", None,
    )  # fmt: skip
    (prop,) = con.execute("SELECT prompt, concept, reviewer FROM proposals").fetchall()
    assert tuple(prop) == ("a drawing of the number 8", "digit 8", "ana")


# ----------------------------------------------------------------------------- every input (issue 26)
@pytest.fixture
def small_review(tmp_path):
    """A review server on loopback over a small audit folder written by hand (two prompts, three
    images each: the files `fairtune audit` writes, without running a model), and its flag file."""
    from PIL import Image

    from fairtune.cli import serve_review

    audit = tmp_path / "audit"
    for b in range(2):
        (audit / "images" / "0" / f"{b:03d}").mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (4, 4), (255, 0, 0)).save(audit / "images" / "0" / f"{b:03d}" / f"{i:04d}.png")
    prompts = [
        {"key": f"prompts/digit {d}", "prompt": f"a handwritten digit {d}", "concept": f"digit {d}",
         "role": "seen"}
        for d in (1, 8)
    ]  # fmt: skip
    (audit / "metrics.json").write_text(
        json.dumps({
            "methods": {"base": {"per_concept": {}, "adapter": None}}, "prompts": prompts,
            "generation": {"n_per_prompt": 3, "steps": 5, "guidance_scale": 1.0, "seed": 0},
            "classes": ["red", "blue"], "attribute": "color", "backbone": {},
        })
    )  # fmt: skip
    db = tmp_path / "flags.sqlite"
    server = serve_review(audit, str(db), port=0, reviewer="r", background=True)
    try:
        yield server, db
    finally:
        server.shutdown()
        server.server_close()


def _raw(
    port: int, head: str, body: bytes = b"", *, close: bool = True, encoding: str = "utf-8"
) -> tuple[int, bytes]:
    """Send one request as written (``head``: request line and headers, in ``encoding``) and read the
    whole reply; the status is 0 when the server closed without answering. With ``close=False`` the
    client keeps its side open after the body (a server reading to the end of the stream would wait
    for ever)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(head.replace("\n", "\r\n").encode(encoding) + b"\r\n\r\n" + body)
        if close:
            s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(1 << 16):
            reply += chunk
    return (int(reply.split(b" ", 2)[1]) if reply else 0), reply


def _flag_rows(db) -> list[tuple]:
    return sqlite3.connect(db).execute("SELECT scope, image_index FROM flags ORDER BY id").fetchall()


def test_a_body_without_a_sane_length_is_refused_unread(small_review):
    server, db = small_review
    port = server.server_address[1]
    body = json.dumps({"key": "prompts/digit 1", "scope": "prompt", "reviewer": "x"}).encode()
    head = f"POST /api/flag HTTP/1.1\nHost: 127.0.0.1:{port}\nContent-Type: application/json"
    # a negative length used to read the stream to its end: the client here keeps it open
    for bad in ("-1", "-100", "+5", " 1_0", "١٢", "12abc", "99999999999999999999999"):
        status, reply = _raw(port, f"{head}\nContent-Length: {bad}", body, close=False)
        assert status in (400, 413), (bad, reply)
    assert _raw(port, head, body, close=False)[0] == 411  # no length at all
    assert _raw(port, f"{head}\nContent-Length: 5\nContent-Length: 7", body, close=False)[0] == 400
    status, reply = _raw(port, f"{head}\nContent-Length: {1 << 20}", body, close=False)  # the ceiling
    assert status == 413 and b"too large" in reply
    assert _flag_rows(db) == []
    assert _raw(port, f"{head}\nContent-Length: {len(body)}", body)[0] == 200
    assert _flag_rows(db) == [("prompt", None)]


def test_on_loopback_only_local_host_names_are_answered(small_review):
    server, db = small_review
    port = server.server_address[1]
    for host in ("localhost", f"localhost:{port}", f"127.0.0.1:{port}", "127.0.0.1", f"[::1]:{port}",
                 "[::1]", f"LocalHost:{port}"):  # fmt: skip
        status, reply = _raw(port, f"GET / HTTP/1.1\nHost: {host}")
        assert status == 200 and b"a handwritten digit 8" in reply, host
    # DNS rebinding: a page of another site whose name now points at 127.0.0.1 sends its own name
    for host in ("evil.example", f"evil.example:{port}", f"localhost.evil.example:{port}", "127.0.0.1.nip.io",
                 f"localhost:{port}@evil.example", "localhost:", "localhost:abc", ""):  # fmt: skip
        assert _raw(port, f"GET / HTTP/1.1\nHost: {host}")[0] in (403, 421), host
        assert _raw(port, f"GET /img/0/0 HTTP/1.1\nHost: {host}")[0] in (403, 421), host
    assert _raw(port, "GET / HTTP/1.0")[0] in (403, 421)  # no Host header at all
    assert _raw(port, f"GET / HTTP/1.1\nHost: localhost\nHost: evil.example:{port}")[0] in (403, 421)
    body = json.dumps({"key": "prompts/digit 1", "scope": "prompt", "reviewer": "x"}).encode()
    post = f"POST /api/flag HTTP/1.1\nContent-Type: application/json\nContent-Length: {len(body)}"
    assert _raw(port, f"{post}\nHost: evil.example:{port}", body)[0] in (403, 421)
    assert _flag_rows(db) == []
    assert _raw(port, f"{post}\nHost: localhost:{port}", body)[0] == 200
    assert _flag_rows(db) == [("prompt", None)]
    assert _get(server.url)[0] == 200  # the URL the command prints (a browser opens it)


def test_every_malformed_path_gets_a_4xx(small_review):
    server, _ = small_review
    port = server.server_address[1]
    assert _raw(port, f"GET /img/1/2 HTTP/1.1\nHost: localhost:{port}")[1].split(b"\r\n\r\n", 1)[1][:4] == (
        b"\x89PNG"
    )
    paths = [
        "/img/\u0661/\u0660",  # Arabic-Indic digits: int() reads them as 1 and 0
        "/img/\u00b2/0", "/img/0/\u00b9",  # superscripts: isdigit() but not int()
        "/img/\uff11/0",  # a fullwidth 1
        "/img/-1/0", "/img/+1/0", "/img/ 1/0", "/img/1/2/3", "/img/1", "/img/", "/img//0", "/img/1/0x1",
        "/img/0/" + "9" * 5000,  # past int()'s limit on digits
        "/img/99/0", "/img/0/99",  # no such image
        "//[x/", "//[::1", "http://[::1/", "*", "/%ff%fe", "/../../etc/passwd", "/img/../metrics.json",
        "/?token=%ff&&==", "/api/flags?" + "a=1&" * 2000, "/nope",
    ]  # fmt: skip
    # the request line is read as Latin-1: a raw byte 0xb2 is a superscript 2, other scripts arrive as UTF-8
    sent = [(p, "latin-1") for p in paths if p.isascii() or max(p) <= "\xff"] + [(p, "utf-8") for p in paths]
    for path, encoding in sent:
        status, reply = _raw(port, f"GET {path} HTTP/1.1\nHost: localhost:{port}", encoding=encoding)
        ok = (400 <= status < 500) or (path.startswith(("/?", "/api/flags")) and status == 200)
        assert ok, (path, encoding, reply)
    body = json.dumps({"key": "prompts/digit 1", "scope": "prompt", "reviewer": "x"}).encode()
    for path in ("//[x/", "/api/\u0661", "/api/flag/", "*"):
        head = f"POST {path} HTTP/1.1\nHost: localhost\nContent-Type: application/json"
        status, reply = _raw(port, f"{head}\nContent-Length: {len(body)}", body)
        assert 400 <= status < 500, (path, reply)


def test_an_image_index_must_be_a_json_integer(small_review):
    server, db = small_review
    port = server.server_address[1]

    def flag(**fields) -> tuple[int, bytes]:
        body = json.dumps({"key": "prompts/digit 1", "scope": "image", "reviewer": "x", **fields}).encode()
        head = "POST /api/flag HTTP/1.1\nHost: localhost\nContent-Type: application/json"
        return _raw(port, f"{head}\nContent-Length: {len(body)}", body)

    for index in (True, False, 1.0, "1", None, [1], {"i": 1}, -1, 3, 10**400):
        status, reply = flag(index=index)
        assert status == 400 and b"index must be an integer" in reply, (index, reply)
    for bad in ('{"key": "prompts/digit 1", "scope": "image", "reviewer": "x", "index": 1e999}',
                "[" * 60_000, '{"a": ' * 10_000, b"\xff\xfe{}", "[1]", "null"):  # fmt: skip
        body = bad if isinstance(bad, bytes) else bad.encode()
        head = "POST /api/flag HTTP/1.1\nHost: localhost\nContent-Type: application/json"
        status, reply = _raw(port, f"{head}\nContent-Length: {len(body)}", body)
        assert status in (400, 413), (bad[:20], reply)
    assert _flag_rows(db) == []
    assert flag(index=1)[0] == 200 and flag(index=0)[0] == 200
    assert _flag_rows(db) == [("image", 1), ("image", 0)]
