"""`hf-vlm serve`: a small gradio page to try one checkpoint by hand.

    hf-vlm serve --checkpoint outputs/demo/final            # http://127.0.0.1:7860

Drop a PNG/JPG slice (or upload a DICOM / NIfTI file) and read the report as it is generated,
with the decoding settings on sliders. On a study checkpoint (its processor has study settings)
the file widget also takes a `.zip` of a DICOM series, the upload becomes one `Study` with the
checkpoint's settings (`serve_uploads`), and a strip shows the slices the model saw. The model
is loaded through `hf_vlm.inference`, so the page runs with the checkpoint's training settings
exactly like `hf-vlm generate`. It listens on 127.0.0.1 by default: a radiology model on a
public port is a decision to make on purpose (`--host 0.0.0.0`). gradio is optional: `pip install hf_vlm[serve]`.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading

from ..data.images import DEFAULT_MAX_SLICES, IMAGE_SUFFIXES
from .generate import add_checkpoint_arguments

DICOM_TYPES = [*IMAGE_SUFFIXES, ".gz"]  # ".gz": upload widgets match the last suffix of .nii.gz
STUDY_TYPES = [*DICOM_TYPES, ".zip"]  # study checkpoints: a zipped DICOM series too


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="folder with the saved model and processor")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument(
        "--max_image_pixels",
        type=int,
        default=None,
        help="refuse larger images on every input (default: PIL.Image.MAX_IMAGE_PIXELS, ~89 MP)",
    )
    parser.add_argument("--max_file_size", default="200mb", help="largest upload gradio accepts (e.g. 200mb)")
    add_checkpoint_arguments(parser)


def public_message(error: Exception, path) -> str:
    """The error text with the server's temp path replaced by the uploaded file's name."""
    text = str(error)
    if isinstance(path, (str, os.PathLike)) and str(path):
        full = str(path)
        text = text.replace(full, os.path.basename(full)).replace(os.path.dirname(full) + os.sep, "")
    return text


def load_upload(path, max_image_pixels: int | None = None) -> list:
    """Images of one upload (image widget or file widget): the same loader and pixel limit for both."""
    from ..data.images import load_images

    return load_images(str(path), max_slices=DEFAULT_MAX_SLICES, max_image_pixels=max_image_pixels)


def _checked_pil(image, max_image_pixels: int | None):
    """An already decoded PIL image (API callers): the same pixel limit as files."""
    from PIL import Image

    from ..data.images import ImageLoadError

    limit = Image.MAX_IMAGE_PIXELS if max_image_pixels is None else max_image_pixels
    if limit and image.width * image.height > limit:
        raise ImageLoadError(
            f"{image.width}x{image.height} = {image.width * image.height} pixels exceeds the "
            f"limit of {limit} (--max_image_pixels)"
        )
    return [image.convert("RGB")]


def _study_of(image, file, max_image_pixels, settings):
    """A study checkpoint's input: the upload (or an API caller's PIL image) as one `Study`."""
    from .serve_uploads import load_study_upload, study_of_pil

    if file or isinstance(image, (str, os.PathLike)):
        return load_study_upload(file or image, settings, max_image_pixels)
    return study_of_pil(_checked_pil(image, max_image_pixels)[0], settings, max_image_pixels)


def make_generate_fn(model, processor, max_image_pixels: int | None = None):
    """The page's callback: (image, file, prompt, settings...) -> report text, yielded as it grows.

    Both widgets deliver a file path and go through `load_upload`, so the decompression-bomb
    limit holds on every input path and the image is never decoded before it is checked.
    Error messages name the uploaded file, never the server's temp folder. On a study
    checkpoint it yields `(report, slices)`: the slice strip (image, caption) once, first, then
    `gr.skip()` for it while the text streams (the strip is not re-sent with every token).
    """
    from transformers import TextIteratorStreamer

    from ..data.images import ImageLoadError
    from ..inference import build_generate_kwargs, generate_batch
    from .serve_uploads import slice_captions

    lock = threading.Lock()  # one generation at a time: the model is shared
    settings = processor.study_settings

    def generate(
        image,
        file,
        prompt,
        max_new_tokens,
        repetition_penalty,
        no_repeat_ngram_size,
        num_beams,
        do_sample,
        temperature,
        top_p,
    ):
        import gradio as gr

        source = file or image
        if not file and image is None:
            kinds = ", a DICOM / NIfTI file or a zipped DICOM series" if settings else " or a DICOM / NIfTI file"
            raise gr.Error(f"Upload a CT image (PNG/JPG){kinds} first.")
        try:
            if settings is not None:
                study = _study_of(image, file, max_image_pixels, settings)
                images, strip = [study], list(zip(study.to_pil(), slice_captions(study)))
            elif file or isinstance(image, (str, os.PathLike)):
                images = load_upload(source, max_image_pixels)
            else:
                images = _checked_pil(image, max_image_pixels)
        except (ImageLoadError, ImportError) as exc:
            raise gr.Error(f"Cannot read the uploaded file: {public_message(exc, source)}") from exc
        if settings is None:
            out = lambda text, first=False: text  # noqa: E731 (2-D: the report only, as before)
        else:
            out = lambda text, first=False: (text, strip if first else gr.skip())  # noqa: E731
        kwargs = build_generate_kwargs(
            max_new_tokens=int(max_new_tokens),
            do_sample=bool(do_sample),
            temperature=float(temperature) if do_sample else None,
            top_p=float(top_p) if do_sample else None,
            num_beams=int(num_beams),
            repetition_penalty=float(repetition_penalty),
            no_repeat_ngram_size=int(no_repeat_ngram_size) or None,
        )
        prompt = (prompt or "").strip() or None
        with lock:
            if int(num_beams) > 1:  # transformers cannot stream beam search
                yield out(generate_batch(model, processor, [images], [prompt], **kwargs)[0], first=True)
                return
            if settings is not None:
                yield out("", first=True)  # the slices show while the report is generated
            streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
            result: dict = {}

            def work():
                try:
                    result["report"] = generate_batch(
                        model, processor, [images], [prompt], streamer=streamer, **kwargs
                    )[0]
                except Exception as exc:  # surfaced below, after the streamer is released
                    result["error"] = exc
                    streamer.end()

            thread = threading.Thread(target=work, daemon=True)
            thread.start()
            text = ""
            for piece in streamer:
                text += piece
                yield out(text.strip())
            thread.join()
            if "error" in result:
                raise gr.Error(f"Generation failed: {public_message(result['error'], source)}")
            yield out(result["report"])

    return generate


def _precision(settings: dict) -> str:
    return "8-bit" if settings["llm_8bit"] else "4-bit" if settings.get("llm_4bit") else "full precision"


def _study_line(study) -> str:
    """The header's note on a study checkpoint's preprocessing ('' for 2-D checkpoints)."""
    if study is None:
        return ""
    count = f"{study.num_slices} " if study.slice_sampling in ("uniform", "mip") else ""
    windows = "+".join(w.name or f"W{w.width:g}/L{w.level:g}" for w in study.windows)
    return f" · studies: {count}{study.slice_sampling} slices over the {study.extent} extent, {windows} window(s)"


def build_app(checkpoint: str, **load_kwargs):
    """The gradio Blocks for `checkpoint` (not launched). `load_kwargs` go to `load_for_inference`."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry, no version check
    import gradio as gr

    from ..inference import load_for_inference

    max_image_pixels = load_kwargs.pop("max_image_pixels", None)
    model, processor, settings = load_for_inference(checkpoint, **load_kwargs)
    for note in settings["notes"]:
        print(f"hf-vlm serve: note: {note}", file=sys.stderr)
    generate = make_generate_fn(model, processor, max_image_pixels)
    study = processor.study_settings
    with gr.Blocks(title="hf_vlm report demo", analytics_enabled=False) as app:
        gr.Markdown(
            f"## CT report generation\nCheckpoint `{os.path.basename(os.path.normpath(checkpoint))}` · "
            f"{settings['max_visual_tokens']} visual tokens · LLM {_precision(settings)}{_study_line(study)} "
            "· research use only, not a medical device."
        )
        with gr.Row():
            with gr.Column():
                # a path, not a decoded image: checked by the same loader and pixel limit as the file widget
                image = gr.Image(
                    type="filepath",
                    label="CT slice (PNG / JPG)",
                    sources=["upload", "clipboard"],
                    image_mode=None,
                    height=320,
                    elem_id="image",
                )
                file = gr.File(
                    label="…or a DICOM / NIfTI file (takes precedence)"
                    if study is None
                    else "…or a CT study: NIfTI, DICOM, or a .zip of one DICOM series (takes precedence)",
                    file_types=DICOM_TYPES if study is None else STUDY_TYPES,
                    type="filepath",
                    elem_id="file",
                )
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", value=processor.default_prompt, lines=2, elem_id="prompt")
                with gr.Accordion("Generation settings", open=True):
                    max_new_tokens = gr.Slider(8, 512, value=128, step=8, label="max_new_tokens")
                    repetition_penalty = gr.Slider(1.0, 2.0, value=1.0, step=0.05, label="repetition_penalty")
                    no_repeat = gr.Slider(0, 8, value=0, step=1, label="no_repeat_ngram_size (0 = off)")
                    num_beams = gr.Slider(1, 4, value=1, step=1, label="num_beams")
                    do_sample = gr.Checkbox(value=False, label="do_sample")
                    temperature = gr.Slider(0.1, 2.0, value=1.0, step=0.05, label="temperature (sampling)")
                    top_p = gr.Slider(0.1, 1.0, value=1.0, step=0.05, label="top_p (sampling)")
                button = gr.Button("Generate report", variant="primary", elem_id="generate")
                report = gr.Textbox(label="Report", lines=6, elem_id="report")
                outputs = [report]
                if study is not None:  # the slices the model saw, as loaded with the checkpoint's settings
                    outputs.append(
                        gr.Gallery(label="Slices the model saw", columns=8, height=260, format="png", elem_id="slices")
                    )
        button.click(
            generate,
            inputs=[
                image,
                file,
                prompt,
                max_new_tokens,
                repetition_penalty,
                no_repeat,
                num_beams,
                do_sample,
                temperature,
                top_p,
            ],
            outputs=outputs[0] if study is None else outputs,
            api_name="generate",
        )
    return app


def run(args) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("hf-vlm serve: gradio is not installed: pip install 'hf_vlm[serve]'", file=sys.stderr)
        return 2
    from ..inference import SettingsMismatchError

    try:
        app = build_app(
            args.checkpoint,
            max_visual_tokens=args.max_visual_tokens,
            llm_8bit=args.llm_8bit,
            llm_4bit=args.llm_4bit,
            device=args.device,
            dtype=args.dtype,
            max_image_pixels=args.max_image_pixels,
        )
    except (SettingsMismatchError, OSError, ValueError) as exc:
        print(f"hf-vlm serve: error: {exc}", file=sys.stderr)
        return 2
    app.queue().launch(server_name=args.host, server_port=args.port, max_file_size=args.max_file_size)
    return 0
