"""The playground page (GET /) in real headless Chromium against the server on loopback: greedy text equal to the
API's, streamed in steps, Stop ending the generation on the server, errors shown, nothing run from model text,
no request leaving the server's origin, a narrow screen and a dark scheme."""
import os
import shutil

import numpy as np
import pytest

import serve

CHROMIUM, DRIVER = shutil.which("chromium") or "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser(patience):
    """Headless Chromium through chromedriver. Missing, the tests fail (CI installs them): never skipped."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is missing: pip install -r requirements-dev.txt")
    if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
        pytest.fail("Chromium is missing: apt-get install -y chromium chromium-driver (.ci/run does this)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1100,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_script_timeout(patience)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(cfg, layered):
    server = serve.serve(layered, cfg, "127.0.0.1", 0, slots=4, model_name="tiny")
    server.RequestHandlerClass.log_message = lambda *a: None
    yield server
    server.close()


def origin(server):
    return f"http://127.0.0.1:{server.server_address[1]}"


def open_page(browser, server, wait_until):
    browser.get(origin(server) + "/")
    wait_until(lambda: "tiny" in browser.find_element("id", "model").text, "the page to list the model")
    # Record when token spans appear, to see the completion arrive in pieces.
    browser.execute_script("""
        window.arrivals = [];
        new MutationObserver(() => window.arrivals.push(document.querySelectorAll('#output .token').length))
            .observe(document.getElementById('output'), {childList: true});""")


def fill(browser, **fields):
    for name, value in fields.items():
        box = browser.find_element("id", name)
        if box.get_attribute("type") == "checkbox":
            if box.is_selected() != bool(value):
                box.click()
            continue
        if any(ord(c) > 0xFFFF for c in str(value)):  # chromedriver types only UTF-16's first plane
            browser.execute_script("arguments[0].value = arguments[1]", box, str(value))  # as a paste would
            continue
        box.clear()
        box.send_keys(str(value))


def status(browser):
    return browser.find_element("id", "status").text


def run(browser, wait_until, **fields):
    fill(browser, **fields)
    browser.find_element("id", "generate").click()
    wait_until(lambda: status(browser).startswith(("done", "error")), "the page to say done or error")
    return status(browser)


def test_greedy_text_equals_the_apis_and_streams_in(browser, server, post, wait_until, tmp_path):
    open_page(browser, server, wait_until)
    prompt = "Once upon a time"
    got = run(browser, wait_until, prompt=prompt, temperature=0, max_tokens=40, seed=1, stop_strings="")
    want = post(server, {"prompt": prompt, "max_tokens": 40, "temperature": 0})[1]["choices"][0]
    assert got.startswith("done: 40 tokens") and "tokens/s" in got
    assert browser.find_element("id", "output").text.replace("\n", "") == (prompt + want["text"]).replace("\n", "")
    spans = browser.find_elements("css selector", "#output span.token")
    assert len(spans) == 40 and "".join(s.get_attribute("textContent") for s in spans) == want["text"]
    arrivals = browser.execute_script("return window.arrivals")
    assert len(set(arrivals)) > 2, arrivals  # the tokens came in several steps
    # Coloured by probability, alternatives on hover: the greedy token is the likeliest of them.
    assert all(s.value_of_css_property("background-color") != "rgba(0, 0, 0, 0)" for s in spans)
    from selenium.webdriver import ActionChains
    ActionChains(browser).move_to_element(spans[3]).perform()
    tip = browser.find_element("id", "alternatives")
    wait_until(tip.is_displayed, "the alternatives on hover")
    rows = tip.find_elements("css selector", "tr")
    assert 5 <= len(rows) <= 6 and "%" in rows[0].text
    shown = [float(r.text.rsplit(" ", 1)[1].rstrip("%")) for r in rows]
    assert shown == sorted(shown, reverse=True)
    browser.save_screenshot(str(tmp_path / "playground.png"))
    assert (tmp_path / "playground.png").stat().st_size > 10_000
    # Every request the page made went to the server it came from.
    urls = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls and all(u.startswith(origin(server) + "/") for u in urls), urls


def test_echo_colours_the_prompt_and_model_text_is_never_html(browser, server, wait_until):
    open_page(browser, server, wait_until)
    attack = 'a 😀 b <img src=x onerror="window.pwned=1">'  # and a character beyond UTF-16's first plane
    assert run(browser, wait_until, prompt=attack, temperature=0, max_tokens=3, echo=True).startswith("done")
    out = browser.find_element("id", "output")
    assert out.text.startswith(attack) and not out.find_elements("css selector", "img")
    prompt_spans = out.find_elements("css selector", "span.token[data-role=prompt]")
    assert "".join(s.get_attribute("textContent") for s in prompt_spans) == attack and len(prompt_spans) > 5
    assert browser.execute_script("return window.pwned") is None
    fill(browser, echo=False)
    assert run(browser, wait_until, prompt=attack, max_tokens=3).startswith("done")
    assert not out.find_elements("css selector", "img") and browser.execute_script("return window.pwned") is None


def test_a_bad_setting_shows_the_servers_error_and_the_page_stays_usable(browser, server, wait_until):
    open_page(browser, server, wait_until)
    got = run(browser, wait_until, prompt="x", max_tokens=-5)
    assert got == "error: 'max_tokens' must be an integer >= 0"
    got = run(browser, wait_until, prompt="x " * 60, max_tokens=10)
    assert got.startswith("error: prompt 0: 61 tokens plus max_tokens 10")
    assert run(browser, wait_until, prompt="x", max_tokens=4, temperature=0).startswith("done: 4 tokens")


def test_stop_ends_the_generation_on_the_server_too(browser, server, steps, wait_until):
    open_page(browser, server, wait_until)
    before = server.engine.steps_run
    fill(browser, prompt="Once", temperature=0.8, max_tokens=60, seed="")
    # A model this tiny would finish before anyone could press Stop: the server is held once 3 tokens are out.
    steps.hold()
    browser.find_element("id", "generate").click()
    steps.until(lambda: any(c is not None and c.generated >= 3 for c in server.engine.rows), "3 tokens generated")
    [row] = [c for c in server.engine.rows if c is not None]
    wait_until(lambda: len(browser.find_elements("css selector", "#output span.token")) >= 3, "3 tokens on the page")
    browser.find_element("id", "stop_button").click()
    wait_until(lambda: status(browser).startswith("done"), "the page to say done")
    assert "(stopped)" in status(browser)
    # Let the server go, a step at a time once its handler has written all it was sent: its writes are how it
    # learns that the page has gone.
    steps.pace = lambda: row.job.events.empty() or row.job.cancelled
    steps.release()
    wait_until(lambda: not server.engine.busy(), "the server to stop generating")
    assert row.reason == "cancelled" and server.engine.steps_run - before < 40  # it stopped there, not at 60 tokens
    assert browser.find_element("id", "generate").is_enabled()


def test_narrow_screen_and_dark_scheme(browser, server, wait_until):
    browser.set_window_size(390, 844)
    try:
        open_page(browser, server, wait_until)
        assert run(browser, wait_until, prompt="A phone", max_tokens=8).startswith("done")
        assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        light = browser.find_element("tag name", "body").value_of_css_property("background-color")
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme",
                                                                             "value": "dark"}]})
        dark = browser.find_element("tag name", "body").value_of_css_property("background-color")
        lum = lambda c: np.mean([int(x) for x in c[c.index("(") + 1:].split(",")[:3]])
        assert lum(light) > 200 and lum(dark) < 60
    finally:
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
        browser.set_window_size(1100, 900)


def test_the_page_writes_text_only():
    page = open(serve.PAGE).read()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in page, sink
    assert "http://" not in page and "https://" not in page  # nothing fetched from elsewhere
