"""`t2i serve` end to end in a real headless Chromium (Debian's `chromium`, driven by Playwright through
executable_path; Playwright never downloads a browser): type a prompt, generate, click a word, scrub the
steps, silence a colour word, generate once with attention guidance; every request of the page goes to loopback only."""
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = Path(__file__).resolve().parent.parent / "outputs" / "serve-browser-test.png"

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: apt-get install -y chromium "
                                "(the browser test drives Debian's chromium; Playwright downloads none)")


@contextmanager
def opened_page(url: str, height: int = 1100, width: int = 1400):
    """A headless Chromium page (1400 px wide unless told) at `url`, once the explorer's Generate button is there;
    the browser closes however the test ends."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[web]'")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(url, timeout=60_000)
            page.wait_for_selector("#generate", timeout=60_000)
            yield page
        finally:
            browser.close()


def _img(page, element_id: str) -> str:
    """The src of the image shown in a gr.Image, '' when it shows none."""
    return page.evaluate(f"(document.querySelector('#{element_id} img') || {{}}).src || ''")


def _wait_for_new(page, element_id: str, old: str, timeout_ms: int = 30_000) -> str:
    page.wait_for_function(f"(document.querySelector('#{element_id} img') || {{}}).src && "
                           f"document.querySelector('#{element_id} img').src != {old!r}", timeout=timeout_ms)
    return _img(page, element_id)


def _pixels(page, element_id: str) -> bytes:
    """The image as the page draws it."""
    return page.locator(f"#{element_id} img").screenshot()


def _set_number(page, element_id: str, value: str) -> None:
    """Type into a gr.Slider's number box (or the seed's text box) and leave it, as a person does (fires input
    and release)."""
    box = page.locator(f"#{element_id} input[type=number], #{element_id} textarea, #{element_id} input[type=text]")
    box.fill(value)
    box.press("Enter")
    box.blur()


def test_the_page_generates_shows_a_words_map_scrubs_steps_and_silences_a_word(served):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[web]'")
    url, _, _ = served
    outside = []

    def loopback_only(route):
        if urlparse(route.request.url).hostname in ("127.0.0.1", "localhost"):
            route.continue_()
        else:                                            # fonts, analytics, anything else: never fetched
            outside.append(route.request.url)
            route.abort()

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.route("**/*", loopback_only)
            page.goto(url, timeout=60_000)
            page.wait_for_selector("#generate", timeout=60_000)

            # 1. type a prompt and generate
            page.fill("#prompt textarea", "a red circle")
            _set_number(page, "steps", "4")
            t0 = time.perf_counter()
            page.click("#generate")
            page.wait_for_function("document.querySelector('#message').innerText.includes('image(s)')",
                                   timeout=60_000)
            generate_s = time.perf_counter() - t0
            assert "4 steps" in page.inner_text("#message")
            assert page.locator("#words label").all_inner_texts() == ["a", "red", "circle"]
            assert "attention: red" in page.inner_text("#overlay")          # the first content word, not "a"
            assert "its own scale" in page.inner_text("#overlay")           # each map is stretched on its own: said

            # 2. click a word: the overlay's pixels change
            for word in ("circle", "red"):
                before_src, before = _img(page, "overlay"), _pixels(page, "overlay")
                page.click(f"#words label:has-text('{word}')")
                _wait_for_new(page, "overlay", before_src)
                assert _pixels(page, "overlay") != before
                assert f"attention: {word}" in page.inner_text("#overlay")

            # 3. move the step slider: x0 and the word's map change
            map_src, x0_src = _img(page, "stepmap"), _img(page, "x0")
            _set_number(page, "step", "1")
            _wait_for_new(page, "stepmap", map_src)
            assert _img(page, "x0") != x0_src and "red at step 1/4" in page.inner_text("#stepmap")

            # 4. the colour word's weight to 0: the image is regenerated, and it changed
            _set_number(page, "weight", "0")
            page.wait_for_function("document.querySelector('#message').innerText.includes('regenerated with red x 0')",
                                   timeout=60_000)
            _wait_for_new(page, "reweighted", "")
            assert _pixels(page, "reweighted") != _pixels(page, "image")
            assert _img(page, "effect")
            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)

            # 5. bad input is a message in the page, not a stack trace
            _set_number(page, "steps", "2")
            page.fill("#prompt textarea", "")
            page.click("#generate")
            page.wait_for_function("document.querySelector('#message').innerText.includes('Cannot do that')",
                                   timeout=30_000)
            text = page.inner_text("body")
            assert "type a prompt" in text and "Traceback" not in text

            # 6. one guided generation: open the guidance panel, place the object where the prompt says
            page.click("text=attention guidance (slower)")
            page.locator("#place input").check()
            page.fill("#prompt textarea", "a red circle in the top left")
            page.click("#generate")
            page.wait_for_function("document.querySelector('#message').innerText.includes('attention guidance')",
                                   timeout=60_000)
            assert "2 steps" in page.inner_text("#message") and "Traceback" not in page.inner_text("body")
        finally:
            browser.close()
    print(f"\npage generate: {generate_s:.2f} s; requests refused (not loopback): {len(outside)}; "
          f"screenshot: {SCREENSHOT}")


def _generate_a_red_circle(page, steps: str = "2") -> None:
    """Generate "a red circle" at `steps` steps and wait until its first word's map is drawn."""
    page.fill("#prompt textarea", "a red circle")
    _set_number(page, "steps", steps)
    page.click("#generate")
    page.wait_for_function("document.querySelector('#overlay').innerText.includes('attention: red')",
                           timeout=60_000)


def _drag(page, element_id: str, fraction: float) -> None:
    """Drag a gr.Slider's handle from where it is to `fraction` of its track, as a person does with a mouse."""
    track = page.locator(f"#{element_id} input[type=range]")
    box, low, high = track.bounding_box(), float(track.get_attribute("min")), float(track.get_attribute("max"))
    start, y = (float(track.input_value()) - low) / (high - low), box["y"] + box["height"] / 2
    x = lambda f: box["x"] + 8 + f * (box["width"] - 16)      # noqa: E731  (the handle's centre, inside the ends)
    page.mouse.move(x(start), y)
    page.mouse.down()
    for k in range(1, 11):
        page.mouse.move(x(start + k / 10 * (fraction - start)), y)
        time.sleep(0.02)
    page.mouse.up()


def test_step_drags_and_bad_values_as_a_user_meets_them(served):
    """Issue 19: a dragged step shows that step (x0 and the map); a bad value is t2i's own message in the page,
    the last result stays, and the server's log holds no traceback."""
    url, _, _ = served
    with opened_page(url) as page:
        page.fill("#prompt textarea", "a red circle")
        _set_number(page, "steps", "8")
        page.click("#generate")
        page.wait_for_function("document.querySelector('#message').innerText.includes('image(s)')",
                               timeout=60_000)
        page.wait_for_function("document.querySelector('#overlay').innerText.includes('attention: red')")

        # 1. drags: after each, x0 and the map show the step the slider shows
        for fraction in (0.0, 0.6, 0.2, 1.0, 0.45):
            _drag(page, "step", fraction)
            shown = page.locator("#step input[type=number]").input_value()
            page.wait_for_function(f"document.querySelector('#stepmap').innerText.includes('red at step {shown}/8')"
                                   f" && document.querySelector('#x0').innerText.includes('at step {shown}/8')",
                                   timeout=5_000)

        # 2. generating again: one progress display (in the message), the earlier result stays in view
        _set_number(page, "count", "4")
        page.click("#generate")
        page.wait_for_function("(() => { const t = id => document.querySelector(`#${id} [data-testid=status-tracker]`);"
                               " return t('message') && !t('message').classList.contains('hide') &&"
                               " t('image').classList.contains('hide') && t('grid').classList.contains('hide') })()",
                               timeout=30_000, polling=10)
        page.wait_for_function("document.querySelector('#message').innerText.includes('4 image(s)')", timeout=60_000)
        _set_number(page, "count", "1")

        # 3. bad values: t2i's message, the result stays
        image = _img(page, "image")
        for element_id, value, said in (("seed", "-1", "the seed must be"), ("weight", "1e9", "weight must be"),
                                        ("step", "99", "the step must be a whole number from 1 to 8")):
            _set_number(page, element_id, value)
            if element_id == "seed":
                page.click("#generate")
            page.wait_for_function(f"document.querySelector('#message').innerText.includes('Cannot do that')"
                                   f" && document.querySelector('#message').innerText.includes({said!r})",
                                   timeout=30_000)
            assert _img(page, "image") == image and not page.locator(".toast-body").count()
            _set_number(page, element_id, "1" if element_id == "step" else "0")


def test_seeds_travel_as_text_end_to_end(served):
    """Issue 25 items 5 and 22: a seed above 2**53 runs as typed (a number box made 9007199254740993 ...992 and
    refused 2**64 - 1 as 18446744073709552000), and 1.5 is refused as steps 2.5 is, not rounded to 2."""
    url, _, _ = served
    with opened_page(url) as page:
        page.fill("#prompt textarea", "a red circle")
        _set_number(page, "steps", "2")
        for seed in ("9007199254740993", "18446744073709551615"):
            _set_number(page, "seed", seed)
            page.click("#generate")
            page.wait_for_function(f"document.querySelector('#message').innerText.includes('seed {seed}:')",
                                   timeout=60_000)
            assert f"red-circle-{seed}\n.png" in page.inner_text("#files")  # the name, the extension apart
        _set_number(page, "seed", "1.5")
        page.click("#generate")
        page.wait_for_function("document.querySelector('#message').innerText.includes('Cannot do that')",
                               timeout=30_000)
        said = "the seed must be a whole number from 0 to 18446744073709551615, got 1.5"
        assert said in page.inner_text("#message")


def test_typed_values_out_of_range_are_refused_in_words_not_changed(served):
    """Issue 25 item 4: steps 0 or 100000, an emptied steps box, guidance -5 or 1e9, images 0 or 50 ran as 1, 50,
    1, 1, 10, 1, 4 in silence (the sliders clamped what was typed); each is t2i's message now, the result kept."""
    url, _, _ = served
    with opened_page(url) as page:
        page.fill("#prompt textarea", "a red circle")
        _set_number(page, "steps", "2")
        page.click("#generate")
        page.wait_for_function("document.querySelector('#message').innerText.includes('image(s)')", timeout=60_000)
        image = _img(page, "image")
        for element_id, value, said in (("steps", "0", "got 0"), ("steps", "100000", "got 100000"),
                                        ("steps", "", "steps must be"), ("guidance", "-5", "got -5"),
                                        ("guidance", "1e9", "got 1000000000"), ("count", "0", "got 0"),
                                        ("count", "50", "got 50")):
            _set_number(page, element_id, value)
            page.click("#generate")
            page.wait_for_function(f"document.querySelector('#message').innerText.includes('Cannot do that')"
                                   f" && document.querySelector('#message').innerText.includes({said!r})",
                                   timeout=30_000)
            assert _img(page, "image") == image, (element_id, value)
            _set_number(page, element_id, {"steps": "2", "guidance": "3", "count": "1"}[element_id])


def test_the_word_chips_are_reached_and_chosen_with_the_keyboard(served):
    """Issue 25 item 3: the chips were hidden radio inputs (display: none), so Tab skipped them; now Tab reaches
    each chip in turn and Space chooses one, whose map is drawn."""
    url, _, _ = served
    with opened_page(url) as page:
        _generate_a_red_circle(page)
        page.focus("#generate button, button#generate")
        for _ in range(60):  # Tab on from Generate until the focus is on a word chip
            page.keyboard.press("Tab")
            if page.evaluate("!!document.activeElement.closest('#words')"):
                break
        focused = "document.activeElement.closest('#words') && document.activeElement.value"
        assert page.evaluate(focused) == "a"
        page.keyboard.press("Tab")                 # each chip is a stop (Gradio names each radio apart)
        page.keyboard.press("Tab")
        assert page.evaluate(focused) == "circle"
        page.keyboard.press("Space")               # and Space chooses it
        page.wait_for_function("document.querySelector('#overlay').innerText.includes('attention: circle')",
                               timeout=30_000)


def test_the_weight_regenerates_from_the_keyboard_and_a_typed_5_is_said(served):
    """Issue 25 item 3: typing 0 (without leaving the box) and the arrow keys regenerate, as releasing a drag
    did; a typed 5 is t2i's message (the slider clamped it to 3 in silence)."""
    url, _, _ = served
    with opened_page(url) as page:
        _generate_a_red_circle(page)
        box = page.locator("#weight input[type=number]")
        box.fill("0")                                                   # typed, focus stays in the box
        page.wait_for_function("document.querySelector('#message').innerText.includes('regenerated with red x 0')",
                               timeout=30_000)
        box.press("ArrowUp")                                            # 0 -> 0.1
        page.wait_for_function("document.querySelector('#message').innerText"
                               ".includes('regenerated with red x 0.1')",
                               timeout=30_000)
        box.fill("5")
        page.wait_for_function("document.querySelector('#message').innerText.includes('Cannot do that')"
                               " && document.querySelector('#message').innerText.includes('from 0 to 3')",
                               timeout=30_000)


def test_image_toolbars_and_downloads_do_not_mislead(served):
    """Issue 25 item 7: no Share button (it only said 'Must be on Spaces to share') nor the images' own Download
    (a 256 px image.webp without metadata: the downloads list has the PNGs); the list shows whole names, offers
    no 'Remove this file', and keeps every reweighted PNG, not only the latest."""
    url, _, _ = served
    with opened_page(url) as page:
        _generate_a_red_circle(page)
        box = page.locator("#weight input[type=number]")
        for value, said in (("0", "red x 0"), ("2", "red x 2")):
            box.fill(value)
            page.wait_for_function(f"document.querySelector('#message').innerText.includes('regenerated with "
                                   f"{said}')", timeout=30_000)
        page.wait_for_function("document.querySelectorAll('#files td.filename').length == 4", timeout=10_000)
        names = page.eval_on_selector_all("#files td.filename",
                                          "tds => tds.map(td => td.getAttribute('aria-label'))")
        assert {"a-red-circle-0-redx0.png", "a-red-circle-0-redx2.png"} <= set(names), names
        views = ["image", "overlay", "effect", "reweighted", "x0", "stepmap", "grid"]
        for view in views:
            for button in ("Share", "Download"):
                assert not page.locator(f"#{view} button[aria-label={button}]").count(), (view, button)
        assert not any(b.is_visible() for b in page.locator("#files button[aria-label='Remove this file']").all())
        cut = page.eval_on_selector_all("#files .stem", "els => els.filter(e => e.scrollWidth > e.clientWidth)"
                                                       ".map(e => e.textContent)")
        assert cut == [], cut


def test_progress_and_messages_are_where_the_eye_is(served):
    """Issue 25 items 1 and 2: on a fresh page the message area was 0 px tall and hid the progress bar (and the
    queue position); an error with the guidance panel open landed below the window's bottom edge."""
    url, _, _ = served
    with opened_page(url, height=1000) as page:
        page.fill("#prompt textarea", "a red circle")
        _set_number(page, "steps", "8")
        page.click("#generate")                                          # the first Generate of the page
        page.wait_for_function("(() => { const t = document.querySelector('#message [data-testid=status-tracker]');"
                               " return t && !t.classList.contains('hide') && Math.min(t.getBoundingClientRect()"
                               ".height, document.querySelector('#message').getBoundingClientRect().height) > 20"
                               " })()", timeout=30_000, polling=10)
        page.wait_for_function("document.querySelector('#message').innerText.includes('image(s)')", timeout=60_000)
        page.click("text=attention guidance (slower)")
        page.fill("#boxes textarea, #boxes input", "circle=0,0,2,1")
        page.click("#generate")
        page.wait_for_function("document.querySelector('#message').innerText.includes('Cannot do that')",
                               timeout=30_000)
        page.wait_for_function("(() => { const r = document.querySelector('#message').getBoundingClientRect();"
                               " return r.top >= 0 && r.bottom <= window.innerHeight })()", timeout=5_000)


def test_every_map_says_its_scale_and_an_effect_its_size(served):
    """Issue 25 item 8: the step map, the effect map and the all-words grid said nothing of their scale, and an
    effect of red x 0 was a faint outline with no number."""
    url, _, _ = served
    with opened_page(url) as page:
        _generate_a_red_circle(page)
        assert "its own scale" in page.inner_text("#stepmap") and "own scale" in page.inner_text("#grid")
        page.locator("#weight input[type=number]").fill("0")
        page.wait_for_function("document.querySelector('#effect').innerText.includes('brightest')", timeout=30_000)
        label = page.inner_text("#effect")
        assert re.search(r"brightest = a change of \d+% .*largest \d+%, mean \d+(\.\d)?%", label), label


def test_a_visitor_turned_away_by_a_full_queue_is_told_in_t2is_words(served_small_queue):
    """Issue 25 item 6: with one request sampling and one waiting, a third visitor met Gradio's 'This application
    is currently busy' for 10 s; now the toast says it in t2i's words, with what to do."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[web]'")
    url, _, _ = served_small_queue
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        try:
            pages = [browser.new_page(viewport={"width": 1400, "height": 1100}) for _ in range(3)]
            for page in pages:
                page.goto(url, timeout=60_000)
                page.wait_for_selector("#generate", timeout=60_000)
                page.fill("#prompt textarea", "a red circle")
                _set_number(page, "steps", "200")
                _set_number(page, "count", "4")
            for page in pages:                      # one samples, one waits, the third is turned away
                page.click("#generate")
                time.sleep(0.3)
            pages[2].wait_for_selector(".toast-body", timeout=30_000)
            toast = pages[2].inner_text(".toast-body")
            assert "currently busy" not in toast and "queue is full" in toast and "try again" in toast, toast
        finally:
            browser.close()


def test_progress_is_not_drawn_over_the_old_message(served):
    """Issue 25 item 10 (part): while sampling, the progress in the message area was drawn over the last message's
    text; now that text is hidden until the new message replaces it."""
    url, _, _ = served
    with opened_page(url) as page:
        page.fill("#prompt textarea", "a red circle")
        _set_number(page, "steps", "8")
        page.click("#generate")
        page.wait_for_function("document.querySelector('#message').innerText.includes('image(s)')", timeout=60_000)
        _set_number(page, "count", "4")
        page.click("#generate")
        page.wait_for_function(
            "(() => { const m = document.querySelector('#message'), t = m.querySelector('[data-testid=status-"
            "tracker]'); if (!t || t.classList.contains('hide')) return false;"
            " const prose = [...m.querySelectorAll('.prose, .md')]"
            ".filter(e => e.textContent.includes('image(s)'));"  # innerText skips what is hidden
            " return prose.length > 0 && prose.every(e => getComputedStyle(e).visibility == 'hidden') })()",
            timeout=30_000, polling=10)


BOX = "(e => { const r = e.getBoundingClientRect(); return {left: r.left, right: r.right, top: r.top, bottom: r.bottom}; })"
PHONE = {"width": 390, "height": 844}  # an iPhone 12 to 15's viewport, in CSS px


def _box(page, selector: str) -> dict:
    """An element's box on the page (CSS px, from the document's top: the page may have scrolled)."""
    box = page.eval_on_selector(selector, BOX)
    top = page.evaluate("window.scrollY")
    return {**box, "top": box["top"] + top, "bottom": box["bottom"] + top}


def _apart(a: dict, b: dict) -> bool:
    return a["right"] <= b["left"] or b["right"] <= a["left"] or a["bottom"] <= b["top"] or b["bottom"] <= a["top"]


def test_on_a_phone_the_image_is_near_generate_and_the_chips_near_their_map(served):
    """Issue 25 item 2 (phone): on a 390 px screen the columns stacked whole, so the image sat below the downloads
    (about 1,100 px under Generate) and the word chips below the effect and reweighted images (about 800 px from
    the attention map they steer). Now Generate, its message and the image follow each other, the chips sit under
    the map, and the downloads come last."""
    url, _, _ = served
    with opened_page(url, **PHONE) as page:
        _generate_a_red_circle(page, steps="8")
        generate, image, overlay, words, files = (_box(page, f"#{i}") for i in
                                                  ("generate", "image", "overlay", "words", "files"))
        assert 0 <= image["top"] - generate["bottom"] <= 300, (generate, image)   # a message between them
        assert 0 <= words["top"] - overlay["bottom"] <= 150, (overlay, words)
        assert files["top"] > _box(page, "#grid")["bottom"], files                # the downloads last
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]  # nothing wider than the phone


def test_dropdown_text_stops_before_the_arrow_and_phone_labels_are_whole(served):
    """Issue 25 item 10: the model dropdown's arrow was drawn over 'shipped model'; on a 390 px phone the image
    labels ran under the Fullscreen button and over the image (the x0 label cut off), and the all-words grid,
    532 px drawn into 324, had 8 px labels."""
    url, _, _ = served
    for size in ({"width": 1400, "height": 1100}, PHONE):
        with opened_page(url, **size) as page:
            for dropdown, longest in (("model", "shipped model"), ("scheduler", "euler-a")):
                arrow = page.eval_on_selector(f"#{dropdown} .dropdown-arrow", BOX)
                text = page.eval_on_selector(f"#{dropdown} input", """(i, longest) => {  // its text's room
                    const s = getComputedStyle(i), r = i.getBoundingClientRect(),
                          c = document.createElement('canvas').getContext('2d');
                    c.font = s.font;
                    return {left: r.left + parseFloat(s.paddingLeft), right: r.right - parseFloat(s.paddingRight),
                            top: r.top, bottom: r.bottom, needs: c.measureText(longest).width} }""", longest)
                assert _apart(arrow, text), (size, dropdown, arrow, text)
                assert text["needs"] <= text["right"] - text["left"], (size, dropdown, text)
    with opened_page(url, **PHONE) as page:
        _generate_a_red_circle(page, steps="8")
        for view in ("image", "overlay", "x0", "stepmap", "grid"):
            page.locator(f"#{view}").scroll_into_view_if_needed()           # the images load lazily
            page.wait_for_function(f"(document.querySelector('#{view} img') || {{}}).naturalWidth > 0",
                                   timeout=10_000)
            label, block, image = (page.eval_on_selector(s, BOX) for s in
                                   (f"#{view} [data-testid=block-label]", f"#{view}", f"#{view} img"))
            buttons = page.eval_on_selector_all(f"#{view} .icon-button-wrapper button", f"bs => bs.map({BOX})")
            assert block["left"] <= label["left"] and label["right"] <= min(block["right"], PHONE["width"]), view
            assert page.eval_on_selector(f"#{view} [data-testid=block-label]",
                                         "e => e.scrollWidth <= e.clientWidth"), view     # nothing cut
            assert buttons and all(_apart(label, b) for b in buttons), (view, label, buttons)
            assert _apart(label, image), (view, label, image)
        shown = page.eval_on_selector("#grid img", "i => i.getBoundingClientRect().width / i.naturalWidth")
        assert 14 * shown >= 12, shown  # the grid's labels are drawn 14 px high (t2i.attention.overlay._font)
        frame, grid = page.eval_on_selector("#grid .image-frame", BOX), page.eval_on_selector("#grid img", BOX)
        assert grid["left"] >= frame["left"], (frame, grid)  # what is wider than the phone scrolls from its start
