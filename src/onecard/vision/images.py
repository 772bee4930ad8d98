"""Image input: a path, raw bytes, a PIL image or a ``data:`` URL, checked before the model sees it.

Pixel count is checked from the header before decoding, so a decompression
bomb or a 100-megapixel scan fails fast instead of filling memory; the model's
own processor (``load_processor``) then resizes/crops to its input size.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path

from onecard.errors import BadInputError

# 40 Mpx: any photo a phone or camera takes; the model sees 336x336 anyway. Raise it with max_pixels / --max-image-pixels.
DEFAULT_MAX_PIXELS = 40_000_000


def load_image(image, max_pixels: int = DEFAULT_MAX_PIXELS):
    """Return an RGB ``PIL.Image`` from a path, bytes, a PIL image or a ``data:image/...;base64,`` URL.

    Raises ``BadInputError`` naming the problem: missing file, not an image,
    corrupt/truncated file, too many pixels (with the limit and how to raise it),
    or a web URL (onecard never downloads).
    """
    from PIL import Image

    if max_pixels < 1:
        raise BadInputError(f"max_pixels={max_pixels}: must be a positive number of pixels, e.g. {DEFAULT_MAX_PIXELS}")
    if isinstance(image, Image.Image):
        _check_size(image.size, max_pixels, "the image")
        return image.convert("RGB")
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _decode(bytes(image), "the image bytes", max_pixels)
    if isinstance(image, (Path, str)):
        s = str(image)
        if s.startswith("data:"):
            return _decode(decode_data_url(s), "the data: URL", max_pixels)
        if s.startswith(("http://", "https://")):
            raise BadInputError(f"'{s[:80]}' is a web URL and onecard never downloads; save the image and pass "
                                "its path, or pass a data:image/...;base64 URL")
        p = Path(s).expanduser()
        if not p.exists():
            raise BadInputError(f"image file '{p}' does not exist; pass the path of a PNG/JPEG/WebP/... image")
        if p.is_dir():
            raise BadInputError(f"'{p}' is a folder, not an image file; pass the path of one image")
        return _decode(p.read_bytes(), f"'{p}'", max_pixels)
    raise BadInputError(f"image must be a path, bytes, a PIL image or a data: URL, not {type(image).__name__}")


def decode_data_url(url: str) -> bytes:
    """The bytes of a ``data:image/<type>;base64,<payload>`` URL (what OpenAI-style ``image_url`` parts carry)."""
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise BadInputError(f"'{url[:40]}...' is not a data:image/<type>;base64,<data> URL; encode the image "
                            "as base64 with an image/* media type")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadInputError("the data: URL's base64 payload does not decode; re-encode the image") from None


def _check_size(size: tuple[int, int], max_pixels: int, what: str) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise BadInputError(f"{what} is {w}x{h} pixels; pass a non-empty image")
    if w * h > max_pixels:
        raise BadInputError(f"{what} is {w}x{h} = {w * h / 1e6:.1f} Mpx, above the {max_pixels / 1e6:g} Mpx limit; "
                            "downscale it, or raise the limit with max_pixels= / --max-image-pixels")


def _decode(data: bytes, what: str, max_pixels: int):
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise BadInputError(f"{what} is empty (0 bytes); pass an image file")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadInputError(f"{what} is not an image PIL can read (PNG, JPEG, WebP, GIF, BMP, TIFF...); "
                            "pass an image file") from None
    except Image.DecompressionBombError:
        raise BadInputError(f"{what} declares an absurd pixel count (decompression bomb?); pass a normal image") from None
    _check_size(img.size, max_pixels, what)  # from the header: nothing decoded yet
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadInputError(f"{what} is a corrupt or truncated {img.format or 'image'} file ({exc}); "
                            "export or download it again") from None
    return img.convert("RGB")
