"""`t2i serve`: the word explorer as a Gradio Blocks page (pip install -e ".[web]"). The handlers here only
translate between the page and t2i.explorer's plain functions; bad input comes back as a message in the
page, never a stack trace. One queue, with bounded size and concurrency, so one visitor cannot stall it.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import traceback

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine

try:
    import gradio as gr
except ImportError as e:  # an optional extra
    raise ImportError("t2i serve needs the web extra: pip install -e \".[web]\"") from e

from .explorer import ALL, MODEL_DEFAULT, Explorer, Request
from .settings import SCHEDULERS

CSS = """  /* the chips' radio inputs stay focusable (Tab, arrow keys), only unseen */
.pixelated img { image-rendering: pixelated; }
#words input[type=radio] { position: absolute; opacity: 0; width: 1px; height: 1px; margin: 0; }
#words label { border-radius: 999px; padding: 4px 14px; cursor: pointer; position: relative; }
#words label:focus-within { outline: 2px solid var(--color-accent); outline-offset: 2px; }
#message { min-height: 3.5em; }  /* room for the progress bar and the queue position before any message */
#message:has([data-testid=status-tracker]:not(.hide)) :is(.prose, .md) { visibility: hidden; }  /* not under it */
#files .label-clear-button { display: none; }
#files .stem { white-space: normal; word-break: break-all; overflow: visible; text-overflow: clip; }
#words label.selected { background: var(--color-accent); color: white; }
#scheduler input, #model input { padding-right: 28px; text-overflow: ellipsis; }  /* the text stops before the arrow */
/* each image's label on its own line beside the toolbar, wrapping: never over the image nor under its buttons */
.pixelated > [data-testid=block-label] { position: static; margin-right: 40px; white-space: normal; }
.pixelated .image-container { position: static; }  /* the toolbar then sits on the label's line */
@media (max-width: 700px) {  /* a phone: Generate, its message and the image, the chips under the map they steer,
                                the weight above its effect, the steps and the grid, the downloads last */
  #layout { flex-direction: column; align-items: stretch; }
  #inputs, #outputs, #images { display: contents; }
  #effect, #reweighted, #outputs > :has(#weight) ~ * { order: 1; }  /* Gradio wraps words and weight in a form */
  #files { order: 2; }
  #grid .image-frame { display: block; overflow-x: auto; }  /* the grid at its own size, labels legible: scrolls */
  #grid img { max-width: none; width: auto; height: auto; }
}
"""
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
FAILED = "**Something went wrong on the server** (the details are in its log)."
OWN_SCALE = "its own scale: brightest = its most"  # each attention map is stretched to its own peak
SHOW_MESSAGE = "() => document.querySelector('#message').scrollIntoView({block: 'nearest'})"
VIEW_BUTTONS = ["fullscreen"]  # no Share (Spaces only), no Download (a 256 px webp, no metadata: the PNGs are below)


def _page_errors(message_box):
    """Handlers return {component: value}; a ValueError becomes a message in the page, anything else a
    one-line notice here and its traceback in the server's log."""
    def wrap(fn):
        @functools.wraps(fn)
        def handler(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except ValueError as e:
                return {message_box: f"**Cannot do that:** {e}"}
            except Exception:  # a bug: keep serving, keep the page free of internals
                traceback.print_exc(file=sys.stderr)
                return {message_box: FAILED}
        return handler
    return wrap


def _lenient_slider() -> type:
    """gr.Slider, but its typed value reaches the handler even out of range, to be refused there in t2i's words
    (Gradio's own range check answers with an 'Error' badge on every output and a traceback in the log). A class,
    not a patched instance: Gradio rebuilds a slider per session from its class when a handler changes its range."""
    from gradio import component_meta
    write_stub, component_meta.create_or_modify_pyi = component_meta.create_or_modify_pyi, lambda *a: None
    try:  # Gradio writes a .pyi stub beside the module of every component class; not into t2i
        class Slider(gr.Slider):
            def preprocess(self, payload: float) -> float:
                return payload

            def get_block_name(self) -> str:  # drawn by Gradio's own slider
                return "slider"
    finally:
        component_meta.create_or_modify_pyi = write_stub
    return Slider


Slider = _lenient_slider()


def _downloads(result) -> list[str]:
    """The result's files, each once (the latest reweighted PNG has two keys)."""
    return list(dict.fromkeys(str(p) for p in result.files.values()))


def _image(i: str | None) -> int:
    return int(i or 1) - 1                                   # the image chooser counts from 1


def build_app(explorer: Explorer) -> gr.Blocks:
    """The page: inputs, Generate and the downloads on the left; the image, the word chips, the maps, the step
    scrubber and the weight box with the effect on the right. On a phone, one column in the order of use (CSS)."""
    lim, first = explorer.limits, Request("")                # the page starts at a request's defaults
    pipe = explorer.pipeline(explorer.default_model)
    least_guidance, most_guidance = lim.sampling.guidance
    with gr.Blocks(title="t2i explorer", fill_width=True) as app:
        state = gr.State(None, time_to_live=3600)
        gr.Markdown("## t2i explorer: where each word looks, and what it does")
        with gr.Row(elem_id="layout"):
            with gr.Column(scale=1, min_width=280, elem_id="inputs"):
                # no max_length: a longer prompt is refused in words (Explorer.check), not cut in silence
                prompt = gr.Textbox(label="prompt", value="a red circle above a blue square", elem_id="prompt")
                negative = gr.Textbox(label="negative prompt", elem_id="negative")
                with gr.Row():
                    # text, not a number box: a page's numbers are floats, exact only up to 2**53 (seeds go to
                    # 2**64 - 1); the explorer reads and checks it, in its own words
                    seed = gr.Textbox(label="seed", value=str(first.seed), max_lines=1, elem_id="seed")
                    size = gr.Number(label="size (px)", value=pipe.native_size, precision=0, step=pipe.size_multiple,
                                     elem_id="size")
                # number boxes with no bounds of their own: a slider clamped a typed 0 or 100000 in silence; the
                # explorer refuses what is out of range, in its own words
                with gr.Row():
                    steps = gr.Number(value=min(first.steps, lim.max_steps), label=f"steps (up to {lim.max_steps})",
                                      elem_id="steps")
                    guidance = gr.Number(value=first.guidance, step=0.5, elem_id="guidance",
                                         label=f"guidance ({least_guidance:g} to {most_guidance:g})")
                    count = gr.Number(value=first.num_images, label=f"images (up to {lim.max_images})",
                                      elem_id="count")
                    scheduler = gr.Dropdown([MODEL_DEFAULT, *SCHEDULERS], value=MODEL_DEFAULT, label="scheduler",
                                            elem_id="scheduler")
                with gr.Accordion("attention guidance (slower)", open=False, elem_id="guidance-panel"):
                    with gr.Row():
                        place = gr.Checkbox(label="place objects where the prompt says", elem_id="place")
                        excite = gr.Checkbox(label="make every object appear", elem_id="excite")
                    boxes = gr.Textbox(label="or boxes: word=x0,y0,x1,y1; ... (fractions of the image, y down)",
                                       placeholder="circle=0,0,0.4,0.4; square=0.6,0.6,1,1", elem_id="boxes")
                # a line of its own: beside the scheduler, 'shipped model' ran under the arrow
                model = gr.Dropdown(list(explorer.models), value=explorer.default_model, label="model folder",
                                    elem_id="model")
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
                message = gr.Markdown(elem_id="message")
                files = gr.File(label="downloads: PNG with its metadata, heatmaps file", file_count="multiple",
                                interactive=False, elem_id="files")
            with gr.Column(scale=3, elem_id="outputs"):
                with gr.Row(elem_id="images"):
                    image = gr.Image(label="image", type="pil", interactive=False, buttons=VIEW_BUTTONS,
                                     elem_id="image", elem_classes="pixelated")
                    attention = gr.Image(label="attention", type="pil", interactive=False, buttons=VIEW_BUTTONS,
                                         elem_id="overlay", elem_classes="pixelated")
                    effect = gr.Image(label="effect", type="pil", interactive=False, buttons=VIEW_BUTTONS,
                                      elem_id="effect", elem_classes="pixelated")
                    reweighted = gr.Image(label="reweighted", type="pil", interactive=False, buttons=VIEW_BUTTONS,
                                          elem_id="reweighted", elem_classes="pixelated")
                words = gr.Radio([], label="words: click one", elem_id="words")
                low, high = lim.sampling.word_weight  # a number box: typing and the arrow keys regenerate too,
                weight = gr.Number(value=1, step=0.1, elem_id="weight",  # and a typed 5 is said, not clamped
                                   label=f"weight of the word, {low:g} to {high:g} (regenerates, same seed)")
                with gr.Row():
                    resolution = gr.Radio([ALL], value=ALL, label="maps from the layers at", elem_id="resolution")
                    which = gr.Radio(["1"], value="1", label="image", elem_id="which")
                step = Slider(1, 2, value=1, step=1, label="step", elem_id="step")
                with gr.Row():
                    x0 = gr.Image(label="x0: the predicted clean image at this step", type="pil", interactive=False,
                                  buttons=VIEW_BUTTONS, elem_id="x0", elem_classes="pixelated")
                    step_map = gr.Image(label="the word's map at this step", type="pil", interactive=False,
                                        buttons=VIEW_BUTTONS, elem_id="stepmap", elem_classes="pixelated")
                grid = gr.Image(label="all words", type="pil", interactive=False, buttons=VIEW_BUTTONS, elem_id="grid",
                                elem_classes="pixelated")

        views = [image, attention, grid, x0, step_map]

        def draw_step(result, word, index, res, at):
            """x0 and the word's map at step `at` (0-based)."""
            n = result.request.steps
            if not 0 <= at < n:  # a typed step: the page counts from 1
                raise ValueError(f"the step must be a whole number from 1 to {n}, got {at + 1}")
            shown_x0, shown_map = explorer.step_view(result, at, word, index, res)
            return {x0: gr.Image(shown_x0, label=f"x0: the predicted clean image at step {at + 1}/{n}"),
                    step_map: gr.Image(shown_map, label=f"{word} at step {at + 1}/{n} ({OWN_SCALE})" if word
                                       else "map at this step")}

        def draw(result, word, index, res, at):
            """Every view of one image, word, resolution and step (0-based)."""
            return {image: explorer.image(result, index),
                    attention: gr.Image(explorer.word_overlay(result, word, index, res) if word else None,
                                        label=f"attention: {word} ({OWN_SCALE})" if word else "attention"),
                    grid: gr.Image(explorer.grid(result, index, res),
                                   label="all words (each map on its own scale: brightest = that word's most)"),
                    **draw_step(result, word, index, res, at)}

        @_page_errors(message)
        def on_generate(prompt_, negative_, seed_, steps_, guidance_, scheduler_, model_, size_, count_, place_,
                        excite_, boxes_, progress=gr.Progress()):
            request = Request(prompt_, negative_, seed_, steps_, guidance_, scheduler_, model_, size_, count_,
                              place_, excite_, boxes_)
            result = explorer.generate(request, progress=lambda i, n: progress((i, n), desc="sampling"))
            word = result.first_word
            n = result.request.steps
            files_ = _downloads(result)
            return {state: result, **draw(result, word, 0, ALL, n - 1),
                    words: gr.Radio(choices=result.words, value=word),
                    resolution: gr.Radio(choices=result.filters, value=ALL),
                    which: gr.Radio(choices=[str(i + 1) for i in range(len(result.images))], value="1"),
                    step: gr.Slider(maximum=max(n, 2), value=n, interactive=n > 1),
                    weight: 1.0, effect: None, reweighted: None, files: files_,
                    message: f"{len(result.images)} image(s), {result.request.steps} steps "
                             f"({result.scheduler}), seed {result.request.seed}"
                             f"{', attention guidance' if result.request.sampling.layout or excite_ else ''}: "
                             f"{result.seconds:.1f} s"
                             + "".join(f". Note: {note}" for note in (explorer.cut_off(result),
                                                                        explorer.above_native(result)) if note)}

        @_page_errors(message)
        def on_view(result, word, index, res, at):
            if result is None:
                raise ValueError("generate an image first")
            return {**draw(result, word, _image(index), res, int(at) - 1),
                    weight: result.weights.get(word, 1.0), message: ""}

        @_page_errors(message)
        def on_step(result, word, index, res, at):
            if result is None:
                raise ValueError("generate an image first")
            return draw_step(result, word, _image(index), res, int(at) - 1)

        @_page_errors(message)
        def on_weight(result, word, index, value):
            if result is None or not word:
                raise ValueError("generate an image and click a word first")
            changed, shown, used = explorer.reweight(result, word, value, _image(index))
            said = ", ".join(f"{w} x {v:g}" for w, v in used.items()) or "every word at 1"
            return {reweighted: gr.Image(changed, label=f"reweighted: {said}"),
                    effect: gr.Image(shown, label=f"effect of {said} ({result.effect_scale})"),
                    message: f"regenerated with {said}",
                    files: _downloads(result)}                                    # the reweighted PNGs among them

        inputs = [prompt, negative, seed, steps, guidance, scheduler, model, size, count, place, excite, boxes]
        everything = [state, *views, words, resolution, which, step, weight, effect, reweighted, files, message]
        # one progress display, in the message; the earlier result stays in view until the new one replaces it
        for submitted in (generate.click(on_generate, inputs, everything, api_name="generate",
                                         concurrency_id="sampling", show_progress_on=message),
                          prompt.submit(on_generate, inputs, everything, api_name=False, concurrency_id="sampling",
                                        show_progress_on=message)):
            submitted.then(None, js=SHOW_MESSAGE)  # an error below the window's edge looked like a dead button
        view_in, view_out = [state, words, which, resolution, step], [*views, weight, message]
        for chooser in (words, which, resolution):
            chooser.input(on_view, view_in, view_out, api_name=False, concurrency_limit=4)
        for moved in (step.input, step.release):  # a drag's last position always draws, after the ones before it
            moved(on_step, view_in, [x0, step_map, message], api_name=False, trigger_mode="always_last",
                  concurrency_limit=1, concurrency_id="step")
        weight.input(on_weight, [state, words, which, weight], [reweighted, effect, files, message],
                     api_name="reweight", concurrency_id="sampling", trigger_mode="always_last")
    app.queue(max_size=lim.max_queue, default_concurrency_limit=lim.concurrency)
    return app


def busy_script(limits) -> str:
    """Page script: Gradio's 'This application is currently busy' toast (a full queue), said in t2i's words."""
    said = (f"The explorer's queue is full ({limits.max_queue} waiting, {limits.concurrency} sampling): try again in "
            "a minute, or run t2i generate on your own machine.")
    return f"""() => new MutationObserver(() => {{
        for (const toast of document.querySelectorAll('.toast-body')) {{
            const walk = document.createTreeWalker(toast, NodeFilter.SHOW_TEXT);
            for (let node = walk.nextNode(); node; node = walk.nextNode())
                if (node.nodeValue.includes('currently busy')) node.nodeValue = {json.dumps(said)};
        }}
    }}).observe(document.body, {{childList: true, subtree: true, characterData: true}})"""


def serve(explorer: Explorer, host: str = "127.0.0.1", port: int | None = None) -> tuple[gr.Blocks, str]:
    """Start the page on host:port (port None: 7860 or the next free one) in a background thread; returns
    (app, url). app.block_thread() waits until Ctrl+C, app.close() stops it."""
    app = build_app(explorer)
    _, url, _ = app.launch(server_name=host, server_port=port, show_error=False, ssr_mode=False, quiet=True,
                           allowed_paths=[str(explorer.files_dir)], prevent_thread_lock=True, theme=THEME, css=CSS,
                           footer_links=[], state_session_capacity=explorer.limits.sessions,
                           js=busy_script(explorer.limits))
    return app, url
