"""Collectives the trainers need besides gradient averaging: work done once on the main process and shared.

SEIKO keeps its oracle and its feedback dataset on the main process (one writer, every answer on disk before it
is used) while every process samples and trains its share. These helpers carry results, errors and tensors from
the main process to the others. With one process each is a plain call, so single-process runs are unchanged.

A failure on the main process (the oracle is down, the run directory is damaged) is raised on *every*
process: the others never wait in a collective for a main process that has stopped.
"""

from __future__ import annotations

import pickle
import threading

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast, broadcast_object_list

from ..utils.errors import error_line
from ..utils.run_lock import RunLock


def shares(total: int, num_processes: int) -> list[int]:
    """``total`` split into ``num_processes`` shares differing by at most one, the larger ones first."""
    base, extra = divmod(int(total), int(num_processes))
    return [base + (rank < extra) for rank in range(num_processes)]


class MainProcessError(RuntimeError):
    """Raised on the other processes when the main process failed with an exception that could not be sent."""


def run_on_main(accelerator: Accelerator, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on the main process only; its result (picklable) is returned on every process,
    and an exception it raises is raised on every process: the same exception object where it survives a pickle
    round trip, else a :class:`MainProcessError` with its type and first line (the main process raises the
    original). ``SystemExit`` and ``KeyboardInterrupt`` on the main process reach the others as a
    :class:`MainProcessError` too."""
    if accelerator.num_processes == 1:
        return fn(*args, **kwargs)
    payload, original = [None], None
    if accelerator.is_main_process:
        try:
            payload = [("ok", fn(*args, **kwargs))]
        except BaseException as err:  # noqa: BLE001 - re-raised below, on this process and all others (Ctrl-C and
            original = err  # SystemExit too: the others must not wait in a collective the main process left)
            payload = [("error", _sendable(err))]
    broadcast_object_list(payload, from_process=0)
    status, value = payload[0]
    if status == "error":
        raise original if original is not None else value
    return value


def _sendable(err: BaseException) -> BaseException:
    """``err`` itself when it is an ``Exception`` that survives a pickle round trip (some pickle but cannot be
    rebuilt: a required constructor argument), else a :class:`MainProcessError` with its type and first line --
    also for ``SystemExit`` / ``KeyboardInterrupt``, which must not end the other processes silently."""
    if not isinstance(err, Exception):
        return MainProcessError(f"the main process stopped: {error_line(err)}")
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # noqa: BLE001 - sent as text instead
        return MainProcessError(error_line(err))


def _signal(accelerator: Accelerator, done: bool) -> bool:
    """One short collective: the main process tells the others whether its work has finished."""
    flag = torch.tensor([1 if done else 0], device=accelerator.device)
    return bool(broadcast(flag, from_process=0).item())


def run_on_main_patiently(accelerator: Accelerator, fn, *args, interval: float = 1.0, **kwargs):
    """:func:`run_on_main` for work on the main process that may outlast the process-group timeout (an oracle
    that asks people, a rate-limited API, a push): the main process runs ``fn`` in a worker thread and, every
    ``interval`` seconds until it returns, joins the others in a one-element broadcast, so no process waits in a
    collective longer than ``interval`` (the default timeout of ``accelerate`` / NCCL / gloo is 30 minutes,
    far shorter than a round of human ratings). Results and errors reach every process as with
    :func:`run_on_main`."""
    if accelerator.num_processes == 1:
        return fn(*args, **kwargs)
    if not accelerator.is_main_process:
        while not _signal(accelerator, False):
            pass
        return run_on_main(accelerator, fn)  # receives the main process's result or error; fn is not called
    box, grad_enabled = {}, torch.is_grad_enabled()

    def work():  # the caller's device and grad mode (both are per thread)
        if accelerator.device.type == "cuda":
            torch.cuda.set_device(accelerator.device)
        try:
            with torch.set_grad_enabled(grad_enabled):
                box["result"] = (True, fn(*args, **kwargs))
        except BaseException as err:  # noqa: BLE001 - handed to the main thread, raised there and everywhere
            box["result"] = (False, err)

    thread = threading.Thread(target=work, name="hf_control_ft-main-work", daemon=True)
    thread.start()
    while True:
        thread.join(interval)
        if _signal(accelerator, not thread.is_alive()):
            break
    ok, value = box["result"]

    def result():
        if not ok:
            raise value
        return value

    return run_on_main(accelerator, result)


def lock_on_main(accelerator: Accelerator, directory: str | None) -> RunLock | None:
    """The run lock of ``directory`` (:class:`~hf_control_ft.utils.run_lock.RunLock`), taken by the main process:
    returned there (release it when the run ends), ``None`` on the others or without a directory. When another run
    holds it, :class:`~hf_control_ft.utils.run_lock.RunLockedError` is raised on every process, so none goes on
    into a collective the main process never joins."""
    lock = RunLock(directory) if directory and accelerator.is_main_process else None

    def acquire():
        if lock is not None:
            lock.acquire()

    run_on_main(accelerator, acquire)
    return lock


def tensors_from_main(accelerator: Accelerator, fn) -> tuple[torch.Tensor, ...]:
    """``fn() -> tuple of tensors`` run on the main process; every process gets CPU copies (sent as tensors,
    not pickled, so large feedback datasets cost one broadcast each)."""
    if accelerator.num_processes == 1:
        return tuple(t.cpu() for t in fn())
    held = {}

    def describe():
        held["tensors"] = tuple(t.contiguous() for t in fn())
        return [(tuple(t.shape), t.dtype) for t in held["tensors"]]

    out = []
    for i, (shape, dtype) in enumerate(run_on_main(accelerator, describe)):
        if accelerator.is_main_process:
            t = held["tensors"][i].to(accelerator.device)
        else:
            t = torch.empty(shape, dtype=dtype, device=accelerator.device)
        out.append(broadcast(t, from_process=0).cpu())
    return tuple(out)


@torch.no_grad()
def broadcast_tensors(accelerator: Accelerator, tensors) -> None:
    """Overwrites each tensor (parameters, buffers) with the main process's value, in place: identical LoRA
    adapters and initial-noise models on every process whatever their seeds or the files each could read."""
    if accelerator.num_processes == 1:
        return
    for tensor in tensors:
        data = tensor.detach()
        if data.device != accelerator.device:  # e.g. a CPU buffer under NCCL: send a device copy
            data.copy_(broadcast(data.to(accelerator.device), from_process=0).to(data.device))
        else:
            broadcast(data, from_process=0)
