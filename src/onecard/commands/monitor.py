"""``onecard monitor``: live GPU panel; ``monitor run -- CMD`` writes a trace; ``monitor report`` writes JSON + PNG."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperGroup

class _MonitorGroup(TyperGroup):
    """Also accepts ``onecard monitor [--log F ...] -- CMD ARGS``: the wrapped-command form without ``run``."""

    def parse_args(self, ctx, args):
        if "--" in args and not any(a in self.commands for a in args[: args.index("--")]):
            args = ["run", *args]
        return super().parse_args(ctx, args)


monitor_app = typer.Typer(
    help="Live GPU panel (default), wrap a command into a JSONL trace (run, or `monitor --log F -- CMD`), "
         "write JSON + PNG reports (report).",
    cls=_MonitorGroup, invoke_without_command=True, no_args_is_help=False, add_completion=False, rich_markup_mode="rich")


@monitor_app.callback()
def panel(
    ctx: typer.Context,
    once: bool = typer.Option(False, "--once", help="Print one frame and exit (for scripts and tests)."),
    interval: float = typer.Option(1.0, "--interval", "-i", min=0.05, help="Seconds between samples."),
    gpu: Optional[List[int]] = typer.Option(None, "--gpu", "-g", help="GPU index to show (repeat); default all."),
    replay: Optional[Path] = typer.Option(None, "--replay", help="Show a recorded trace instead of live NVML."),
    duration: Optional[float] = typer.Option(None, "--duration", help="Stop after this many seconds."),
    as_json: bool = typer.Option(False, "--json", help="Print one sample as JSON and exit (like gpustat --json)."),
) -> None:
    """Live GPU panel (like nvitop): temperature, power, clocks, memory, utilisation history, throttle reasons."""
    if ctx.invoked_subcommand is not None:
        return
    from onecard.monitor.panel import run_panel
    from onecard.monitor.replay import ReplayReader

    reader = ReplayReader(replay, loop=True, realtime=True) if replay else None
    if as_json:
        import json

        from onecard.monitor.monitor import Monitor

        mon = Monitor(reader=reader, gpus=gpu or None, allocator=False, attach=False)
        s = mon.sample_now()
        typer.echo(json.dumps({**s.to_event(), "no_gpu": mon.no_gpu if not s.gpus else ""}, indent=2))
        if mon.reader:
            mon.reader.close()
        return
    run_panel(reader, interval=interval, once=once, gpus=gpu or None, duration=duration)


@monitor_app.command("run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(
    cmd: List[str] = typer.Argument(..., help="The command, after --."),
    log: Path = typer.Option(Path("onecard-monitor.jsonl"), "--log", "-l", help="JSONL trace to write."),
    interval: float = typer.Option(1.0, "--interval", "-i", min=0.05, help="Seconds between samples."),
    gpu: Optional[List[int]] = typer.Option(None, "--gpu", "-g", help="GPU index to sample (repeat); default all."),
    report: Optional[Path] = typer.Option(None, "--report", help="Also write the JSON + PNG report into this folder."),
    name: str = typer.Option("monitor", "--name", help="Base file name of the report."),
    guard: bool = typer.Option(False, "--guard", help="Run the thermal guard (logs actions; power limit only as a dry run)."),
    guard_pause: bool = typer.Option(False, "--guard-pause",
                                     help="Guard backs off by pausing CMD (SIGSTOP/SIGCONT) part of every second."),
    hot_c: float = typer.Option(83.0, "--hot-c", help="Guard: back off at or above this GPU temperature."),
    cool_c: float = typer.Option(75.0, "--cool-c", help="Guard: restore at or below this temperature."),
    allow_power_limit: bool = typer.Option(False, "--allow-power-limit",
                                           help="Guard may really lower the power limit (needs root). Default: dry run."),
) -> None:
    """Run CMD while sampling the GPUs; write a JSONL trace (samples, the command's own records, exit code)."""
    from rich.console import Console

    from onecard.monitor.guard import GuardPolicy
    from onecard.monitor.report import write_report
    from onecard.monitor.wrap import make_guard, run_wrapped

    g = make_guard(GuardPolicy(hot_c=hot_c, cool_c=cool_c), allow_power_limit) if guard or guard_pause else None
    code = run_wrapped(list(cmd), log, interval=interval, gpus=gpu or None, guard=g, pause=guard_pause)
    console = Console(stderr=True)
    console.print(f"[dim]monitor:[/] trace {log} (command exit code {code})")
    if report is not None:
        j, p = write_report(log, report, name)
        console.print(f"[dim]monitor:[/] report {j} and {p}")
    raise typer.Exit(code)


@monitor_app.command("report")
def report_cmd(
    trace: Path = typer.Argument(..., help="JSONL trace from 'onecard monitor run' or Monitor(log=...)."),
    out: Path = typer.Option(Path("."), "--out", "-o", help="Folder for <name>.json and <name>.png."),
    name: str = typer.Option("monitor", "--name", help="Base file name."),
) -> None:
    """Write a JSON summary and PNG plots (utilisation, memory, temperature, power, throughput, latency)."""
    from rich.console import Console
    from rich.table import Table

    from onecard.monitor.report import write_report

    j, p = write_report(trace, out, name)
    import json

    summary = json.loads(j.read_text())
    table = Table("metric", "value", title=f"monitor report: {trace}")
    for k, v in summary.items():
        if v is None or isinstance(v, (list, dict)) and not v:
            continue
        table.add_row(k, f"{v:.4g}" if isinstance(v, float) else "\n".join(v) if isinstance(v, list) else str(v))
    console = Console()
    console.print(table)
    console.print(f"wrote {j} and {p}")


def register(app: typer.Typer) -> None:
    app.add_typer(monitor_app, name="monitor")
