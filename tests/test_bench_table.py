"""``onecard bench MODEL --table --smoke`` runs every row on CPU; every cell is a number or has a stated reason."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from onecard.bench.table import COLUMNS, ROWS, TableConfig, max_fitting, merge_tables
from onecard.errors import BadInputError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_max_fitting_finds_the_boundary_with_few_probes():
    probes = []

    def fits(n):
        probes.append(n)
        return n <= 5000

    assert max_fitting(fits, 1024, 131072) == 4096
    assert len(probes) <= 8  # binary search over 128 points
    assert max_fitting(lambda n: True, 1024, 3000) == 3000  # the upper end itself, not only multiples of step
    assert max_fitting(lambda n: False, 1024, 8192) == 0


def test_table_config_rejects_bad_rows():
    with pytest.raises(BadInputError, match="unknown table row"):
        TableConfig("m", rows=("hf-fp4",))
    with pytest.raises(BadInputError, match="ttft_prompt_len"):
        TableConfig("m", ttft_prompt_len=4096, max_model_len=4096)


def test_bench_table_smoke_cli(random_checkpoint, tmp_path):
    from onecard.cli import app

    path = random_checkpoint("llama-2-7b")
    res = CliRunner().invoke(app, ["bench", str(path), "--table", "--smoke", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    r = json.loads((tmp_path / "bench_table.json").read_text())
    assert (tmp_path / "bench_table.md").read_text().count("\n| ") == len(ROWS) + 1  # header + one line per row
    assert (tmp_path / "bench_table.png").stat().st_size > 0
    assert [e["row"] for e in r["rows"]] == list(ROWS)
    for e in r["rows"]:
        if e["status"] != "ok":
            assert e["reason"], e  # a row that did not run says why
            continue
        for col in COLUMNS:
            v = e[col]
            assert (isinstance(v, (int, float)) and v > 0) or col in e["reasons"], (e["row"], col, v)
    by = {e["row"]: e for e in r["rows"]}
    # fp8 KV is built by another change: until then the row must say "not built", never crash or fake numbers
    assert by["onecard-int4-fp8kv"]["status"] in ("ok", "not built")
    assert all(by[k]["status"] == "ok" for k in ROWS[:5]) and by["onecard-fp8-fp8kv"]["status"] == "ok"
    assert "QuantLinear" in by["hf-int8"]["note"]  # no bitsandbytes on CPU: the row says which int8 it is
    # same workload, same search budget: int4 weights read fewer bytes per step than bf16
    assert by["onecard-int4"]["bytes_per_step"] < by["onecard-int8"]["bytes_per_step"] < by["onecard-bf16"]["bytes_per_step"]
    assert by["onecard-fp8-fp8kv"]["bytes_per_step"] < by["onecard-bf16"]["bytes_per_step"]
    # the CPU search runs against the fake KV budget: it must land on the budget's token count (fp32 K and V)
    cfg = json.loads((path / "config.json").read_text())
    kv_per_token = 2 * cfg["num_hidden_layers"] * cfg["hidden_size"] * 4
    want = int(r["config_cpu_kv_budget_mib"] * 2**20) // kv_per_token // r["config_search_step"] * r["config_search_step"]
    assert 0 < want < cfg["max_position_embeddings"]
    assert by["onecard-bf16"]["max_context_tokens"] == by["onecard-int4"]["max_context_tokens"] == want


def test_hf_offline_halves_the_batch_until_it_fits():
    from rich.progress import Progress

    from onecard.bench.table import _hf_offline_fitting

    class Model(torch.nn.Module):
        """generate() runs out of memory above 8 rows, like HF bf16 under a 24 GiB cap at batch 32."""

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.batches = []

        def generate(self, ids, **kw):
            self.batches.append(ids.shape[0])
            if ids.shape[0] > 8:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            return ids

    model, reqs = Model(), [([5, 6, 7], 4)] * 20
    with Progress(disable=True) as progress:
        batch, tok_s = _hf_offline_fitting(model, reqs, 32, progress)
    assert batch == 8 and tok_s > 0 and model.batches[:3] == [20, 16, 8]


def test_merge_tables_joins_disjoint_rows_of_one_card_in_table_order():
    """A table too long for one device call runs as --rows parts on the same card; the merge refuses parts that
    were measured differently, or that measured a row twice."""
    def part(rows, **kw):
        return {"gpu": "H100", "torch": "2.11", "model": "m", "device_name": "H100", "bandwidth_gbs": 3350.0,
                "memory_cap_gib": 24.0, "config_num_prompts": 1000, "config_rows": rows, "date": f"d{len(rows)}",
                "command": f"run {','.join(rows)}", "rows": [{"row": r} for r in rows], **kw}

    a, b = part(["onecard-int4", "hf-bf16"]), part(["onecard-bf16"])
    m = merge_tables([a, b])
    assert [e["row"] for e in m["rows"]] == m["config_rows"] == ["hf-bf16", "onecard-bf16", "onecard-int4"]
    assert m["command"] == "run onecard-int4,hf-bf16 && run onecard-bf16" and m["date"] == "d2"
    with pytest.raises(BadInputError, match="config_num_prompts"):
        merge_tables([a, part(["onecard-bf16"], config_num_prompts=200)])
    with pytest.raises(BadInputError, match="gpu"):
        merge_tables([a, part(["onecard-bf16"], gpu="H200")])
    with pytest.raises(BadInputError, match="twice.*onecard-int4"):
        merge_tables([a, part(["onecard-int4"])])
    with pytest.raises(BadInputError, match="two or more"):
        merge_tables([a])
