"""Tensor-parallel engine: ``LLM(model, tensor_parallel_size=N)`` runs one model shard per GPU in N processes.

The caller's process is rank 0, the driver: it owns the scheduler, the block
manager and sampling, exactly as with one GPU. It starts N-1 worker processes
(``spawn``; rank r on ``cuda:r``, or gloo on CPU), each loading the checkpoint,
keeping its shard (``onecard.dist.tp.shard_model_``: column/row-parallel
linears, local attention heads) and building its own ``ModelRunner`` with a
KV cache of its local KV heads. Every rank gets the same number of KV blocks:
each measures its free memory and the minimum wins (``all_reduce(MIN)``), so
one block table addresses every rank's cache.

Each step the driver sends the workers what the scheduler decided (per
sequence: length, cached/scheduled counts, block table and the tokens this step
computes; a small int64 array over a pipe), then every rank runs the same
forward; the row-parallel all-reduces inside the model are the only traffic
between GPUs. ``lm_head`` is replicated, so the driver has the full logits
and samples alone. On CUDA each rank captures its own decode graphs (the
NCCL all-reduces are recorded in them) and all ranks replay in lockstep.

Async scheduling works as on one GPU (``llm_engine.py``): the driver sends step
t+1 (a ``LAUNCH`` message, with each row's ``prev_rows``) before it has read
step t's tokens, and after sampling it broadcasts the sampled tokens from its
``_sampled`` buffer into every worker's, on the GPUs' streams: a worker takes
a row's input token from there exactly as the driver does, so no rank's host
waits for the token, and the pipe, the scheduling and each rank's input
preparation overlap the GPUs' previous step.

Lifetime: workers are daemons that exit when the driver sends ``None``
(``TPModelRunner.close``, also run when the runner is garbage-collected or
the interpreter exits) or when they notice the driver is gone. A worker that
dies is reported as a one-line ``OnecardError`` at the next step; one that
dies inside a collective makes the driver's collective fail (gloo: at once;
NCCL: after ``COLLECTIVE_TIMEOUT_S``) rather than hang forever.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
import time
import weakref
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from onecard.dist.launch import backend_for, exit_worker, free_port
from onecard.engine.config import EngineConfig
from onecard.engine.model_runner import ModelRunner
from onecard.engine.sampler import PendingSample, SamplerOutput
from onecard.engine.sequence import Sequence
from onecard.errors import BadInputError, NotBuiltYetError, OnecardError

log = logging.getLogger(__name__)

PREFILL, DECODE, VERIFY, LAUNCH = 0, 1, 2, 3  # LAUNCH: an async decode step (prev_rows, then a broadcast)
COLLECTIVE_TIMEOUT_S = 300  # longest any rank may wait in a collective (start-up skew included) before it fails
READY_TIMEOUT_S = 1800  # loading a large checkpoint and capturing graphs on every rank
LEAVE_TIMEOUT_S = 30  # tearing the NCCL group down at close
_HEADER = 6  # per sequence: length, num_cached_tokens, num_scheduled_tokens, first token position, #blocks, #tokens


class WorkerError(OnecardError):
    """A tensor-parallel worker process failed or exited."""


# ---- step messages: what the scheduler decided, as one int64 array -----------------------------------------------
def pack_step(kind: int, seqs: list[Sequence], prev_rows: list[int] | None = None) -> np.ndarray:
    """The fields of ``seqs`` a worker's ``ModelRunner`` reads for a ``kind`` step (not the whole token history),
    then, for a ``LAUNCH`` step, each row's ``prev_rows`` entry."""
    out: list[int] = [kind, len(seqs)]
    for s in seqs:
        if kind == PREFILL:  # the same window prepare_prefill computes
            end, n = (s.num_cached_tokens, s.num_scheduled_tokens) if s.num_scheduled_tokens \
                else (len(s), len(s) - s.num_cached_tokens)
            start, toks = end - n, s.token_ids[end - n:end]
            out += [len(s), end, n]
        else:
            start, toks = len(s) - 1, [s.last_token, *s.draft_tokens] if kind == VERIFY else [s.last_token]
            out += [len(s), s.num_cached_tokens, s.num_scheduled_tokens]
        out += [start, len(s.block_table), len(toks)]
        out += s.block_table
        out += toks
    if kind == LAUNCH:
        out += prev_rows
    return np.asarray(out, dtype=np.int64)


class _Window:
    """The slice of a sequence's token ids a step needs, indexed by absolute position like ``Sequence.token_ids``."""

    __slots__ = ("start", "tokens")

    def __init__(self, start: int, tokens: list[int]) -> None:
        self.start, self.tokens = start, tokens

    def __getitem__(self, key: slice) -> list[int]:
        return self.tokens[key.start - self.start:key.stop - self.start]


class StepSequence:
    """What a worker knows of one scheduled sequence: enough for ``ModelRunner``'s prepare/forward methods."""

    __slots__ = ("length", "num_cached_tokens", "num_scheduled_tokens", "block_table", "token_ids", "last_token",
                 "draft_tokens")

    def __len__(self) -> int:
        return self.length


def unpack_step(msg: np.ndarray) -> tuple[int, list[StepSequence], list[int] | None]:
    values = msg.tolist()
    kind, n = values[0], values[1]
    i, seqs = 2, []
    for _ in range(n):
        length, cached, scheduled, start, nb, nt = values[i:i + _HEADER]
        i += _HEADER
        s = StepSequence()
        s.length, s.num_cached_tokens, s.num_scheduled_tokens = length, cached, scheduled
        s.block_table = values[i:i + nb]
        toks = values[i + nb:i + nb + nt]
        i += nb + nt
        s.token_ids = _Window(start, toks)
        s.last_token = toks[0] if kind != PREFILL else toks[-1]
        s.draft_tokens = toks[1:] if kind == VERIFY else []
        seqs.append(s)
    return kind, seqs, values[i:i + n] if kind == LAUNCH else None


# ---- runner ------------------------------------------------------------------------------------------------------
class TPModelRunner(ModelRunner):
    """A ``ModelRunner`` over one shard. On the driver it also forwards each step to the workers (``attach``)."""

    _workers: list[tuple[mp.Process, object]] = []

    def _measure_num_blocks(self) -> int:
        """Each rank's own measurement, then the minimum over ranks: one block table must fit every cache."""
        n = torch.tensor([super()._measure_num_blocks()], dtype=torch.long, device=self.device)
        dist.all_reduce(n, op=dist.ReduceOp.MIN)
        return int(n.item())

    def attach(self, workers: list[tuple[mp.Process, object]]) -> None:
        self._workers = workers
        self._finalizer = weakref.finalize(self, _shutdown, workers)

    def _send(self, kind: int, seqs: list[Sequence], prev_rows: list[int] | None = None) -> None:
        check_workers(self._workers)
        msg = pack_step(kind, seqs, prev_rows)
        for _proc, conn in self._workers:
            conn.send(msg)

    @torch.no_grad()
    def run(self, seqs: list[Sequence], is_prefill: bool) -> SamplerOutput | None:
        self._send(PREFILL if is_prefill else DECODE, seqs)
        return super().run(seqs, is_prefill)

    @torch.no_grad()
    def launch_decode(self, seqs: list[Sequence], prev_rows: list[int]) -> PendingSample:
        self._send(LAUNCH, seqs, prev_rows)
        return super().launch_decode(seqs, prev_rows)

    def keep_sample(self, tokens: torch.Tensor) -> None:
        """The driver's sample goes to every rank's ``_sampled``, where the next ``LAUNCH`` step's rows read it."""
        super().keep_sample(tokens)
        dist.broadcast(self._sampled[:len(tokens)], src=0)

    @torch.no_grad()
    def verify(self, seqs: list[Sequence], draft_probs: dict[int, torch.Tensor] | None = None) -> list[SamplerOutput]:
        self._send(VERIFY, seqs)
        return super().verify(seqs, draft_probs)

    @torch.no_grad()
    def forward_step(self, kind: int, seqs: list[StepSequence], prev_rows: list[int] | None = None) -> None:
        """A worker's half of a step: the same forward as the driver (same collectives), no sampling; after a
        ``LAUNCH`` step it receives the driver's sample (``keep_sample``)."""
        if kind == PREFILL:
            ids, positions, meta, _last = self.prepare_prefill(seqs)
            self.model(ids, positions, meta)
        elif kind == DECODE:
            self.decode_logits(seqs)
        elif kind == LAUNCH:
            self.decode_logits(seqs, prev_rows)
            dist.broadcast(self._sampled[:len(seqs)], src=0)
        else:
            self.verify_logits(seqs)

    def close(self) -> None:
        """Stop the workers and leave the process group (idempotent; also runs at garbage collection/exit)."""
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()


def check_workers(workers: list[tuple[mp.Process, object]]) -> None:
    """Raise ``WorkerError`` (with the worker's own one-line error when it sent one) if any worker has exited."""
    for rank, (proc, conn) in enumerate(workers, start=1):
        if proc.exitcode is not None:
            raise WorkerError(f"tensor-parallel worker rank {rank} exited (code {proc.exitcode}): "
                              f"{_last_error(conn) or 'no error message'}; recreate the LLM")


def _last_error(conn) -> str | None:
    try:
        while conn.poll(0):
            msg = conn.recv()
            if isinstance(msg, tuple) and msg and msg[0] == "error":
                return msg[1]
    except (EOFError, OSError):
        pass
    return None


def _shutdown(workers: list[tuple[mp.Process, object]]) -> None:
    for proc, conn in workers:
        try:
            conn.send(None)
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + 10
    for proc, conn in workers:
        proc.join(max(0.1, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        conn.close()
    leave_group()


def leave_group(timeout_s: float = LEAVE_TIMEOUT_S) -> None:
    """Leave the engine's process group. NCCL aborts its communicators instead of destroying the group: after
    all-reduces were captured in CUDA graphs, ``destroy_process_group`` waits forever (pytorch#115388; seen on
    2x H200 with torch 2.11). The abort runs in a thread given ``timeout_s``: if it hangs too, the process goes on
    with the group half torn down (a warning says so) rather than never returning from ``close``."""
    if not dist.is_initialized():
        return
    if dist.get_backend() != "nccl":
        dist.destroy_process_group()
        return
    torch.cuda.synchronize()
    done = threading.Thread(target=dist.distributed_c10d._abort_process_group, daemon=True,
                            name="onecard-tp-leave")
    done.start()
    done.join(timeout_s)
    if done.is_alive():
        log.warning("tensor parallel: the NCCL group did not tear down within %.0f s (pytorch#115388); this "
                    "process cannot start another tensor-parallel engine", timeout_s)


# ---- start-up ----------------------------------------------------------------------------------------------------
def rank_device(device: torch.device, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device.type == "cuda" else torch.device("cpu")


def check_tp_request(config: EngineConfig, folder, dtype: torch.dtype, device: torch.device) -> None:
    """Everything that can be refused before a process starts."""
    from onecard.dist.tp import check_tp, check_tp_groups

    tp = config.tensor_parallel_size
    args = folder.model_args()
    check_tp(args, tp)
    if device.type == "cuda" and torch.cuda.device_count() < tp:
        raise BadInputError(f"tensor_parallel_size={tp} needs {tp} GPUs but {torch.cuda.device_count()} are visible; "
                            "lower tensor_parallel_size or check CUDA_VISIBLE_DEVICES")
    if device.type == "cuda" and device.index not in (None, 0):
        raise BadInputError(f"device={device} with tensor_parallel_size={tp}: rank r runs on cuda:r; pass "
                            "device='cuda' and choose the GPUs with CUDA_VISIBLE_DEVICES")
    if config.offload_layers:
        raise NotBuiltYetError("weight offload with tensor_parallel_size>1 is not built yet: shard over the GPUs "
                               "(offload_layers=0), or offload on one GPU")
    from onecard.engine.llm import check_quant_request

    check_quant_request(folder, config, dtype, device, offload=0)
    if config.quantization is not None:
        from onecard.quant.config import QuantSpec

        check_tp_groups(args, tp, QuantSpec.parse(config.quantization).group_size)
    elif folder.quantization_config is not None:
        from onecard.quant.checkpoint import QuantFormat
        from onecard.quant.fp8_checkpoint import fp8_checkpoint_format

        if not fp8_checkpoint_format(folder.quantization_config):  # fp8 scales are per channel: any split works
            check_tp_groups(args, tp, QuantFormat.from_config(folder.quantization_config).group_size)
    if dist.is_initialized():
        raise BadInputError("this process already belongs to a torch.distributed process group; LLM("
                            "tensor_parallel_size>1) starts its own: create it outside torchrun, or close the other")


def load_shard(config: EngineConfig, dtype: torch.dtype, device: torch.device, rank: int, progress: bool = False):
    """Load the checkpoint (quantizing it first when asked) and keep rank ``rank``'s shard on ``device``.

    The whole model is read where it fits (the card itself is fastest), else in
    host memory, and sliced before it moves: a card only ever holds its shard
    plus, at most, the full weights transiently when there is room for them.
    Quantization happens before slicing, so each rank holds exactly its part of
    the one-GPU quantized model (``int4_kernel='tinygemm'`` repacks the shard).
    """
    from onecard.dist.tp import shard_model_, use_symm_mem_all_reduce_
    from onecard.models import open_model_folder
    from onecard.models.loader import load_model

    folder = open_model_folder(config.model, supported=None)
    load_on = device
    if device.type == "cuda":
        from onecard.plan.memory import weight_bytes
        from onecard.plan.preflight import engine_weight_format
        from onecard.plan.spec import resolve_model

        free, _ = torch.cuda.mem_get_info(device)
        spec = resolve_model(folder.config)
        full = weight_bytes(spec, engine_weight_format(spec, config.quantization, dtype.itemsize))
        load_on = device if full < free * config.gpu_memory_utilization else torch.device("cpu")
    if folder.quantization_config is not None:
        from onecard.quant import load_quantized_model

        model = load_quantized_model(folder, dtype, load_on, progress=progress)
    elif config.quantization is not None:  # one layer at a time, as on one GPU: the same codes, then sliced
        from onecard.quant import load_rtn_model

        model = load_rtn_model(folder, config.quantization, dtype, load_on, progress=progress)
    else:
        model = load_model(folder, dtype, load_on, progress=progress)
    shard_model_(model, rank, config.tensor_parallel_size)
    model = model.to(device)
    if config.tp_all_reduce != "nccl" and config.tensor_parallel_size > 1:
        use_symm_mem_all_reduce_(model, fuse_norms=config.tp_all_reduce == "auto")
    if config.int4_kernel == "tinygemm":
        from onecard.quant import use_tinygemm_

        log.info("int4 kernel: PyTorch's _weight_int4pack_mm for %d layers", use_tinygemm_(model))
    if device.type == "cuda":
        from onecard.engine.llm import use_decode_kernels_

        use_decode_kernels_(model, config, device)
        torch.cuda.empty_cache()
    return model


def _join_group(rank: int, world: int, port: int, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device.type), init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
                            device_id=device if device.type == "cuda" else None)


def _worker_main(rank: int, port: int, config: EngineConfig, dtype: torch.dtype, device_type: str, conn) -> None:
    """A worker's whole life: join, load its shard, build its runner, report ready, then run steps until told."""
    device = rank_device(torch.device(device_type), rank)
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.tensor_parallel_size))
    parent = mp.parent_process()
    code = 0
    try:
        _join_group(rank, config.tensor_parallel_size, port, device)
        if config.seed is not None:
            torch.manual_seed(config.seed)
        runner = TPModelRunner(load_shard(config, dtype, device, rank), config, device)
        conn.send(("ready", runner.num_blocks))
        while True:
            if not conn.poll(1.0):
                if parent is not None and not parent.is_alive():
                    break  # the driver is gone: nobody will send a step or a stop
                continue
            msg = conn.recv()
            if msg is None:
                break
            runner.forward_step(*unpack_step(msg))
    except BaseException as e:  # report one line to the driver, then exit non-zero
        code = 1
        try:
            conn.send(("error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
        except (OSError, ValueError):
            pass
    finally:
        leave_group()
    exit_worker(code)


def start_tp_runner(config: EngineConfig, folder, dtype: torch.dtype, device: torch.device,
                    progress: bool = False) -> TPModelRunner:
    """Start ranks 1..N-1, load rank 0's shard here, and return the driver's runner once every rank is ready."""
    check_tp_request(config, folder, dtype, device)
    tp = config.tensor_parallel_size
    ctx = mp.get_context("spawn")
    port = free_port()
    workers: list[tuple[mp.Process, object]] = []
    for rank in range(1, tp):
        here, there = ctx.Pipe()
        proc = ctx.Process(target=_worker_main, args=(rank, port, config, dtype, device.type, there), daemon=True,
                           name=f"onecard-tp{rank}")
        proc.start()
        there.close()
        workers.append((proc, here))
    try:
        device = rank_device(device, 0)
        _join_group(0, tp, port, device)
        runner = TPModelRunner(load_shard(config, dtype, device, 0, progress), config, device)
        _wait_ready(workers, runner.num_blocks)
    except BaseException as e:
        time.sleep(0.5)  # let a worker that failed first write its reason
        reasons = [r for r in (_last_error(conn) for _p, conn in workers) if r]
        _shutdown(workers)
        if reasons and not isinstance(e, OnecardError):
            raise WorkerError(f"a tensor-parallel worker failed while starting: {reasons[0]}") from None
        raise
    runner.attach(workers)
    log.info("tensor parallel: %d ranks on %s, %d KV blocks each", tp, device.type, runner.num_blocks)
    return runner


def _wait_ready(workers: list[tuple[mp.Process, object]], num_blocks: int) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    for rank, (proc, conn) in enumerate(workers, start=1):
        while not conn.poll(0.5):
            check_workers(workers)
            if time.monotonic() > deadline:
                raise WorkerError(f"tensor-parallel worker rank {rank} was not ready after {READY_TIMEOUT_S} s; "
                                  "check its GPU with onecard doctor")
        msg = conn.recv()
        if msg[0] == "error":
            raise WorkerError(f"tensor-parallel worker rank {rank} failed while starting: {msg[1]}")
        if msg[1] != num_blocks:
            raise WorkerError(f"tensor-parallel worker rank {rank} sized its KV cache to {msg[1]} blocks, the driver "
                              f"to {num_blocks}; this is a bug, please report it")
