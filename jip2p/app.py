"""The web editor (Gradio): upload or pick an image, type an instruction, edit, edit again.

    app = build_app(Editor.from_pretrained("path/to/model"))
    app.queue(default_concurrency_limit=1).launch(server_name="127.0.0.1")

or ``jip2p-app --model DIR`` (``jip2p-app`` alone: the world editor shipped in
data/synthetic-ip2p). Like the original InstructPix2Pix app: steps, text guidance s_T,
image guidance s_I and seed, with "randomize seed" (0 … 100000) and "randomize guidance"
(s_T ~ U(6, 9), s_I ~ U(1.2, 1.8), rounded to 2 decimals); the values an edit used are written
back into the fields and shown under the result, so an edit can be repeated. "Edit the result
again" makes the result the next input (multi-turn); every turn is kept in the gallery. Results
download as PNG with the instruction and values in their metadata.

The queue runs one edit at a time (one accelerator serves every user in turn). A bad upload (not
an image, truncated, too large) is refused with a message naming the problem, before it reaches
the model; so is an edit whose model gives NaN or inf. An animated image (its first frame is
edited) or an instruction longer than the text encoder reads shows a warning.
"""

from __future__ import annotations

import dataclasses
import os
import random
import tempfile
import warnings

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, PngImagePlugin  # noqa: E402

from jip2p import edit  # noqa: E402
from jip2p.data import synthetic  # noqa: E402
from jip2p.errors import Jip2pError, Jip2pWarning  # noqa: E402

MAX_RANDOM_SEED = 100_000
TEXT_RANGE = (6.0, 9.0)
IMAGE_RANGE = (1.2, 1.8)
# Uploads are centre-fitted to one of 2 · 4 − 1 = 7 shapes (`jip2p.edit.bucket_size`): a handful
# of compiled programs (with the steps as data, one per shape) serve every aspect ratio.
SIZE_BUCKETS = 4
PHOTOS = (  # scikit-image's photos with an instruction each
    ("astronaut", "make it a watercolour painting"),
    ("chelsea", "turn the cat into a tiger"),
    ("coffee", "make it a cup of hot chocolate with marshmallows"),
    ("rocket", "make it night with stars"),
)
WORLD_SCENES = 3  # the demo world's scenes at the end of the examples (its held-out wording)
# Local fonts only: the default theme would ask a font server the machine may not reach.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "monospace"])


@dataclasses.dataclass(frozen=True)
class Values:
  """What an edit used."""
  seed: int
  text_guidance: float
  image_guidance: float
  steps: int

  def describe(self, turn: int, size: tuple[int, int]) -> str:
    return (f"Turn {turn}: seed {self.seed} · s_T {self.text_guidance:g} · "
            f"s_I {self.image_guidance:g} · {self.steps} steps · {size[0]}×{size[1]}")


def choose_values(seed, text_guidance, image_guidance, steps, randomize_seed: bool,
                  randomize_guidance: bool, rng: random.Random) -> Values:
  """The values of one edit: the fields' (checked), or random draws where asked for."""
  if randomize_seed:
    seed = rng.randint(0, MAX_RANDOM_SEED)
  if randomize_guidance:
    text_guidance = round(rng.uniform(*TEXT_RANGE), 2)
    image_guidance = round(rng.uniform(*IMAGE_RANGE), 2)
  if seed is None or not float(seed).is_integer() or not 0 <= seed <= edit.MAX_SEED:
    raise gr.Error(f"The seed must be a whole number from 0 to {edit.MAX_SEED}, got {seed}.")
  if steps is None or not float(steps).is_integer() or steps < 1:
    raise gr.Error(f"Steps must be a whole number ≥ 1, got {steps}.")
  for name, value in (("Text guidance", text_guidance), ("Image guidance", image_guidance)):
    if value is None or not np.isfinite(value):
      raise gr.Error(f"{name} must be a number, got {value}.")
  return Values(int(seed), float(text_guidance), float(image_guidance), int(steps))


class _CheckedImage(gr.Image):
  """The image input, refusing an unreadable upload with a message instead of a traceback."""
  is_template = True  # drawn by gr.Image's frontend

  def preprocess(self, payload):
    try:
      return super().preprocess(payload)
    except (OSError, ValueError, SyntaxError) as e:
      name = getattr(payload, "orig_name", None) or "the upload"
      raise gr.Error(f"{name} is not an image that can be read ({type(e).__name__}). Upload a "
                     "PNG, JPEG or WebP photo.") from None


def write_examples(folder: str, world_seed: int = 1) -> list[list[str]]:
  """[image path, instruction] examples: scikit-image photos, then demo-world scenes."""
  from skimage import data as skdata
  os.makedirs(folder, exist_ok=True)
  examples = []
  for name, instruction in PHOTOS:
    path = os.path.join(folder, f"{name}.png")
    Image.fromarray(getattr(skdata, name)()).convert("RGB").save(path)
    examples.append([path, instruction])
  for index in range(WORLD_SCENES):
    ex = synthetic.example_at(index, seed=world_seed, size=256, split="heldout")
    path = os.path.join(folder, f"world-{index}.png")
    Image.fromarray(ex.input_image).save(path)
    examples.append([path, ex.instruction])
  return examples


def save_png(image: Image.Image, folder: str, instruction: str, values: Values) -> str:
  """The result as a PNG carrying its instruction and values; returns the path."""
  info = PngImagePlugin.PngInfo()
  for key, value in (("instruction", instruction), ("seed", values.seed),
                     ("text_guidance", values.text_guidance),
                     ("image_guidance", values.image_guidance), ("steps", values.steps),
                     ("software", "jip2p-app")):
    info.add_text(key, str(value))
  fd, path = tempfile.mkstemp(prefix="edit-", suffix=".png", dir=folder)
  os.close(fd)
  image.save(path, pnginfo=info)
  return path


def edit_one(editor, image_path: str, instruction: str, values: Values, resolution: int,
             size_buckets: int | None = SIZE_BUCKETS) -> Image.Image:
  """One edit (sizes bucketed as `Editor.edits` does with ``size_buckets``); a problem with the
  image, the values or the model becomes a message in the page, and an input used other than as
  given (an animated image, a long instruction) a warning."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", Jip2pWarning)
    try:
      image = edit.load_image(image_path)
      [result] = editor([image], [instruction], steps=values.steps,
                        text_guidance=values.text_guidance,
                        image_guidance=values.image_guidance, seed=values.seed,
                        resolution=resolution, size_buckets=size_buckets)
    except Jip2pError as e:
      raise gr.Error(f"The image cannot be edited: {e}") from None
  for warning in caught:
    if issubclass(warning.category, Jip2pWarning):
      gr.Warning(str(warning.message))
    else:
      warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
  return result


def build_app(editor, *, resolution: int | None = None, steps: int = 50, title: str = "jip2p",
              work_dir: str | None = None,
              size_buckets: int | None = SIZE_BUCKETS) -> gr.Blocks:
  """The editor's page. ``resolution``: the resize rule's long side (default: the model's own
  size, `Editor.native_size`); ``size_buckets``: uploads are centre-fitted to at most
  ``2 · size_buckets − 1`` shapes (`jip2p.edit.bucket_size`), so that any aspect ratio reuses a
  compiled program (None: the reference's resize rule, one program per shape it makes);
  ``work_dir`` holds examples and results (a fresh temporary folder by default)."""
  if resolution is None:
    resolution = editor.native_size
  work_dir = work_dir or tempfile.mkdtemp(prefix="jip2p-app-")
  results_dir = os.path.join(work_dir, "results")
  os.makedirs(results_dir, exist_ok=True)
  examples = write_examples(os.path.join(work_dir, "examples"))
  rng = random.Random()

  def run_edit(image_path, instruction, n_steps, text_guidance, image_guidance, seed,
               randomize_seed, randomize_guidance, history):
    if not image_path:
      raise gr.Error("Upload an image or pick an example first.")
    instruction = (instruction or "").strip()
    if not instruction:
      gr.Warning("The instruction is empty: the result is the resized input.")
    values = choose_values(seed, text_guidance, image_guidance, n_steps, randomize_seed,
                           randomize_guidance, rng)
    result = edit_one(editor, image_path, instruction, values, resolution, size_buckets)
    try:
      path = save_png(result, results_dir, instruction, values)
    except OSError as e:
      raise gr.Error(f"The result cannot be saved ({e.strerror or e}).") from None
    history = list(history or []) + [(path, f"{instruction or '(no instruction)'} — seed "
                                            f"{values.seed}")]
    described = values.describe(len(history), result.size)
    return (path, values.seed, values.text_guidance, values.image_guidance,
            f"**{described}**", gr.DownloadButton(value=path, interactive=True), history,
            history)

  def edit_again(result_path):
    if not result_path:
      raise gr.Error("There is no result to edit yet.")
    return result_path

  with gr.Blocks(title=title) as app:
    gr.Markdown(f"## {title}: edit images by written instructions\nUpload an image or pick an "
                "example, say what to change, press **Edit**. Edit the result again for "
                "several turns.")
    with gr.Row():
      source = _CheckedImage(label="Input", type="filepath", image_mode=None,
                             sources=["upload", "clipboard"], elem_id="input-image",
                             height=420)
      output = gr.Image(label="Result", type="filepath", format="png", interactive=False,
                        buttons=["download"], elem_id="output-image", height=420)
    with gr.Row():
      instruction = gr.Textbox(label="Instruction", placeholder="e.g. make it snowy",
                               elem_id="instruction", scale=4)
      run_button = gr.Button("Edit", variant="primary", elem_id="edit-button", scale=1)
    used = gr.Markdown("No edit yet.", elem_id="values-used")
    with gr.Row():
      steps_field = gr.Slider(1, 200, value=steps, step=1, label="Steps", elem_id="steps")
      text_field = gr.Number(value=7.5, label="Text guidance s_T", elem_id="text-guidance")
      image_field = gr.Number(value=1.5, label="Image guidance s_I", elem_id="image-guidance")
      seed_field = gr.Number(value=rng.randint(0, MAX_RANDOM_SEED), precision=0, label="Seed",
                             elem_id="seed")
    with gr.Row():
      randomize_seed = gr.Checkbox(value=True, label="Randomize seed", elem_id="randomize-seed")
      randomize_guidance = gr.Checkbox(value=False, label="Randomize guidance",
                                       elem_id="randomize-guidance")
      again_button = gr.Button("Edit the result again", elem_id="again-button")
      download = gr.DownloadButton("Download PNG", interactive=False, elem_id="download")
    turns = gr.Gallery(label="Turns", columns=6, fit_columns=False, height=180,
                       object_fit="contain", elem_id="turns")
    history = gr.State([])
    gr.Examples(examples, inputs=[source, instruction], label="Examples: scikit-image photos "
                "and demo-world scenes")

    run_button.click(run_edit, [source, instruction, steps_field, text_field, image_field,
                                seed_field, randomize_seed, randomize_guidance, history],
                     [output, seed_field, text_field, image_field, used, download, turns,
                      history])
    instruction.submit(run_edit, [source, instruction, steps_field, text_field, image_field,
                                  seed_field, randomize_seed, randomize_guidance, history],
                       [output, seed_field, text_field, image_field, used, download, turns,
                        history])
    again_button.click(edit_again, [output], [source])
  return app


def launch(app: gr.Blocks, *, host: str = "127.0.0.1", port: int | None = None,
           max_queue: int = 16, block: bool = True):
  """Serves ``app`` behind a queue of one edit at a time; returns (app, local url) when
  ``block`` is False (tests)."""
  app.queue(default_concurrency_limit=1, max_size=max_queue)
  _, url, _ = app.launch(server_name=host, server_port=port, prevent_thread_lock=not block,
                         show_error=True, quiet=not block, theme=THEME, footer_links=[])
  return app, url
