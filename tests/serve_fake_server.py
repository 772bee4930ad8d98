"""Run the real uvicorn server over the fake engine: ``python serve_fake_server.py MODEL_DIR PORT [API_KEY]``.

Used by test_serve_server.py only while ``onecard.engine.AsyncEngine`` is missing,
so the subprocess behaviours (SIGTERM, disconnects over real sockets) stay tested.
"""

import sys

import onecard.engine as engine_pkg
from serve_fake_engine import FakeEngine, FakeSamplingParams

if not hasattr(engine_pkg, "SamplingParams"):
    engine_pkg.SamplingParams = FakeSamplingParams

from transformers import AutoTokenizer

from onecard.serve.server import ServeConfig, serve

model, port = sys.argv[1], int(sys.argv[2])
key = sys.argv[3] if len(sys.argv) > 3 else None
cfg = ServeConfig(model, port=port, api_key=key, served_model_name="tiny", shutdown_timeout=3.0)
sys.exit(serve(cfg, factory=lambda: FakeEngine(AutoTokenizer.from_pretrained(model), step_s=0.005,
                                               max_model_len=512)))
