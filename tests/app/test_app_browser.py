"""The web editor in a real browser: headless Chromium (Debian's ``chromium``, driven by
Playwright; no browser download) on the app serving a tiny random model on localhost.

Needs ``apt-get install chromium`` and ``pip install playwright gradio``. About 60-90 s on two
busy cores, most of it the first edit's compilation. The screenshot is kept under pytest's tmp
folder (the path is printed).
"""

import io
import re
import socket

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect, sync_playwright
from skimage import data as skdata

from jip2p import app as web, checkpoints, edit

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
EDIT_TIMEOUT_MS = 240_000


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def editor(tmp_path_factory):
  folder = checkpoints.create_random_pipeline(str(tmp_path_factory.mktemp("model") / "tiny"),
                                              "tiny")
  return edit.Editor.from_pretrained(folder)


@pytest.fixture(scope="module")
def served(editor, tmp_path_factory):
  blocks = web.build_app(editor, resolution=64, steps=2, title="jip2p test",
                         work_dir=str(tmp_path_factory.mktemp("app")))
  blocks, url = web.launch(blocks, host="127.0.0.1", port=free_port(), block=False)
  assert url.startswith("http://127.0.0.1:")
  yield url
  blocks.close()


@pytest.fixture(scope="module")
def page(served):
  with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
    page = browser.new_page(viewport={"width": 1280, "height": 1400})
    page.goto(served)
    yield page
    browser.close()


def test_upload_edit_and_read_back_seed(page, editor, tmp_path):
  photo = tmp_path / "chelsea.png"
  Image.fromarray(skdata.chelsea()).save(photo)
  page.locator("#input-image input[type=file]").set_input_files(str(photo))
  page.locator("#instruction textarea").fill("turn the cat into a tiger")
  page.locator("#edit-button").click()
  used = page.locator("#values-used")
  expect(used).to_contain_text("seed", timeout=EDIT_TIMEOUT_MS)
  text = used.inner_text()
  match = re.search(r"Turn 1: seed (\d+) · s_T ([\d.]+) · s_I ([\d.]+) · 2 steps · 64×64",
                    text)
  assert match, text
  seed, text_guidance, image_guidance = int(match[1]), float(match[2]), float(match[3])
  assert (text_guidance, image_guidance) == (7.5, 1.5)  # guidance not randomized by default
  assert page.locator("#seed input").input_value() == str(seed)  # written back to the field

  result = page.locator("#output-image img")
  expect(result).to_be_visible()
  shown = page.request.get(result.get_attribute("src"))
  assert shown.ok
  pixels = np.asarray(Image.open(io.BytesIO(shown.body())).convert("RGB"))
  [want] = editor([Image.open(photo)], ["turn the cat into a tiger"], steps=2, seed=seed,
                  resolution=64)
  np.testing.assert_array_equal(pixels, np.asarray(want))  # the page shows that seed's edit

  shot = tmp_path / "app.png"
  page.screenshot(path=str(shot), full_page=True)
  print(f"screenshot: {shot}")
  assert shot.stat().st_size > 10_000


def test_edit_the_result_again(page):
  page.locator("#again-button").click()
  page.locator("#randomize-seed input").uncheck()
  page.locator("#seed input").fill("1234")
  page.locator("#instruction textarea").fill("make it snowy")
  page.locator("#edit-button").click()
  expect(page.locator("#values-used")).to_contain_text("Turn 2: seed 1234",
                                                       timeout=EDIT_TIMEOUT_MS)
  expect(page.locator("#turns img")).to_have_count(2)


def test_bad_upload_gets_a_message(page, tmp_path):
  bad = tmp_path / "broken.png"
  bad.write_bytes(b"this is not a png at all")
  page.locator("#input-image input[type=file]").set_input_files(str(bad))
  page.locator("#edit-button").click()
  expect(page.get_by_text("broken.png is not an image that can be read")).to_be_visible(
      timeout=60_000)
