"""Open and validate a local Hugging Face model folder.

Every way a folder can be wrong (missing, no config, unsupported architecture,
missing/corrupt/truncated shard, dtype mismatch, no tokenizer, a GGUF file, a
hub id) ends in one ``ModelFolderError``/``UnsupportedModelError`` line that
says what to do. Validation reads only safetensors headers, never the weights.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from onecard.errors import ModelFolderError, UnsupportedModelError
from onecard.models.config import SUPPORTED_ARCHITECTURES, ModelArgs

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# safetensors dtype tag -> torch dtype name
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
              "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
_FLOAT = {"float64", "float32", "float16", "bfloat16"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path


@dataclass(frozen=True)
class ModelFolder:
    path: Path
    config: dict
    weight_files: tuple[Path, ...]
    tensors: dict[str, TensorInfo]
    has_tokenizer: bool

    @property
    def architecture(self) -> str:
        return (self.config.get("architectures") or ["?"])[0]

    @property
    def quantization_config(self) -> dict | None:
        return self.config.get("quantization_config")

    def model_args(self) -> ModelArgs:
        return ModelArgs.from_hf_config(self.config)

    def weight_dtype(self) -> str | None:
        """The dominant floating dtype of the stored weights (by element count)."""
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            if t.dtype in _FLOAT:
                counts[t.dtype] = counts.get(t.dtype, 0) + _numel(t.shape)
        return max(counts, key=counts.get) if counts else None

    def summary(self) -> dict:
        """What ``onecard inspect`` shows: the facts a user checks before planning a job on this folder."""
        stored = sum(_numel(t.shape) for t in self.tensors.values())
        out: dict = {
            "path": str(self.path),
            "architecture": self.architecture,
            "tensors": len(self.tensors),
            "stored_elements": stored,
            "weight_dtype": self.weight_dtype(),
            "config_dtype": self.config.get("torch_dtype") or self.config.get("dtype"),
            "shards": len(self.weight_files),
            "size_bytes": sum(f.stat().st_size for f in self.weight_files),
            "tokenizer": [t for t in TOKENIZER_FILES if (self.path / t).exists()],
            "quantization": (self.quantization_config or {}).get("quant_method"),
        }
        if self.architecture in SUPPORTED_ARCHITECTURES:
            a = self.model_args()
            out.update(parameters=a.num_parameters(), layers=a.num_layers, hidden_size=a.hidden_size,
                       heads=a.num_heads, kv_heads=a.num_kv_heads, head_dim=a.head_dim, vocab_size=a.vocab_size,
                       context=a.max_position_embeddings, rope_theta=a.rope_theta,
                       rope_scaling=(a.rope_scaling or {}).get("rope_type"), tied_embeddings=a.tie_word_embeddings)
        return out

    def load_tokenizer(self):
        if not self.has_tokenizer:
            raise ModelFolderError(_no_tokenizer(self.path))
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.path))

    def iter_tensors(self, names: set[str] | None = None, device: str = "cpu") -> Iterator[tuple[str, "object"]]:
        """Stream tensors shard by shard (memory ≈ one tensor at a time)."""
        from safetensors import safe_open

        for file in self.weight_files:
            with safe_open(str(file), framework="pt", device=device) as f:
                for name in f.keys():
                    if names is None or name in names:
                        yield name, f.get_tensor(name)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _no_tokenizer(path: Path) -> str:
    return (f"no tokenizer in '{path}' (looked for {', '.join(TOKENIZER_FILES)}); "
            "copy the tokenizer files from the original model into this folder")


def _read_header(file: Path) -> dict:
    """Parse a safetensors header and check the file is as long as the header says."""
    try:
        with file.open("rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise ValueError("header length is implausible")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as exc:
        raise ModelFolderError(f"weight shard '{file.name}' is corrupt ({exc}); download it again") from None
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, TypeError, IndexError, ValueError) as exc:
        raise ModelFolderError(f"weight shard '{file.name}' has a malformed header ({exc!r}); download it again") from None
    size = file.stat().st_size
    if size < 8 + n + end:
        raise ModelFolderError(
            f"weight shard '{file.name}' is truncated ({size:,} of {8 + n + end:,} bytes); download it again"
        )
    return header


def _weight_files(path: Path) -> tuple[Path, ...]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise ModelFolderError(f"'{index.name}' is not a valid safetensors index ({exc}); download it again") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).exists()]
        if missing:
            raise ModelFolderError(
                f"{len(missing)} of {len(files)} weight shards missing in '{path}' (first: {missing[0]}); download them"
            )
        return tuple(path / f for f in files)
    files = tuple(sorted(path.glob("*.safetensors")))
    if files:
        return files
    if list(path.glob("*.gguf")):
        raise UnsupportedModelError(
            f"'{path}' holds GGUF files (llama.cpp); onecard loads Hugging Face safetensors: download the original "
            "model's safetensors files, or quantize it with `onecard quantize`"
        )
    if list(path.glob("*.bin")) or list(path.glob("*.pt")):
        raise ModelFolderError(
            f"'{path}' has only PyTorch .bin weights; onecard loads safetensors: convert with "
            "`python -c \"from transformers import AutoModelForCausalLM as M; M.from_pretrained('DIR').save_pretrained('DIR')\"`"
        )
    raise ModelFolderError(f"no *.safetensors weights in '{path}'; download the model's safetensors files into it")


def open_model_folder(path: str | Path, *, require_tokenizer: bool = True,
                      supported: dict[str, str] | None = SUPPORTED_ARCHITECTURES) -> ModelFolder:
    """Validate ``path`` and return its parsed description (headers only; no weights read)."""
    p = Path(path).expanduser()
    if p.is_file() and p.suffix.lower() == ".gguf":
        raise UnsupportedModelError(
            f"'{p.name}' is a GGUF file (llama.cpp); onecard loads Hugging Face folders (config.json + *.safetensors): "
            "download the original model, or quantize it with `onecard quantize`"
        )
    if not p.exists():
        if _HUB_ID.match(str(path)) and not str(path).startswith((".", "/")):
            raise ModelFolderError(
                f"no local folder '{path}', and onecard never downloads; if it is a Hugging Face hub id, run "
                f"`huggingface-cli download {path} --local-dir ./{str(path).split('/')[-1]}` and pass that folder"
            )
        raise ModelFolderError(f"model folder '{p}' does not exist; pass a local folder with config.json and *.safetensors")
    if not p.is_dir():
        raise ModelFolderError(f"'{p}' is a file, not a model folder; pass the folder that holds config.json")
    cfg_file = p / "config.json"
    if not cfg_file.exists():
        raise ModelFolderError(f"no config.json in '{p}'; is this the model's folder? copy config.json from the original model")
    try:
        config = json.loads(cfg_file.read_text())
    except ValueError as exc:
        raise ModelFolderError(f"config.json in '{p}' is not valid JSON ({exc}); download it again") from None
    if not isinstance(config, dict):
        raise ModelFolderError(f"config.json in '{p}' is not a JSON object; copy config.json from the original model")
    archs = config.get("architectures") or []
    if supported is not None and not archs:
        raise ModelFolderError(
            f"config.json in '{p}' has no \"architectures\" entry; add the model's class, e.g. "
            f"\"architectures\": [\"LlamaForCausalLM\"] (supported: {', '.join(supported)})"
        )
    if supported is not None and not any(a in supported for a in archs):
        raise UnsupportedModelError(
            f"architecture {archs or config.get('model_type', '?')} in '{p}' is not supported; "
            f"supported: {', '.join(supported)}"
        )
    files = _weight_files(p)
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        for name, meta in _read_header(f).items():
            if name != "__metadata__":
                tensors[name] = TensorInfo(name, _ST_DTYPES.get(meta["dtype"], meta["dtype"]), tuple(meta["shape"]), f)
    if not tensors:
        raise ModelFolderError(f"the safetensors files in '{p}' hold no tensors; download them again")
    _check_index(p, tensors)
    has_tok = any((p / t).exists() for t in TOKENIZER_FILES)
    folder = ModelFolder(p, config, files, tensors, has_tok)
    if require_tokenizer and not has_tok:
        raise ModelFolderError(_no_tokenizer(p))
    _check_dtype(folder)
    if supported is not None:
        _check_shapes(folder, folder.model_args())
    return folder


def _check_index(path: Path, tensors: dict[str, TensorInfo]) -> None:
    """Every tensor the index promises must be in the shard it names (a stale or swapped shard fails here)."""
    index = path / "model.safetensors.index.json"
    if not index.exists():
        return
    weight_map = json.loads(index.read_text())["weight_map"]
    for name, file in weight_map.items():
        info = tensors.get(name)
        if info is None or info.file.name != Path(file).name:
            raise ModelFolderError(
                f"'{index.name}' lists tensor '{name}' in '{file}', but that shard does not hold it; "
                "the shards and the index are from different downloads: download them again"
            )


def _check_shapes(folder: ModelFolder, args: ModelArgs) -> None:
    """config.json and the weights must describe the same model (a config copied from another size fails here)."""
    emb = folder.tensors.get("model.embed_tokens.weight")
    if emb is not None and emb.shape != (args.vocab_size, args.hidden_size):
        raise ModelFolderError(
            f"config.json says vocab {args.vocab_size} x hidden {args.hidden_size}, but model.embed_tokens.weight "
            f"is {list(emb.shape)}; config.json and the weights are from different models"
        )
    layers = {int(m.group(1)) for n in folder.tensors if (m := re.match(r"model\.layers\.(\d+)\.", n))}
    if layers and max(layers) + 1 != args.num_layers:
        raise ModelFolderError(
            f"config.json says {args.num_layers} layers but the weights hold {max(layers) + 1}; "
            "config.json and the weights are from different models"
        )


def _check_dtype(folder: ModelFolder) -> None:
    declared = folder.config.get("torch_dtype") or folder.config.get("dtype")
    stored = folder.weight_dtype()
    if folder.quantization_config is None and any(t.dtype in ("int32", "int8", "uint8") for t in folder.tensors.values()
                                                  if t.name.endswith(("weight", "qweight"))):
        raise ModelFolderError(
            f"'{folder.path}' holds integer weights but config.json has no quantization_config; "
            "copy config.json from the quantized model, not the original"
        )
    if declared in _FLOAT and stored and declared != stored and stored != "float32":
        raise ModelFolderError(
            f"config.json says torch_dtype={declared} but the weights are stored as {stored}; "
            f"set \"torch_dtype\": \"{stored}\" in config.json"
        )
