"""The CI-sized load test: benchmarks/serve_load.py --smoke (100 streaming clients on the tiny CPU model, 10 hang up).

It must exit 0 (every completed request whole, no KV block or sequence left in
the engine, one abort per disconnect, server exits 0 on SIGTERM) and say so in
its JSON. The offline comparison is a GPU figure and is skipped here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_serve_load_smoke(tmp_path, random_checkpoint):
    random_checkpoint("llama-2-7b")  # build the cached checkpoint here, not inside the timed run
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), "--smoke", "--no-offline",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "serve_load.json").read_text())
    assert data["clients"] == 100 and data["disconnecting_clients"] == 10
    assert data["completed_whole"] == data["completed_total"] == 90
    assert data["aborted_by_disconnect"] == data["hung_up_mid_stream"] >= 1 and data["kv_blocks_used_after"] == 0
    assert data["server_exit_status"] == 0 and data["checks_passed"] and not data["failures"]
    assert data["ttft_p50_ms"] <= data["ttft_p99_ms"] and data["server_output_tok_s"] > 0
    assert (tmp_path / "serve_load.png").stat().st_size > 0
