"""Image input, prompt format and LLaVA folder validation: every bad input gives one clear line."""

from __future__ import annotations

import base64
import io
import json
import shutil

import pytest
from PIL import Image, ImageDraw

from onecard.errors import BadInputError, ModelFolderError, UnsupportedModelError
from onecard.vision.images import decode_data_url, load_image
from onecard.vision.loader import load_processor, open_llava_folder
from onecard.vision.prompt import LLAVA_15_FORMAT, build_prompt
from onecard.vision.testing import make_llava_checkpoint


def shapes_image(w: int = 160, h: int = 120) -> Image.Image:
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([10, 10, 70, 60], fill="red")
    d.ellipse([80, 40, 150, 110], fill="blue")
    return img


def png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def llava_dir():
    return make_llava_checkpoint(image_size=112, init_std=0.2)


def test_every_input_kind_gives_the_same_rgb_pixels(tmp_path):
    img = shapes_image()
    data = png_bytes(img)
    (tmp_path / "a.png").write_bytes(data)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    outs = [load_image(tmp_path / "a.png"), load_image(str(tmp_path / "a.png")), load_image(data), load_image(url),
            load_image(img.convert("RGBA"))]
    for o in outs:
        assert o.mode == "RGB" and o.size == (160, 120)
        assert o.tobytes() == img.tobytes()
    jpg = load_image(png_bytes(img, "JPEG"))
    assert jpg.size == (160, 120) and jpg.getpixel((40, 35))[0] > 200  # red stays red through JPEG


def test_not_an_image(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello, not pixels")
    with pytest.raises(BadInputError, match="not an image PIL can read"):
        load_image(f)


def test_corrupt_image(tmp_path):
    data = png_bytes(shapes_image())
    f = tmp_path / "cut.png"
    f.write_bytes(data[: len(data) // 2])  # header intact, pixel data truncated
    with pytest.raises(BadInputError, match="corrupt or truncated PNG"):
        load_image(f)


def test_too_large_image_names_limit_and_fix(tmp_path):
    f = tmp_path / "big.png"
    shapes_image(400, 300).save(f)
    with pytest.raises(BadInputError, match=r"400x300 = 0.1 Mpx, above the 0.1 Mpx limit.*--max-image-pixels"):
        load_image(f, max_pixels=100_000)
    assert load_image(f, max_pixels=120_000).size == (400, 300)


def test_other_bad_inputs(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(BadInputError, match="never downloads"):
        load_image("https://example.com/cat.png")
    with pytest.raises(BadInputError, match="is empty"):
        load_image(b"")
    with pytest.raises(BadInputError, match="not a data:image"):
        decode_data_url("data:text/plain;base64,aGVsbG8=")
    with pytest.raises(BadInputError, match="does not decode"):
        decode_data_url("data:image/png;base64,@@@")
    with pytest.raises(BadInputError, match="must be a path"):
        load_image(42)


def test_prompt_uses_llava15_format(llava_dir):
    proc = load_processor(open_llava_folder(llava_dir))
    want = LLAVA_15_FORMAT.format(image="<image>", question="What is red?")
    assert build_prompt(proc, "What is red?") == want  # the chat template
    assert build_prompt(proc, "What is red?", use_chat_template=False) == want
    with pytest.raises(BadInputError, match="question is empty"):
        build_prompt(proc, "  ")
    with pytest.raises(BadInputError, match="image placeholder"):
        build_prompt(proc, "<image> what?")


def test_processor_expands_image_token_to_patches(llava_dir):
    lf = open_llava_folder(llava_dir)
    proc = load_processor(lf)
    out = proc(images=shapes_image(), text=build_prompt(proc, "Shapes?"), return_tensors="pt")
    assert tuple(out["pixel_values"].shape) == (1, 3, 112, 112)  # resized + center-cropped to the tower's input
    assert int((out["input_ids"] == lf.image_token_index).sum()) == (112 // 14) ** 2


def test_text_model_without_vision_tower(random_checkpoint):
    with pytest.raises(UnsupportedModelError, match="no vision tower"):
        open_llava_folder(random_checkpoint("llama-2-7b"))


def test_missing_processor_files(llava_dir, tmp_path):
    broken = tmp_path / "llava"
    shutil.copytree(llava_dir, broken)
    (broken / "preprocessor_config.json").unlink()
    proc = json.loads((broken / "processor_config.json").read_text())
    proc.pop("image_processor")
    (broken / "processor_config.json").write_text(json.dumps(proc))
    with pytest.raises(ModelFolderError, match="no image processor settings"):
        open_llava_folder(broken)


def test_tokenizer_without_image_token(llava_dir, tmp_path):
    broken = tmp_path / "llava"
    shutil.copytree(llava_dir, broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["image_token_index"] = 5
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFolderError, match="image_token_index is 5"):
        load_processor(open_llava_folder(broken))


def test_vision_weights_missing(llava_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "llava"
    shutil.copytree(llava_dir, broken)
    tensors = load_file(broken / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if "vision_tower" not in k}, broken / "model.safetensors")
    with pytest.raises(ModelFolderError, match="no vision_tower weights"):
        open_llava_folder(broken)
