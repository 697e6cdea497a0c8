"""Reading images safely: one clear message for anything that is not a usable picture.

Pillow decodes lazily, so the header is checked (size limit against decompression bombs) before any pixels are
decoded; EXIF orientation is honoured, animations give their first frame, every mode becomes RGB (transparency is
composited on white, 16-bit and CMYK are converted).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from par_demo.errors import UserError

MAX_PIXELS = 64_000_000  # ~8000 x 8000; more is refused before decoding
MAX_FILE_BYTES = 50 * 1024 * 1024
MIN_SIDE = 1
# Longest side over shortest: Qwen2.5-VL's processor refuses 200 and more, CLIP's resizes the short side to 336 px
# (a 1 x 3000 strip would become 336 x 1,008,000); no photo is that thin.
MAX_ASPECT = 100


def load_image(source) -> Image.Image:
    """A path, bytes or PIL image -> an RGB PIL image, or UserError with one clear line."""
    if isinstance(source, Image.Image):
        check_shape(*source.size, "the image")
        return to_rgb(source)
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
        name = "the uploaded image"
    else:
        if source is None or (isinstance(source, str) and not source.strip()):
            raise UserError("no image given")
        if not isinstance(source, (str, os.PathLike)):
            raise UserError(f"an image is a file path, bytes or a PIL image, got {type(source).__name__}")
        path = Path(os.fspath(source))
        name = f"'{path.name}'"
        if path.is_dir():
            raise UserError(f"{path} is a folder: give one image file")
        if not path.is_file():
            raise UserError(f"image {path} not found")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise UserError(f"image {name} is larger than {MAX_FILE_BYTES // 2**20} MB")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise UserError(f"cannot read image {name}: {exc.strerror or exc}") from None
    if not data:
        raise UserError(f"{name} is empty (0 bytes)")
    return decode(data, name)


def decode(data: bytes, name: str = "the image") -> Image.Image:
    return to_rgb(opened(io.BytesIO(data), name, decode=True))


def check_file(path, name: str) -> None:
    """What `load_image` checks of a file before decoding it (Pillow knows it, its size and shape are within the
    limits), from its header alone: a quick look at many files (a photo folder to train on)."""
    try:
        with open(path, "rb") as file:
            opened(file, name, decode=False)
    except OSError as exc:
        raise UserError(f"cannot read image {name}: {exc.strerror or exc}") from None


def opened(file, name: str, decode: bool) -> Image.Image:
    """The image in `file`, its header checked, its first frame decoded if asked; else one UserError line."""
    try:
        image = Image.open(file)
        width, height = image.size
        if width * height > MAX_PIXELS:
            raise UserError(f"{name} is too large ({width}x{height} pixels; the limit is {MAX_PIXELS:,} pixels)")
        check_shape(width, height, name)
        if decode:
            image.seek(0)  # animated GIF/WebP: the first frame
            image.load()
    except UserError:
        raise
    except Image.DecompressionBombError:  # Pillow's own guard fired first (its header check is at open)
        raise UserError(f"{name} is too large (the limit is {MAX_PIXELS:,} pixels)") from None
    except UnidentifiedImageError:
        raise UserError(f"{name} is not an image Pillow can read") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise UserError(f"{name} is damaged or truncated ({exc.__class__.__name__})") from None
    return image


def check_shape(width: int, height: int, name: str) -> None:
    if min(width, height) < MIN_SIDE:
        raise UserError(f"{name} has no pixels")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise UserError(f"{name} is {width}x{height} pixels: its long side is more than {MAX_ASPECT} times its "
                        "short side; crop it to a less extreme shape")


def to_rgb(image: Image.Image) -> Image.Image:
    try:
        image = ImageOps.exif_transpose(image) or image
    except Exception:  # a broken EXIF block must not lose the picture
        pass
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit integer grey: scale to 8 bits rather than clip.
        image = image.point(lambda v: v / 256).convert("L")
    return image.convert("RGB")
