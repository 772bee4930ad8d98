"""``onecard train``: fine-tune (LoRA / QLoRA / full) on local data."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(
        model: str = typer.Argument(..., help="Local Hugging Face model folder."),
        data: Path = typer.Option(..., "--data", help="Text file, folder of .txt/.md files, or chat/instruction .jsonl."),
        method: str = typer.Option("lora", "--method", help="lora | qlora (int4 base) | full."),
        qlora_quant: str = typer.Option("int4", "--qlora-quant", help="QLoRA base: int4 (onecard's own, no extra) | "
                                        "nf4 (bitsandbytes NF4, double-quantized; pip install 'onecard[bnb]')."),
        seq_len: int = typer.Option(2048, "--seq-len", help="Tokens per packed training row."),
        batch_size: int = typer.Option(1, "--batch-size", help="Rows per micro-batch."),
        grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per optimizer step."),
        epochs: float = typer.Option(1.0, "--epochs", help="Passes over the data (ignored with --max-steps)."),
        max_steps: int = typer.Option(-1, "--max-steps", help="Optimizer steps (overrides --epochs)."),
        lr: float = typer.Option(None, "--lr", help="Peak learning rate (default 2e-4 LoRA/QLoRA, 2e-5 full)."),
        lora_r: int = typer.Option(16, "--lora-r"),
        lora_alpha: int = typer.Option(32, "--lora-alpha"),
        lora_dropout: float = typer.Option(0.0, "--lora-dropout"),
        lora_targets: str = typer.Option("all-linear", "--lora-targets", help="all-linear or names: q_proj,v_proj"),
        out: Path = typer.Option(None, "--out", help="Run folder (default runs/<model>-<method>)."),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
        merge: bool = typer.Option(False, "--merge", help="Also write a merged HF model folder (<out>/merged)."),
        eval_steps: int = typer.Option(50, "--eval-steps", help="Evaluate (loss, perplexity) every N steps; 0 = off."),
        val_fraction: float = typer.Option(0.05, "--val-fraction", help="Share of documents held out."),
        save_steps: int = typer.Option(200, "--save-steps"),
        logging_steps: int = typer.Option(10, "--logging-steps"),
        bad_lines: str = typer.Option("stop", "--bad-lines", help="JSONL lines that do not parse: skip | stop."),
        precision: str = typer.Option("auto", "--precision", help="auto | bf16 | fp16 | fp32 | fp8 (Ada/Hopper: "
                                                                  "frozen fp8 LoRA bases; full: torchao float8)."),
        optimizer: str = typer.Option("auto", "--optimizer", help="auto | adamw | adamw_8bit | paged_adamw_8bit."),
        fused: bool = typer.Option(True, "--fused/--no-fused", help="onecard's fused kernels."),
        gradient_checkpointing: bool = typer.Option(True, "--gradient-checkpointing/--no-gradient-checkpointing"),
        offload_checkpoints: bool = typer.Option(False, "--offload-checkpoints",
                                                 help="Keep layer checkpoints in CPU memory (long context)."),
        max_grad_norm: float = typer.Option(1.0, "--max-grad-norm", help="Gradient clipping; 0 = off."),
        seed: int = typer.Option(0, "--seed"),
        device: str = typer.Option(None, "--device", help="cuda | cpu (default: cuda if present)."),
        gpus: int = typer.Option(1, "--gpus", help="Processes, one per GPU: N > 1 re-runs this command under "
                                 "torchrun and shards with FSDP2 (with --device cpu: N gloo processes)."),
    ) -> None:
        """Fine-tune (LoRA / QLoRA / full) on local data."""
        import os
        import subprocess
        import sys

        from rich.console import Console

        from onecard.dist.launch import DistEnv, exit_worker, shutdown, torchrun_command, without_option
        from onecard.monitor.allocator import prefer_expandable_segments

        # a process of its own that only trains (torchrun's re-runs of this command too): the Python API leaves the
        # process's allocator alone, since an engine with CUDA graphs may share it
        prefer_expandable_segments()
        if gpus > 1 and not DistEnv.from_env().is_distributed:  # the launcher: torchrun runs the real job
            cmd = torchrun_command(gpus, "onecard.cli", ["train", *without_option(sys.argv[sys.argv.index("train") + 1:],
                                                                                    "--gpus")])
            raise typer.Exit(subprocess.call(cmd, env={**os.environ, "OMP_NUM_THREADS": os.environ.get(
                "OMP_NUM_THREADS", "1")}))

        from onecard.train.trainer import TrainConfig, train

        console = Console()
        cfg = TrainConfig(model=model, data=data, method=method, qlora_quant=qlora_quant, out=out, seq_len=seq_len,
                          batch_size=batch_size, grad_accum=grad_accum, epochs=epochs, max_steps=max_steps, lr=lr,
                          lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_targets=lora_targets,
                          eval_steps=eval_steps, val_fraction=val_fraction, save_steps=save_steps,
                          logging_steps=logging_steps, bad_lines=bad_lines, resume=resume, merge=merge,
                          fused=fused, gradient_checkpointing=gradient_checkpointing,
                          offload_checkpoints=offload_checkpoints, precision=precision, optimizer=optimizer,
                          max_grad_norm=max_grad_norm, seed=seed, device=device)
        r = train(cfg, console=console)
        env = DistEnv.from_env()
        if env.is_main:
            _report(console, cfg, r)
        if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun (or accelerate) rank: leave the group, then skip
            shutdown()                           # interpreter finalization (launch.exit_worker says why)
            exit_worker(0)


def _report(console, cfg, r) -> None:
    """Rank 0's summary of a finished run."""
    d = r.data_summary
    console.print(f"data: {d['kind']}, {d['documents']} documents -> {d['train_blocks']} train / "
                  f"{d['val_blocks']} val rows of {cfg.seq_len} tokens"
                  + (f", {len(d['bad_lines'])} bad lines skipped" if d["bad_lines"] else ""))
    console.print(f"{r.patch_summary}; {r.precision}; trainable {r.trainable_parameters / 1e6:.2f}M of "
                  f"{r.total_parameters / 1e6:.1f}M parameters")
    first = f"{r.train_loss[0][1]:.4f}" if r.train_loss else "-"
    last = f"{r.train_loss[-1][1]:.4f}" if r.train_loss else "-"
    ev = f", eval perplexity {r.eval[-1][2]:.2f}" if r.eval else ""
    console.print(f"{r.steps} steps in {r.seconds:.1f} s ({r.tokens_per_second:,.0f} tok/s), loss {first} -> "
                  f"{last}{ev}" + (f", peak {r.peak_gib:.2f} GiB" if r.peak_gib else ""))
    console.print(f"[green]wrote[/] {r.weights_dir}" + (f" and merged model {r.merged_dir}" if r.merged_dir else ""))
