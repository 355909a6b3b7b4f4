"""`python -m illava.tools.align`: check a packing encoder against its transformers model on one checkpoint.

    python -m illava.tools.align --model dinov3 --ckpt /path/to/dinov3-vitb16 --image_size 224 336x448

`--batch_size` images of every `--image_size` (a side, or HxW) go into ONE call of the packing encoder
(`illava.models.packing_encoders`); each image also goes alone through the transformers model. Every patch token of
the packed `last_hidden_state` is compared with the same token of the transformers `last_hidden_state` (DINOv3's CLS
and register tokens left out) by cosine similarity; the report gives the minimum and mean per size. PASS when every
size's minimum reaches `--threshold`, else FAIL and exit status 1.

Images are random (seeded) unless `--use_real_images`: then the files of `--image_paths`, or without them a few
generated natural-like images (smooth colour fields with edges), each resized to the size and scaled to [-1, 1].
Nothing is downloaded: `--ckpt` is a local directory or a checkpoint already in the Hugging Face cache. It must
hold every weight of the `--model` transformers model (another encoder's checkpoint is refused, exit status 2).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
import torch.nn.functional as F

from ..models.packing_encoders import (
    AIMv2Packing,
    DINOv3ViTPacking,
    PackingEncoder,
    Siglip2NaflexPacking,
    convert_to_packing_format,
)

ENCODERS: dict[str, type[PackingEncoder]] = {
    "aimv2": AIMv2Packing,
    "dinov3": DINOv3ViTPacking,
    "siglip2": Siglip2NaflexPacking,
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_size(text: str) -> tuple[int, int]:
    """"224" -> (224, 224); "336x448" -> (336, 448) (height x width, pixels)."""
    parts = text.lower().split("x")
    try:
        height, width = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (224 or 336x448)") from None
    if len(parts) > 2 or height < 1 or width < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (224 or 336x448)")
    return height, width


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m illava.tools.align", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, choices=sorted(ENCODERS))
    parser.add_argument("--ckpt", required=True, help="checkpoint of the transformers model (local directory)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--batch_size", type=int, default=2, help="images per size")
    parser.add_argument("--image_size", type=parse_size, nargs="+", default=[(224, 224)],
                        help="sizes in pixels, multiples of the patch size: 224 or 336x448")
    parser.add_argument("--threshold", type=float, default=0.99, help="lowest acceptable token cosine similarity")
    parser.add_argument("--use_real_images", action="store_true")
    parser.add_argument("--image_paths", nargs="+", default=[], help="image files for --use_real_images")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def natural_like_images(count: int, seed: int) -> list[np.ndarray]:
    """`count` 96x96 RGB uint8 images: smooth colour gradients with a few flat rectangles (edges) on top."""
    rng = np.random.default_rng(seed)
    side = 96
    images = []
    for _ in range(count):
        coarse = torch.from_numpy(rng.uniform(0, 255, (1, 3, 4, 4))).float()
        image = F.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=False)[0]
        for _ in range(3):
            top, left = rng.integers(0, side - 16, 2)
            height, width = rng.integers(8, side // 2, 2)
            image[:, top : top + height, left : left + width] = torch.from_numpy(rng.uniform(0, 255, (3, 1, 1))).float()
        images.append(image.clamp(0, 255).permute(1, 2, 0).round().byte().numpy())
    return images


def load_images(paths: list[str], count: int, seed: int) -> list[np.ndarray]:
    if not paths:
        return natural_like_images(count, seed)
    from PIL import Image

    return [np.asarray(Image.open(path).convert("RGB")) for path in paths]


def image_batch(args, size: tuple[int, int], channels: int, real: list[np.ndarray] | None, seed: int) -> torch.Tensor:
    """`[batch_size, C, H, W]` in [-1, 1]: random, or the real images (cycled) resized to `size`."""
    if real is None:
        generator = torch.Generator().manual_seed(seed)
        return torch.rand(args.batch_size, channels, *size, generator=generator) * 2 - 1
    from PIL import Image

    pictures = [real[index % len(real)] for index in range(args.batch_size)]
    resized = [np.asarray(Image.fromarray(p).resize(size[::-1], Image.BICUBIC), dtype=np.float32) for p in pictures]
    return torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2) / 127.5 - 1


def standard_patch_tokens(model: str, standard, image: torch.Tensor, patch_size: int, prefix: int) -> torch.Tensor:
    """`[h*w, D]` patch tokens of the transformers model's `last_hidden_state` for one image `[1, C, H, W]`."""
    if model == "siglip2":
        patches, grid_thw = convert_to_packing_format(image, patch_size)
        mask = torch.ones(1, patches.shape[0], dtype=torch.long, device=image.device)
        output = standard(pixel_values=patches[None], pixel_attention_mask=mask, spatial_shapes=grid_thw[:, 1:])
    else:
        output = standard(pixel_values=image)
    return output.last_hidden_state[0, prefix:]


def load_standard(parser: argparse.ArgumentParser, args, dtype: torch.dtype):
    """The transformers model of `--model` from `--ckpt`, every weight of it loaded from the checkpoint.

    `from_pretrained` only warns about weights it cannot find and initialises them randomly; the packing encoder
    shares them, so both sides would agree on noise (a PASS that checks nothing). Missing weights, and checkpoint
    weights under the model's own top-level names that it has no place for, are a parser error naming them.
    Checkpoint weights under other names are left out: e.g. the text tower of a full SigLIP2 checkpoint.
    (Wrongly shaped weights make `from_pretrained` raise.)
    """
    standard_class = ENCODERS[args.model].standard_class
    standard, loading = standard_class.from_pretrained(args.ckpt, local_files_only=True, dtype=dtype,
                                                       output_loading_info=True)
    namespaces = {key.split(".")[0] for key in standard.state_dict()}
    missing, unexpected = loading["missing_keys"], loading["unexpected_keys"]
    foreign = [key for key in unexpected if key.split(".")[0] not in namespaces]
    if missing or len(foreign) < len(unexpected):
        problems = [f"{len(keys)} {kind} weight(s): {', '.join(sorted(keys)[:4])}{', ...' if len(keys) > 4 else ''}"
                    for kind, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        parser.error(f"--ckpt {args.ckpt} does not fit --model {args.model} ({standard_class.__name__}): "
                     + "; ".join(problems))
    if foreign:
        print(f"{args.model}: left out {len(foreign)} checkpoint weight(s) outside {standard_class.__name__}")
    return standard


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch_size {args.batch_size} must be at least 1")
    encoder_class = ENCODERS[args.model]
    dtype = DTYPES[args.dtype]
    standard = load_standard(parser, args, dtype).to(args.device).eval()
    packing = encoder_class(standard)  # shares the weights
    patch = packing.patch_size
    for height, width in args.image_size:
        if height % patch or width % patch:
            parser.error(f"--image_size {height}x{width} is not a multiple of the patch size {patch}")
    real = load_images(args.image_paths, args.batch_size, args.seed) if args.use_real_images else None

    batches = [image_batch(args, size, packing.config.num_channels, real, args.seed + index).to(args.device, dtype)
               for index, size in enumerate(args.image_size)]
    with torch.no_grad():
        packed = [convert_to_packing_format(images, patch) for images in batches]
        output = packing(torch.cat([patches for patches, _ in packed]), torch.cat([grid for _, grid in packed]))
        produced = output.last_hidden_state.float()
        print(f"{args.model}: {type(packing).__name__} vs {encoder_class.standard_class.__name__} ({args.ckpt}, "
              f"{args.device}, {args.dtype}); {len(batches)} size(s) x {args.batch_size} image(s), "
              f"{produced.shape[0]} patches in one packed call; "
              f"{'real' if args.use_real_images else 'random'} images")
        passed = True
        start = 0
        for (height, width), images in zip(args.image_size, batches):
            expected = torch.cat([
                standard_patch_tokens(args.model, standard, image[None], patch, packing.num_prefix_tokens)
                for image in images
            ]).float()
            mine = produced[start : start + expected.shape[0]]
            start += expected.shape[0]
            cosine = F.cosine_similarity(mine, expected, dim=-1)
            worst, mean = float(cosine.min()), float(cosine.mean())
            ok = bool(torch.isfinite(cosine).all()) and worst >= args.threshold
            passed &= ok
            print(f"  {height}x{width}: {images.shape[0]} image(s), {expected.shape[0]} tokens, cosine min {worst:.6f} "
                  f"mean {mean:.6f}, max |diff| {float((mine - expected).abs().max()):.2e}  {'PASS' if ok else 'FAIL'}")
    print(f"{'PASS' if passed else 'FAIL'} (threshold {args.threshold})")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
