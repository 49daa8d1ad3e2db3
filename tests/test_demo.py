"""`dlm-demo`: the settings it builds, the frames it streams, and the page driven in a real headless browser."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dlm_generation.demo import DEFAULT_GUIDE, DEFAULT_MODEL, DemoSession, Settings, decode_stream, load_session

SCREENSHOTS = os.environ.get("DLM_DEMO_SCREENSHOTS")  # also keep the browser screenshots there (README pictures)
QUESTIONS = [
    "Question: Start with 63. Subtract 39. Add 46. What is the result?",
    "Question: Start with 8. Add 75. Subtract 19. Add 52. Subtract 90. What is the result?",
]


@pytest.fixture(scope="module")
def session() -> DemoSession:
    return load_session(str(DEFAULT_MODEL), str(DEFAULT_GUIDE), "cpu", None)


def direct_answer(session: DemoSession, prompt: str, **overrides) -> str:
    inputs = session.encode(prompt)
    extra = {"assistant_model": session.guide} if overrides.get("guidance") else {}
    out = session.model.diffusion_generate(**inputs, return_dict_in_generate=True, **overrides, **extra)
    return session.summary({"output": out, "label": "", "seconds": 1.0}, inputs["input_ids"].shape[1])["text"]


def test_settings_become_config_fields():
    assert Settings(256, "32", 0, 0.0).overrides("low_confidence", False) == {
        "max_new_tokens": 256, "block_length": 32, "steps": None, "eos_early_stop": True,
        "cache_implementation": None, "threshold": None}
    settings = Settings(128, "whole canvas", 64, 0.9, cache="dual")
    fields = settings.overrides("entropy", False)
    assert fields["block_length"] is None and fields["steps"] == 64 and fields["cache_implementation"] == "dual"
    assert fields["threshold"] == 0.9 and fields["alg"] == "maskgit_plus" and "maskgit_plus" in settings.notes[0]
    guided = Settings(256, "32", 0, 0.9, guidance=True)
    assert guided.overrides("entropy", True)["guidance"] == {"strategy": "deterministic"}
    assert "threshold is unused" in guided.notes[0] and guided.overrides("entropy", True)["threshold"] is None
    with pytest.raises(ValueError, match="start the demo with --assistant-model"):
        Settings(guidance=True).overrides("entropy", False)


@pytest.mark.slow
@pytest.mark.parametrize("fields", [dict(), dict(threshold=0.9, cache="dual"), dict(guidance=True),
                                    dict(cache="d2cache", block_length="whole canvas", max_new_tokens=64)])
def test_the_stream_ends_on_the_direct_answer(session, fields):
    settings = Settings(**{"max_new_tokens": 256, **fields})
    updates = list(decode_stream(session, QUESTIONS[0], settings, compare=True, replay_ms=0))
    main_html, vanilla_html, stats, answer = updates[-1]
    assert answer == direct_answer(session, QUESTIONS[0], **settings.overrides(session.model_alg, True))
    assert 'data-state="done"' in main_html and 'data-masked="0"' in main_html
    assert 'data-state="done"' in vanilla_html and "| vanilla |" in stats and "| this configuration |" in stats
    steps = [int(u[0].split('data-step="')[1].split('"')[0]) for u in updates]
    assert steps == sorted(steps) and steps[-1] >= 1  # the canvas only moves forward
    assert any('dlm-mask' in u[1] for u in updates[:-1])  # the vanilla canvas was shown while still masked


def test_bad_requests_say_what_to_change(session):
    with pytest.raises(ValueError, match="The prompt is empty"):
        list(decode_stream(session, "  ", Settings(), compare=False, replay_ms=0))
    with pytest.raises(ValueError, match="block_length"):
        list(decode_stream(session, QUESTIONS[0], Settings(max_new_tokens=80, block_length="64"), compare=False,
                           replay_ms=0))


@pytest.mark.slow
def test_a_failed_request_leaves_the_next_one_correct(session, monkeypatch):
    original = session.model.diffusion_generate

    def failing(*args, **kwargs):
        raise RuntimeError("the decoding thread broke")

    monkeypatch.setattr(session.model, "diffusion_generate", failing)
    with pytest.raises(RuntimeError, match="decoding thread broke"):
        list(decode_stream(session, QUESTIONS[0], Settings(), compare=False, replay_ms=0))
    monkeypatch.setattr(session.model, "diffusion_generate", original)
    answer = list(decode_stream(session, QUESTIONS[0], Settings(), compare=False, replay_ms=0))[-1][3]
    assert answer == direct_answer(session, QUESTIONS[0], **Settings().overrides(session.model_alg, True))


# ---------------------------------------------------------------------------------------------------- the browser
def find_browser() -> tuple[str, str] | None:
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                   None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "dlm_generation.demo", "--port", str(port), "--threads", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                process.kill()
                pytest.fail(f"dlm-demo did not start:\n{process.stdout.read()}")
            time.sleep(0.5)
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    found = find_browser()
    if found is None:
        pytest.skip("no headless Chromium here (install Debian's chromium and chromium-driver; .ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1500",
                 "--disable-gpu"):
        options.add_argument(flag)
    options.binary_location = found[0]
    driver = webdriver.Chrome(service=Service(found[1]), options=options)
    yield driver
    driver.quit()


def screenshot(driver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(SCREENSHOTS) / name)
    return path


def set_number(driver, elem_id: str, value) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    field = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=number]")
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(str(value), Keys.TAB)


def choose(driver, elem_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    field = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input")
    field.click()
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(value, Keys.ENTER)
    driver.find_element(By.CSS_SELECTOR, "h2").click()  # close the list


def ask(driver, question: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.CSS_SELECTOR, "#prompt textarea")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(question)
    driver.find_element(By.CSS_SELECTOR, "#generate").click()


def canvases(driver) -> dict[str, dict[str, str]]:
    from selenium.webdriver.common.by import By

    return {c.get_attribute("data-title"): {k: c.get_attribute(f"data-{k}") for k in ("state", "step", "masked")}
            for c in driver.find_elements(By.CSS_SELECTOR, ".dlm-canvas")}


def wait_for_answer(driver, timeout: float = 120) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(
        lambda d: d.find_element(By.CSS_SELECTOR, "#answer textarea").get_attribute("value")
        and all(c["state"] == "done" for c in canvases(d).values()))
    return driver.find_element(By.CSS_SELECTOR, "#answer textarea").get_attribute("value")


def open_page(driver, url: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#prompt textarea"))


@pytest.mark.slow
def test_a_person_asks_a_question_in_the_browser(server, browser, session, tmp_path):
    from selenium.webdriver.common.by import By

    open_page(browser, server)
    choose(browser, "block-length", "32")  # the page starts from the shipped generation_config; be explicit
    set_number(browser, "threshold", 0.9)
    choose(browser, "cache", "dual")
    set_number(browser, "replay-ms", 40)
    ask(browser, QUESTIONS[1])
    # While decoding: the vanilla canvas is still partly masked, grey cells on the page.
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 60).until(lambda d: any(c["state"] == "decoding" and int(c["masked"]) > 0
                                                   for c in canvases(d).values()))
    assert browser.find_elements(By.CSS_SELECTOR, ".dlm-mask")
    screenshot(browser, tmp_path, "demo_decoding.png")
    answer = wait_for_answer(browser)
    settings = Settings(256, "32", 0, 0.9, cache="dual")
    assert answer == direct_answer(session, QUESTIONS[1], **settings.overrides(session.model_alg, True))
    shown = canvases(browser)
    assert set(shown) == {"this configuration", "vanilla"}
    assert all(c["masked"] == "0" for c in shown.values())
    assert int(shown["this configuration"]["step"]) < int(shown["vanilla"]["step"])  # fewer forwards
    stats = browser.find_element(By.CSS_SELECTOR, "#stats").text
    assert "tokens / forward" in stats and "vanilla" in stats and '"cache_implementation": "dual"' in stats
    assert f"this configuration {shown['this configuration']['step']} " in stats  # NFE column = steps shown
    screenshot(browser, tmp_path, "demo_done.png")


@pytest.mark.slow
def test_concurrent_users_see_only_their_own_canvas(server, browser, session):
    from selenium.webdriver.common.by import By

    first = browser.current_window_handle
    for index, question in enumerate(QUESTIONS):
        if index:
            browser.switch_to.new_window("tab")
        open_page(browser, server)
        browser.find_element(By.CSS_SELECTOR, "#compare input").click()  # one canvas each
        choose(browser, "block-length", "32")  # Settings(): one token per step, block 32, no cache
        set_number(browser, "threshold", 0)
        choose(browser, "cache", "none")
        # The first replay is slow (the slider's maximum) so it surely outlasts the second page load on a loaded
        # machine; the second is quick so the test does not wait on it.
        set_number(browser, "replay-ms", 50 if index else 500)
        ask(browser, question)
    second = browser.current_window_handle
    browser.switch_to.window(first)  # the first request was still decoding when the second one started
    assert canvases(browser)["this configuration"]["state"] == "decoding"
    browser.switch_to.window(second)
    answers = {second: wait_for_answer(browser)}
    browser.switch_to.window(first)
    answers[first] = wait_for_answer(browser)
    expected = [direct_answer(session, q, **Settings().overrides(session.model_alg, True)) for q in QUESTIONS]
    assert [answers[first], answers[second]] == expected
    browser.switch_to.window(second)
    browser.close()
    browser.switch_to.window(first)


@pytest.mark.slow
def test_the_demo_says_what_is_wrong_with_a_setting(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    open_page(browser, server)
    set_number(browser, "max-new-tokens", 80)
    choose(browser, "block-length", "64")
    ask(browser, QUESTIONS[0])
    WebDriverWait(browser, 60).until(lambda d: "block_length" in d.find_element(By.TAG_NAME, "body").text)
    assert "max_new_tokens" in browser.find_element(By.TAG_NAME, "body").text


@pytest.mark.slow
def test_the_command_refuses_a_missing_model(tmp_path, capsys):
    from dlm_generation.demo import main

    with pytest.raises(SystemExit) as caught:
        main([str(tmp_path / "nowhere")])
    stderr = capsys.readouterr().err
    assert caught.value.code == 2 and "cannot load" in stderr and "nowhere" in stderr


@pytest.mark.slow
def test_the_page_shows_no_path_of_this_machine(session):
    """The page names the model by its folder's name (the screenshots go into the README), never by the absolute
    path it was loaded from."""
    import json

    from dlm_generation.demo import build_demo, display_name

    assert session.name == "tiny-llada-chain-arith"
    assert display_name("someone/some-model") == "someone/some-model"  # a Hub id as given
    page = json.dumps(build_demo(session).config, default=str)
    assert "tiny-llada-chain-arith" in page
    assert str(DEFAULT_MODEL.parent) not in page and str(Path.home()) not in page


@pytest.mark.slow
def test_sessions_share_no_decoding_state(session):
    """Two interleaved streams on one session: each ends on its own answer (no state lives on the session)."""
    settings = Settings(max_new_tokens=96)
    streams = [decode_stream(session, q, settings, compare=False, replay_ms=0) for q in QUESTIONS]
    finals = [None, None]
    live = [True, True]
    while any(live):
        for index, stream in enumerate(streams):
            if live[index]:
                try:
                    finals[index] = next(stream)
                except StopIteration:
                    live[index] = False
    expected = [direct_answer(session, q, **settings.overrides(session.model_alg, True)) for q in QUESTIONS]
    assert [f[3] for f in finals] == expected
