"""The review page (issue 16): `fairtune review` serves an audit's image grids and judged mixes; a real
browser (headless Chromium, driven by selenium) clicks the flag buttons and the rows land in the SQLite
file; off loopback every request needs the token."""

from __future__ import annotations

import json
import os
import shutil
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
        module="fairtune.models.SmallCNN", init_args=dict(JUDGE_ARGS),
        weights=str(color_judge_dir / "color_cnn.safetensors"),
    )  # fmt: skip
    audit(
        model="colored-digits-16", prompts=prompts, out=root / "audit",
        judges=JudgeConfig(kind="classifier", attribute="color", classes=["red", "blue"], classifier=judge,
                           reference=None),
        target=TargetConfig(attributes=["color"]), generation=GenerationConfig(n_per_prompt=N, steps=5),
        n_boot=50, progress=False,
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
    from fairtune.eval._review import serve_review

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

    from fairtune.eval._review import serve_review

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
