"""Timing and memory measurement for the benchmark harness: device synchronisation, peak
memory (CUDA allocator statistics, or CPU resident-set size sampled by a thread), the
machine description, and the autocast/precision helpers shared by every subject."""
from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
import threading
import time
from typing import Dict, Iterator, Optional

import torch

__all__ = ["sync", "Timer", "MemoryMeter", "machine_info", "DTYPES", "autocast",
           "is_oom", "free_memory", "rss_bytes", "ThreadCPU", "thread_cpu_snapshot",
           "thread_cpu_delta", "thread_cpu_per_iter"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Wall-clock seconds of a block, synchronising ``device`` before and after."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = float("nan")

    def __enter__(self) -> "Timer":
        sync(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - self._t0


def autocast(device: torch.device, precision: str):
    """``torch.autocast`` for ``precision`` ("bf16"/"fp16") on ``device``; a null context
    for "fp32". The same context is used for d2seg and every reference."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """This process's resident set size in bytes (Linux /proc; else ru_maxrss, a peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # pragma: no cover - non-Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def malloc_trim() -> None:
    """Return the C heap's free memory to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Without it, memory freed by an earlier step stays resident, and the next step's peak RSS
    increase reads as zero."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None

_PY_THREAD = re.compile(r"^Thread-\d+ \((.+)\)$")  # "Thread-3 (_pin_memory_loop)"


def thread_cpu_snapshot() -> Dict[int, tuple]:
    """{native thread id: (name, CPU seconds used so far)} for every thread of this process
    (Linux ``/proc/self/task/*/schedstat``, nanosecond resolution; {} elsewhere).

    Python threads are named by ``threading`` (the target function for unnamed ones:
    ``_pin_memory_loop`` for a data loader's pin-memory thread, "MainThread"); the others by
    their kernel name after "native:" (torch's autograd device threads:
    "native:pt_autograd_0"; intra-op pools inherit the process's name, "native:python").
    """
    names = {}
    for t in threading.enumerate():
        if t.native_id is not None:
            m = _PY_THREAD.match(t.name)
            names[t.native_id] = m.group(1) if m else t.name
    out: Dict[int, tuple] = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:  # pragma: no cover - non-Linux
        return out
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                ns = int(f.read().split()[0])
            name = names.get(int(tid))
            if name is None:  # not a Python thread
                with open(f"/proc/self/task/{tid}/comm") as f:
                    name = "native:" + f.read().strip()
        except (OSError, ValueError, IndexError):  # the thread ended meanwhile
            continue
        out[int(tid)] = (name, ns * 1e-9)
    return out


def thread_cpu_delta(before: Dict[int, tuple], after: Dict[int, tuple]) -> Dict[str, float]:
    """CPU seconds per thread name between two :func:`thread_cpu_snapshot` s (threads of the
    same name summed; a thread started in between counts from zero, one that ended is lost),
    largest first."""
    acc: Dict[str, float] = {}
    for tid, (name, sec) in after.items():
        acc[name] = acc.get(name, 0.0) + sec - before.get(tid, (name, 0.0))[1]
    return dict(sorted(acc.items(), key=lambda kv: -kv[1]))


def thread_cpu_per_iter(seconds: Dict[str, float], iters: int,
                        floor: float = 1e-4) -> Dict[str, float]:
    """{thread: CPU seconds / iters} of a :func:`thread_cpu_delta`; threads under ``floor``
    seconds per iteration are left out."""
    return {k: round(v / iters, 6) for k, v in seconds.items() if iters and v / iters >= floor}


class ThreadCPU:
    """CPU seconds each thread of this process used during a block: ``seconds`` =
    :func:`thread_cpu_delta`. Where a step's wall time exceeds its main thread's CPU time, the
    host waited (for the GIL, a lock, a queue; a CUDA synchronisation may spin, which counts
    as CPU time); on CUDA the backward's host work runs in the autograd device thread, not
    the main one."""

    def __init__(self):
        self.seconds: Dict[str, float] = {}

    def __enter__(self) -> "ThreadCPU":
        self._before = thread_cpu_snapshot()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = thread_cpu_delta(self._before, thread_cpu_snapshot())


class MemoryMeter:
    """Peak memory of a block.

    CUDA: ``max_memory_allocated`` / ``max_memory_reserved`` over the block (statistics reset
    at entry), reported both absolute and as the increase over what was allocated at entry
    (``peak_allocated_delta_mb``: activations, gradients, optimizer state created in the
    block), and the increase of reserved memory (``peak_reserved_delta_mb``: with the cache
    emptied before the block, this includes the memory pools of CUDA graphs recorded in it).
    CPU: peak resident-set size sampled every ``interval`` s by a thread, minus the RSS
    at entry (``peak_rss_delta_mb``) after :func:`malloc_trim`: approximate (sampling can
    miss short peaks; memory allocated before the block, e.g. weights and optimizer state, is
    not counted; allocator arenas of other threads may keep some freed memory).
    """

    def __init__(self, device: torch.device, interval: float = 0.002):
        self.device, self.interval = device, interval
        self.result: Dict[str, float] = {}

    def __enter__(self) -> "MemoryMeter":
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self._base_reserved = torch.cuda.memory_reserved(self.device)
        else:
            malloc_trim()  # freed heap memory back to the OS: the baseline is what is in use
            self._base = rss_bytes()
            self._peak = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, rss_bytes())
            self._stop.wait(self.interval)

    def __exit__(self, *exc) -> None:
        mb = 1024.0 ** 2
        if self.device.type == "cuda":
            sync(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self.result = {
                "kind": "cuda",
                "peak_allocated_mb": peak / mb,
                "peak_reserved_mb": torch.cuda.max_memory_reserved(self.device) / mb,
                "peak_allocated_delta_mb": (peak - self._base) / mb,
                # what the block made the caching allocator hold on to: also the private
                # memory pools of CUDA graphs recorded in the block, which the allocated
                # figures leave out
                "peak_reserved_delta_mb": (torch.cuda.max_memory_reserved(self.device)
                                           - self._base_reserved) / mb,
            }
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, rss_bytes())
            self.result = {"kind": "cpu_rss_approx", "peak_rss_mb": self._peak / mb,
                           "peak_rss_delta_mb": (self._peak - self._base) / mb}

    @property
    def peak_mb(self) -> float:
        """The headline number: CUDA peak allocated increase, or CPU peak RSS increase."""
        r = self.result
        return r.get("peak_allocated_delta_mb", r.get("peak_rss_delta_mb", float("nan")))


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` is an out-of-memory error (CUDA or CPU allocator)."""
    if isinstance(err, getattr(torch.cuda, "OutOfMemoryError", ())):
        return True
    msg = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in msg
                                              or "DefaultCPUAllocator: can't allocate" in msg)


def free_memory(device: torch.device) -> None:
    """Collect garbage and return cached CUDA blocks (after an OOM or between subjects)."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith("model name"):
                    return ln.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> Dict[str, object]:
    """What the numbers were measured on: device, CPU, threads, library versions, date."""
    info: Dict[str, object] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    for mod in ("torchvision", "detectron2", "segmentation_models_pytorch", "timm"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=torch.cuda.get_device_name(device), gpu_memory_gb=p.total_memory / 1024 ** 3,
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
        info["summary"] = f"{info['gpu']} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    else:
        info["summary"] = (f"{os.cpu_count()}-core CPU, no GPU: {info['cpu']} "
                           f"({torch.get_num_threads()} torch threads; torch {torch.__version__})")
    return info


@contextlib.contextmanager
def backend_flags(flags: Optional[Dict[str, object]]) -> Iterator[None]:
    """Apply a :func:`capture_backend_flags` snapshot for the block, restoring after."""
    if not flags:
        yield
        return
    before = capture_backend_flags()
    _apply(flags)
    try:
        yield
    finally:
        _apply(before)


def capture_backend_flags() -> Dict[str, object]:
    """The process-wide switches a fast path may flip (cuDNN benchmark, TF32, matmul
    precision), so that each subject runs with its own and references stay plain. Matmul TF32
    is read and set only through ``torch.{get,set}_float32_matmul_precision`` ("high" = TF32), as
    ``d2seg.engine.fast_paths`` does: mixing it with the legacy ``cuda.matmul.allow_tf32`` flag
    makes torch 2.14 raise."""
    return {"cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cudnn_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_precision": torch.get_float32_matmul_precision(),
            # D2SEG.DETERMINISTIC sets these for the whole process
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}


def _apply(flags: Dict[str, object]) -> None:
    torch.backends.cudnn.benchmark = bool(flags["cudnn_benchmark"])
    torch.backends.cudnn.allow_tf32 = bool(flags["cudnn_tf32"])
    torch.set_float32_matmul_precision(str(flags["matmul_precision"]))
    if "cudnn_deterministic" in flags:
        torch.backends.cudnn.deterministic = bool(flags["cudnn_deterministic"])
    if "deterministic_algorithms" in flags and \
            bool(flags["deterministic_algorithms"]) != torch.are_deterministic_algorithms_enabled():
        torch.use_deterministic_algorithms(bool(flags["deterministic_algorithms"]))
