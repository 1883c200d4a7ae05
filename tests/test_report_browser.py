"""The report in headless Chromium: the plots load, the sample browser works, the console stays clean.

Chromium and its driver are Debian's packages (/usr/bin/chromium, /usr/bin/chromedriver); the fixture installs
them with apt-get when missing and skips, saying why, when that fails. Selenium is pointed at that driver, so it
never downloads one.
"""

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from incentive.report import write_report

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
INSTALL_TIMEOUT_S = 600
SCREENSHOT_COPY = Path(tempfile.gettempdir()) / "incentive-report-screenshot.png"


def _apt(*args: str, deadline: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    timeout = max(1.0, deadline - time.monotonic())
    return subprocess.run(["apt-get", *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def chromium() -> None:
    """Chromium and chromedriver from Debian's packages, installed once if missing (as root)."""
    pytest.importorskip("selenium")
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return
    if shutil.which("apt-get") is None:
        pytest.skip("chromium is missing and there is no apt-get to install it")
    deadline = time.monotonic() + INSTALL_TIMEOUT_S
    try:
        install = _apt("install", "-y", "-q", "chromium", "chromium-driver", deadline=deadline)
        if install.returncode != 0:  # package lists missing or stale
            _apt("update", "-q", deadline=deadline)
            install = _apt("install", "-y", "-q", "chromium", "chromium-driver", deadline=deadline)
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"could not install chromium and chromium-driver: {err}")
    if install.returncode != 0 or not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(f"could not install chromium and chromium-driver: {install.stderr.strip()[-500:]}")


@pytest.fixture
def browser(chromium):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def _samples(step: int) -> list[dict]:
    return [
        {
            "group": step,
            "prompt": f"State the final answer: {step} + {i} =",
            "reference": str(step + i),
            "completion": f"<think>\n{step} + {i} = {step + i}\n</think>\n<answer>\n{step + i}\n</answer>",
            "reasoning": f"{step} + {i} = {step + i}",
            "reward": 1.0 + i / 4,
            "components": {"format": 1.0, "nover_reasoning": i / 4},
            "reasons": [] if i else ["<b>nover_reasoning</b>: format invalid"],
            "details": {"nover_reasoning": {"perplexity": 3.0 - i / 2, "rank": 3 - i, "group_size": 3}},
        }
        for i in range(3)
    ]


def make_run(path: Path) -> Path:
    """A small run folder: 3 SFT steps, 4 RL steps (a failure at step 2, samples on all but step 3), evals."""
    path.mkdir()
    records = [{"stage": "sft", "step": s, "loss": 2.0 / s, "grad_norm": 1.0 / s} for s in (1, 2, 3)]
    for step in (1, 2, 3, 4):
        record = {
            "stage": "rl",
            "step": step,
            "reward/mean": 0.5 + step / 10,
            "reward/min": 0.2,
            "reward/max": 1.5,
            "reward/format/mean": 1.0,
            "reward/nover_reasoning/mean": step / 10,
            "length/mean": 30.0 - step,
            "length/reasoning/mean": 12.0 - step,
            "train/kl": 0.001 * step,
            "train/clip_frac": 0.01,
            "throughput/gen_tokens_per_s": 100.0 + step,
            "time/generate_s": 5.0,
            "time/reward_s": 1.0,
            "time/train_s": 3.0,
            "failed": int(step == 2),
            "failures": {"nover_reasoning: scorer error": 1} if step == 2 else {},
            "samples": [] if step == 3 else _samples(step),
        }
        records.append(record)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    evals = {
        "base": {"accuracy": 0.25, "format_rate": 0.5},
        "rl-step2": {"accuracy": 0.4},
        "rl": {"accuracy": 0.5},
    }
    (path / "evals.json").write_text(json.dumps(evals))
    return path


def visible_rows(driver) -> tuple[str, int]:
    """The step shown by the sample browser and the number of its table rows."""
    pages = [p for p in driver.find_elements("css selector", ".browser .step") if p.is_displayed()]
    assert len(pages) == 1
    return pages[0].get_attribute("data-step"), len(pages[0].find_elements("css selector", "tr.sample"))


def test_report_renders_in_chromium(browser, tmp_path, capsys):
    from selenium.webdriver.support.ui import Select

    html = write_report([make_run(tmp_path / "browser-run")], tmp_path / "report")
    pngs = sorted(p.name for p in html.parent.glob("*.png"))
    browser.get(html.resolve().as_uri())

    images = browser.find_elements("css selector", "figure img")
    assert len(images) == len(pngs) >= 6
    widths = [
        browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i) for i in images
    ]
    assert all(w and w > 300 for w in widths), widths

    assert visible_rows(browser) == ("4", 3)  # the last step with samples shows first
    browser.find_element("css selector", ".browser button[data-move='-1']").click()
    assert visible_rows(browser) == ("2", 3)  # step 3 logged no samples: not in the selector
    Select(browser.find_element("css selector", ".browser select")).select_by_value("1")
    assert visible_rows(browser) == ("1", 3)
    cells = browser.find_elements("css selector", ".step[data-step='1'] tr.sample td")
    assert "<b>nover_reasoning</b>: format invalid" in [c.text for c in cells]  # shown as text, not markup
    assert any("perplexity 3" in c.text and "rank 3" in c.text for c in cells)

    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []

    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1400, min(height, 12000))
    browser.execute_script("window.scrollTo(0, 0)")
    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot))
    shutil.copy(shot, SCREENSHOT_COPY)
    with capsys.disabled():  # shown even when the test passes
        print(f"\n[report screenshot] {shot} (copy: {SCREENSHOT_COPY})")
