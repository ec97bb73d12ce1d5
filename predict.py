"""Classify image files with a trained model: the top 3 CIFAR-10 classes of each, with probabilities.

    python predict.py results/reference/<run>/model.pt cat.png ship.jpg
    cat.png: cat 91.2 %, dog 5.1 %, frog 1.0 %

The model is a file written by `python evaluate.py --export`, any checkpoint evaluate.py accepts, or a run
folder (its best.pt, else model.pt), loaded the same safe way. Each image, of any size and mode, becomes what
the model was trained on (RGB, 32x32, normalised as evaluation does); CIFAR-10 itself is never read.
"""

import argparse
import os
import sys

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from augment import eval_transform
from data import CLASSES, DataError
from cli import DEVICE_HELP, OneLineParser, resolve_device
from evaluate import model_from_checkpoint
from train import eval_batch_size, load_checkpoint

SIZE = 32  # CIFAR-10's images, all the model has seen


def load_image(path: str) -> torch.Tensor:
    """The image at `path` as CIFAR-10 stores one: uint8 (3, 32, 32), RGB."""
    if not os.path.isfile(path):
        raise DataError(f"no image at {path}")
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)  # a phone's photo is stored sideways, with its turn in EXIF
            # Bicubic: PIL widens it by the scale factor when shrinking, so every pixel of a large photo counts
            # (nearest would sample a few: aliasing); sharper than bilinear, rings less than Lanczos. The whole
            # image is squeezed into the square, as CIFAR-10's were; crop first to keep a wide one's proportions.
            im = im.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC)
            return torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(SIZE, SIZE, 3).permute(2, 0, 1)
    except UnidentifiedImageError:
        raise DataError(f"{path} is not an image (PIL does not recognise its format)") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # truncated or corrupt files
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"cannot read the image {path}: {why}") from None


@torch.inference_mode()
def predict(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Class probabilities (B, classes) of uint8 images (B, 3, 32, 32), normalised as evaluation normalises."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model(eval_transform(chunk.to(device))).float().softmax(1).cpu()
                      for chunk in images.split(eval_batch_size(device))])


def format_top(name: str, probs: torch.Tensor) -> str:
    p, idx = probs.topk(3)
    return f"{name}: " + ", ".join(f"{CLASSES[i]} {100 * v:.1f} %" for v, i in zip(p.tolist(), idx.tolist()))


def main(argv=None):
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a model file written by evaluate.py --export, a checkpoint (best.pt, "
                                      "last.pt) or a run folder: its best.pt (else model.pt)")
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="image files PIL can read (PNG, JPEG, ...), any size and mode: each becomes 32x32 RGB")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
        model = model_from_checkpoint(load_checkpoint(args.model), device)
        # every image read before any is printed: one bad file stops the run with nothing half done
        images = torch.stack([load_image(path) for path in args.images])
    except DataError as e:  # it writes nothing, so no other error of the project's can reach here
        sys.exit(f"error: {e}")
    for path, p in zip(args.images, predict(model, images)):
        print(format_top(path, p))


if __name__ == "__main__":
    main()
