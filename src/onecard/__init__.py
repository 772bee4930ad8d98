"""onecard: train, quantize, serve, search over (RAG) and monitor LLMs on one 24 GB GPU."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("onecard")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.1.0"
