"""The layout's promises: app never imports torch, engine never imports gradio, presets are data,
and the app's own command-line flags behave as the README says."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from app.__main__ import exposure_refusal, exposure_warning, main, parse_args

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "bitsandbytes", "peft")


def imported_modules(folder: str) -> set[str]:
    names = set()
    for path in (ROOT / folder).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def test_app_code_never_imports_torch_or_friends():
    assert not imported_modules("app") & set(HEAVY)


def messages(path: Path) -> list[str]:
    """The string literals of a module that are not docstrings: what it can say to a person."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)}
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
            and isinstance(node.value, str) and id(node) not in docstrings]


def test_engine_messages_name_no_ui_elements():
    # The engine also speaks through the command line; the UI adds its own hints about its tabs.
    import re

    ui_words = re.compile(r"\b(the \w+ tab|press|click|button)\b", re.IGNORECASE)
    found = [(path.name, text) for path in (ROOT / "engine").glob("*.py")
             for text in messages(path) if ui_words.search(text)]
    assert found == []


def test_chat_does_not_import_the_training_recipe():
    chat = ast.parse((ROOT / "engine" / "chat.py").read_text())
    modules = {node.module for node in ast.walk(chat) if isinstance(node, ast.ImportFrom)}
    assert "engine.train" not in modules


def test_engine_never_imports_gradio():
    assert "gradio" not in imported_modules("engine")


def test_building_the_ui_loads_no_torch():
    code = "import sys; from app.main import build_ui; build_ui(); " \
           f"print([m for m in {HEAVY!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)  # a hang guard only
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize(
    ("argv", "warns"),
    [
        ([], False),
        (["--host", "0.0.0.0"], True),
        (["--host", "0.0.0.0", "--auth", "me:secret"], False),
        (["--share"], True),
        (["--share", "--auth", "me:secret"], False),
    ],
)
def test_exposure_without_auth_warns(argv, warns):
    assert bool(exposure_warning(parse_args(argv))) is warns


@pytest.mark.parametrize(
    ("argv", "refused"),
    [
        ([], False),
        (["--host", "0.0.0.0"], True),
        (["--share"], True),
        (["--host", "0.0.0.0", "--insecure"], False),
        (["--share", "--insecure"], False),
        (["--host", "0.0.0.0", "--auth", "me:secret"], False),
    ],
)
def test_exposure_without_auth_is_refused_unless_insecure(argv, refused):
    assert bool(exposure_refusal(parse_args(argv))) is refused


def test_exposed_app_refuses_to_start_before_building_anything(capsys):
    assert main(["--host", "0.0.0.0", "--no-browser"]) == 2
    err = capsys.readouterr().err
    assert "Refusing to start" in err and "--auth" in err and "--insecure" in err


def test_app_flag_defaults():
    args = parse_args([])
    assert (args.host, args.port, args.share, args.auth, args.no_browser, args.insecure) == (
        "127.0.0.1", 7860, False, None, False, False)


def test_auth_needs_user_and_password():
    with pytest.raises(SystemExit):
        parse_args(["--auth", "justaname"])
