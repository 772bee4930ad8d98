"""``onecard demo`` monitor stage: a report of the demo run itself.

``start_demo_monitor(ctx)`` runs first and samples in the background
(GPU via NVML when there is one; always this process's CPU and memory, and
the torch allocator once CUDA is in use); later stages may add job metrics
with ``ctx.artifacts["monitor"].record(...)``. ``demo_stage(ctx)`` runs last:
it stops sampling and writes ``monitor/monitor.json`` + ``.png`` into the
demo's workdir.
"""

from __future__ import annotations

from onecard.demo import DemoContext, StageResult
from onecard.monitor.monitor import Monitor
from onecard.monitor.report import write_report


def start_demo_monitor(ctx: DemoContext) -> StageResult:
    log = ctx.workdir / "monitor.jsonl"
    mon = Monitor(interval=0.5, log=log, command="onecard demo", attach=False).start()
    ctx.artifacts["monitor"] = mon
    ctx.artifacts["monitor_log"] = log
    where = mon.latest().gpus if mon.latest() else []
    what = f"{len(where)} GPU(s) via NVML" if where else f"no GPU ({mon.no_gpu}); process CPU and memory only"
    return StageResult("monitor (start)", f"sampling every 0.5 s into {log.name}: {what}")


def demo_stage(ctx: DemoContext) -> StageResult:
    mon = ctx.artifacts.get("monitor")
    if not isinstance(mon, Monitor):
        return StageResult("monitor", "start_demo_monitor(ctx) did not run first: nothing was sampled", ok=False)
    mon.stop(exit_code=0)
    jpath, png = write_report(ctx.artifacts["monitor_log"], ctx.workdir / "monitor")
    ctx.artifacts["monitor_report"] = jpath
    ctx.artifacts["monitor_png"] = png
    s = mon.summary()
    parts = [f"{s['samples']} samples over {s['duration_s']:.0f} s"]
    if s["gpu_count"]:
        parts.append(f"GPU0 max {s['gpu0_temp_max_c']:.0f}°C, peak {s['gpu0_mem_used_peak_gib']:.1f} GiB, "
                     f"mean util {s['gpu0_util_mean_pct']:.0f}%")
    else:
        parts.append("no GPU rows")
    if s.get("proc_rss_peak_mib"):
        parts.append(f"process peak RSS {s['proc_rss_peak_mib']:.0f} MiB")
    if s.get("alloc_fragmentation_max") is not None:
        parts.append(f"allocator fragmentation max {s['alloc_fragmentation_max']:.0%}")
    parts.append(f"report {jpath.parent.name}/{jpath.name} + {png.name}")
    return StageResult("monitor", "; ".join(parts))
