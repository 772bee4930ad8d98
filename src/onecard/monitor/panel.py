"""Live terminal panel (rich), in the spirit of nvitop / gpustat: one row per GPU with bars and
sparkline history, the GPU processes below, throttle reasons in words.

On a machine without NVML it still renders, with a "no GPU" row saying why,
so scripts and the pty test see the same frame shape everywhere.
"""

from __future__ import annotations

import os
import time
from typing import Sequence

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from onecard.monitor.nvml import THROTTLE_REASONS, decode_throttle
from onecard.monitor.trace import Sample

SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float | None], width: int = 24, lo: float = 0.0, hi: float = 100.0) -> str:
    """Last ``width`` values as block characters scaled to [lo, hi]; missing values are blanks."""
    out = []
    for v in list(values)[-width:]:
        if v is None:
            out.append(" ")
            continue
        f = 0.0 if hi <= lo else min(1.0, max(0.0, (v - lo) / (hi - lo)))
        out.append(SPARK[min(len(SPARK) - 1, int(f * len(SPARK)))])
    return "".join(out).rjust(width)


def bar(frac: float | None, width: int = 12) -> Text:
    if frac is None:
        return Text("n/a".ljust(width), style="dim")
    frac = min(1.0, max(0.0, frac))
    n = int(round(frac * width))
    style = "red" if frac >= 0.9 else "yellow" if frac >= 0.7 else "green"
    return Text("█" * n, style=style) + Text("░" * (width - n), style="dim")


def _num(v: float | None, fmt: str, unit: str = "") -> str:
    return "n/a" if v is None else f"{v:{fmt}}{unit}"


def _temp(v: float | None, hot: float = 83.0, warm: float = 75.0) -> Text:
    if v is None:
        return Text("n/a", style="dim")
    return Text(f"{v:.0f}°C", style="bold red" if v >= hot else "yellow" if v >= warm else "green")


def _reasons(mask: int | None) -> Text:
    if mask is None:
        return Text("n/a", style="dim")
    keys = decode_throttle(mask)
    if not keys:
        return Text("none", style="green")
    t = Text()
    for i, k in enumerate(keys):
        words, kind = THROTTLE_REASONS[k][1:] if k in THROTTLE_REASONS else (k, "hw")
        t.append(("" if i == 0 else ", ") + words,
                 style={"thermal": "bold red", "hw": "bold red", "power": "yellow"}.get(kind, "dim"))
    return t


def _proc_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"  # another container's process, or no /proc


def render(history: Sequence[Sample], no_gpu: str = "", title: str = "onecard monitor") -> Group:
    """One frame from the sample history (last sample = now, earlier ones feed the sparklines).

    Multi-line cells (like nvitop's two-line rows) keep a GPU within ~80 columns.
    """
    last = history[-1] if history else None
    table = Table(title=f"{title}  {time.strftime('%H:%M:%S')}", header_style="bold")
    table.add_column("GPU", max_width=12)
    table.add_column("temp·power·clock", no_wrap=True)
    table.add_column("memory · SM util (history)", no_wrap=True)
    table.add_column("clock reasons", min_width=10)
    if last is None or not last.gpus:
        table.columns[2].no_wrap = False
        table.add_row(Text("no GPU", style="bold yellow"), "", Text(no_gpu or "NVML reported no GPU", style="dim"), "")
        if hasattr(os, "getloadavg"):
            table.caption = f"host: load {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPU cores"
        return Group(table)
    for g in last.gpus:
        hist = [next((h.util_gpu for h in s.gpus if h.index == g.index), None) for s in history]
        mem_frac = g.mem_used_mib / g.mem_total_mib if g.mem_used_mib is not None and g.mem_total_mib else None
        sensors = (_temp(g.temp_c) + Text(f"  fan {_num(g.fan_pct, '.0f', '%')}")
                   + (Text(f"\nmem {g.mem_temp_c:.0f}°C", style="dim") if g.mem_temp_c is not None else Text(""))
                   + Text(f"\n{_num(g.power_w, '.0f')} / {_num(g.power_limit_w, '.0f', ' W')}"
                          f"\nSM {_num(g.sm_clock_mhz, '.0f')} MHz\nmem {_num(g.mem_clock_mhz, '.0f', ' MHz')}"))
        usage = Text("mem ") + bar(mem_frac, 10)
        usage += Text(f" {g.mem_used_mib / 1024:.1f}/{g.mem_total_mib / 1024:.1f} GiB" if mem_frac is not None else "")
        usage += Text("\nSM  ") + bar(g.util_gpu / 100 if g.util_gpu is not None else None, 10)
        usage += Text(f" {_num(g.util_gpu, '.0f', '%')}  (mem {_num(g.util_mem, '.0f', '%')})")
        usage += Text("\n    " + sparkline(hist, 16), style="cyan")
        if g.pcie_tx_kbs is not None:
            usage += Text(f"\nPCIe tx {g.pcie_tx_kbs / 1024:.0f} rx {(g.pcie_rx_kbs or 0) / 1024:.0f} MB/s", style="dim")
        table.add_row(f"{g.index} {g.name}", sensors, usage, _reasons(g.throttle))
    procs = Table("GPU", "PID", "process", "GPU memory", title="GPU processes", header_style="bold")
    for g in last.gpus:
        for p in g.processes:
            procs.add_row(str(g.index), str(p["pid"]), _proc_name(p["pid"]), _num(p.get("used_mib"), ".0f", " MiB"))
    if not procs.row_count:
        procs.add_row("", "", Text("no compute processes", style="dim"), "")
    return Group(table, procs)


def run_panel(reader=None, interval: float = 1.0, once: bool = False, console: Console | None = None,
              gpus: list[int] | None = None, duration: float | None = None) -> None:
    """Show the panel until Ctrl-C (or ``duration`` seconds); ``once`` prints a single frame and returns."""
    from onecard.monitor.monitor import Monitor

    console = console or Console()
    mon = Monitor(interval=interval, reader=reader, gpus=gpus, allocator=False, log=None, pcie=not once,
                  attach=False)
    if once:
        mon.sample_now()
        console.print(render(list(mon.samples), mon.no_gpu))
        if mon.reader:
            mon.reader.close()
        return
    end = time.monotonic() + duration if duration else None
    with mon, Live(render([], mon.no_gpu), console=console, refresh_per_second=4, screen=False) as live:
        try:
            while end is None or time.monotonic() < end:
                time.sleep(min(interval, 0.25))
                live.update(render(list(mon.samples), mon.no_gpu))
        except KeyboardInterrupt:
            pass
