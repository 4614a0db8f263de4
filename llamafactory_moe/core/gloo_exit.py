"""Exit guard for gloo: the interpreter must not finalize while a gloo worker thread still needs Python.

The failure it prevents (seen as ``terminate called without an active exception`` and SIGABRT when a
``FORCE_TORCHRUN=1 llamafactory-cli train`` child exits, so the command fails after training and saving correctly):

1. Each gloo process group runs its collectives on C++ worker threads (``pt_gloo_runloop``). A synchronous collective
   returns as soon as the worker marks it complete; the worker drops its own reference to the finished work a moment
   later. With torch's PyObject preservation, dropping a reference to a tensor that Python also holds calls
   ``TensorImpl::decref_pyobject``, which takes the GIL.
2. If the main thread has meanwhile entered ``Py_FinalizeEx``, Python 3.11 ends any other thread that takes the GIL with
   ``pthread_exit``. The forced unwind meets a ``noexcept`` destructor (``~AsyncWork``) and ``std::terminate`` aborts
   the process (core dump of a 2-rank gloo run: ``runLoop -> ~AsyncAllreduceWork -> decref_pyobject ->
   gil_scoped_acquire -> take_gil -> PyThread_exit_thread -> pthread_exit -> std::terminate``).
3. ``destroy_process_group()`` (LLaMA-Factory calls it at the end of every run) does not stop those threads while
   anything still references the group: gloo's ``shutdown()`` does not join them, and DeepSpeed
   (``groups._WORLD_GROUP``, every ZeRO-3 parameter's ``ds_process_group``, the module kept in ``FWD_MODULE_STACK``)
   and torch's DDP (even after the model and optimizer are deleted) keep references after training. So the workers
   are alive when the interpreter finalizes, and a worker that has not yet dropped its last work races the
   finalization. The rank that exits soonest after its last collective (rank 1: rank 0 still writes the model and the
   plots) is the one at risk, more so on a loaded machine.

The guard runs at interpreter exit (atexit handlers run before finalization starts). It releases the GIL and waits
until every gloo worker thread of this process sleeps in its work-queue wait, i.e. has finished dropping its last work.
Linux tells the states apart through ``/proc/self/task/<tid>/stat`` and ``.../syscall``: an idle worker sleeps (S) in
a futex condition wait without timeout; a worker waiting for the GIL sleeps in a timed condition wait (CPython wakes
every 5 ms); a worker waiting for the queue mutex uses a plain futex wait; a worker that is running or was just woken is
in state R. Elsewhere the guard only sleeps 50 ms with the GIL released (best effort).
"""

from __future__ import annotations

import atexit
import os
import platform
import sys
import time

WORKER_THREAD_NAME = "pt_gloo_runloop"  # torch's c10d::ProcessGroupGloo::runLoop threads
# futex(2) syscall numbers; other architectures fall back to a short GIL-free sleep.
_FUTEX_SYSCALL = {"x86_64": 202, "amd64": 202, "aarch64": 98, "arm64": 98}
_FUTEX_CMD_MASK = 0x7F  # strips FUTEX_PRIVATE_FLAG (128) and FUTEX_CLOCK_REALTIME (256)
_FUTEX_WAIT_BITSET = 9  # glibc's pthread_cond_wait; a mutex lock waits with FUTEX_WAIT (0)
_TASK_DIR = "/proc/self/task"

_registered = False


def gloo_worker_threads() -> list[str]:
    """Thread ids of this process's gloo worker threads (Linux; empty elsewhere)."""
    try:
        tids = os.listdir(_TASK_DIR)
    except OSError:
        return []
    out = []
    for tid in tids:
        try:
            with open(f"{_TASK_DIR}/{tid}/comm") as f:
                if f.read().strip() == WORKER_THREAD_NAME:
                    out.append(tid)
        except OSError:  # the thread ended
            continue
    return out


def _idle(tid: str, futex: int) -> bool:
    """True if the thread sleeps in an untimed futex condition wait (the work-queue wait), or has ended."""
    try:
        with open(f"{_TASK_DIR}/{tid}/syscall") as f:
            fields = f.read().split()
        with open(f"{_TASK_DIR}/{tid}/stat") as f:  # read second: still asleep after the syscall was seen
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True  # the thread ended: it needs nothing any more
    # "<nr> <arg1> ... <arg6> <sp> <pc>" while in a syscall; "running" or "-1 <sp> <pc>" otherwise. A woken thread
    # still shows the futex call until it runs, but its state is then R, not S.
    if state != "S" or len(fields) < 5 or not fields[0].isdigit() or int(fields[0]) != futex:
        return False
    op, timeout = int(fields[2], 16), int(fields[4], 16)
    return op & _FUTEX_CMD_MASK == _FUTEX_WAIT_BITSET and timeout == 0


def wait_for_idle_gloo_workers(timeout: float = 10.0, poll: float = 0.001) -> bool | None:
    """Block, with the GIL released, until every gloo worker thread is idle.

    Returns True once they are (or if there are none), False after ``timeout`` seconds with one still busy (a collective
    left running; the exit is not held up longer), and None where the thread states cannot be read (not Linux, an
    unknown architecture, ``/proc/<tid>/syscall`` not readable): it then only sleeps 50 ms, which lets a worker that
    already waits for the GIL take it. Two consecutive all-idle sweeps are required, so a worker that changed state
    during a sweep is looked at again.
    """
    tids = gloo_worker_threads()
    if not tids:
        return True
    futex = _FUTEX_SYSCALL.get(platform.machine().lower())
    if futex is None:
        time.sleep(0.05)
        return None
    deadline = time.monotonic() + timeout
    streak = 0
    while time.monotonic() < deadline:
        try:
            all_idle = all(_idle(tid, futex) for tid in tids)
        except OSError:  # e.g. a restricted ptrace policy hides /proc/<tid>/syscall
            time.sleep(0.05)
            return None
        streak = streak + 1 if all_idle else 0
        if streak >= 2:
            return True
        time.sleep(poll)  # releases the GIL, so a worker waiting for it gets it
    return False


def _exit_guard() -> None:
    if wait_for_idle_gloo_workers() is False:
        sys.stderr.write("llamafactory-moe: a gloo worker thread was still busy 10 s into interpreter exit (a "
                         "collective left running); the process may abort with 'terminate called without an active "
                         "exception'\n")


def register_exit_guard() -> None:
    """Run the idle wait at interpreter exit (once per process; atexit handlers run before finalization)."""
    global _registered
    if not _registered:
        _registered = True
        atexit.register(_exit_guard)
