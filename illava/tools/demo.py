"""A small local web demo: an image, several images or a video and a question in; the answer, the token counts
of both stages and the merge-source heatmaps out.

    pip install 'illava[demo]'
    python -m illava.tools.demo                        # the built-in default model, http://127.0.0.1:7860
    python -m illava.tools.demo --model_path CHECKPOINT --host 0.0.0.0 --port 8000

It binds to 127.0.0.1 unless `--host` says otherwise and never opens a public share link unless `--share`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from .cli import (ATTN_IMPLEMENTATIONS, CliError, Visual, check_device_and_attention, infer, load_model,
                  load_timed_video, open_image, question_text)
from ..config import IllavaConfig
from .default_model import EXAMPLE_QUESTION, SUGGESTED_SETTINGS


class DemoSession:
    """Holds the loaded model; `handle` is what the page calls (and what tests call without a browser)."""

    def __init__(self, model, processor, description: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 question: str = "Describe the image.", config: IllavaConfig | None = None):
        self.model, self.processor, self.description = model, processor, description
        self.question, self.config = question, config or IllavaConfig()  # what the page starts with
        self.device, self.dtype = device, dtype
        self.output_root = Path(tempfile.mkdtemp(prefix="illava-demo-"))
        self.calls = 0

    def handle(self, image_paths: list[str] | None, video_path: str | None, question: str, vit_k: str, vit_r: str,
               llm_k: str, llm_r: str, enable_vit: bool, enable_llm: bool, max_frames: int = 16,
               max_new_tokens: int = 32) -> tuple[str, str, list[str]]:
        """Returns (answer, a markdown report, heatmap image paths); bad input becomes a readable message."""
        try:
            visual = self._visual(image_paths, video_path, max_frames)
            config = IllavaConfig(
                enable_illava_vit=enable_vit, illava_vit_k=vit_k, illava_vit_r=vit_r,
                enable_illava_llm=enable_llm, illava_llm_k=llm_k, illava_llm_r=llm_r,
                illava_track_vit_source=True, illava_track_llm_source=True,
            )
            self.calls += 1
            results, heatmaps = infer(
                self.model, self.processor, visual, question_text(question or "Describe the image."), config,
                device=self.device, dtype=self.dtype, max_new_tokens=max_new_tokens, compare=True,
                output_dir=self.output_root / f"call-{self.calls}",
            )
        except (CliError, ValueError) as error:
            return "", f"**Error:** {error}", []
        merged, baseline = results["illava"], results["baseline"]
        lines = [f"Model: {self.description}", "", *[f"- {line}" for line in merged.report], "",
                 f"- prompt tokens: {merged.prompt_tokens} with iLLaVA, {baseline.prompt_tokens} without",
                 f"- baseline answer: {baseline.answer}"]
        return merged.answer, "\n".join(lines), [str(path) for path in heatmaps]

    @staticmethod
    def _visual(image_paths, video_path, max_frames: int) -> Visual:
        if video_path:
            frames, timing = load_timed_video(Path(video_path), max_frames)
            return Visual("video", [frames], timing)
        if not image_paths:
            raise CliError("give an image, several images, or a video")
        images = [open_image(Path(path)) for path in image_paths]
        return Visual("image" if len(images) == 1 else "images", images)


def import_gradio():
    try:
        import gradio
    except ImportError:
        raise CliError("the demo page needs gradio: pip install 'illava[demo]'") from None
    return gradio


def build_app(session: DemoSession):
    gr = import_gradio()
    defaults = session.config
    with gr.Blocks(title="illava demo") as app:
        gr.Markdown(f"# illava: iLLaVA token merging\n{session.description}")
        with gr.Row():
            with gr.Column():
                images = gr.File(label="image(s)", file_count="multiple", file_types=["image"], type="filepath")
                video = gr.Video(label="or a video")
                question = gr.Textbox(label="question", value=session.question)
                with gr.Row():
                    enable_vit = gr.Checkbox(label="ViT stage", value=True)
                    vit_k = gr.Textbox(label="illava_vit_k", value="-".join(map(str, defaults.illava_vit_k)))
                    vit_r = gr.Textbox(label="illava_vit_r", value=str(defaults.illava_vit_r))
                with gr.Row():
                    enable_llm = gr.Checkbox(label="LLM stage", value=True)
                    llm_k = gr.Textbox(label="illava_llm_k", value="-".join(map(str, defaults.illava_llm_k)))
                    llm_r = gr.Textbox(label="illava_llm_r", value=str(defaults.illava_llm_r))
                run = gr.Button("Answer")
            with gr.Column():
                answer = gr.Textbox(label="answer")
                report = gr.Markdown()
                heatmaps = gr.Gallery(label="merge sources per layer")
        run.click(session.handle, [images, video, question, vit_k, vit_r, llm_k, llm_r, enable_vit, enable_llm],
                  [answer, report, heatmaps])
    return app


def port_number(text: str) -> int:
    """argparse type: a TCP port, 1 to 65535."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1 to 65535)")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", help="a checkpoint folder (default: the built-in default model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=port_number, default=7860)
    parser.add_argument("--share", action="store_true", help="ask gradio for a public share link")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--attn_implementation", default="sdpa", choices=ATTN_IMPLEMENTATIONS)
    args = parser.parse_args(argv)
    try:  # cheapest first: loading the model takes a while and is wasted if the page cannot be served
        import_gradio()
        check_device_and_attention(args.device, args.attn_implementation, args.dtype)
        model, processor, description = load_model(args)
    except CliError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    session = DemoSession(model, processor, description, args.device, getattr(torch, args.dtype))
    if args.model_path is None:  # settings that fit the small default model (6 vision and 4 decoder layers)
        session.question, session.config = EXAMPLE_QUESTION, IllavaConfig(**SUGGESTED_SETTINGS)
    build_app(session).launch(server_name=args.host, server_port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())

