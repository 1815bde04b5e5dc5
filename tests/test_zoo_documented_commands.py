"""Every shell command in README.md, bundle/README.md and docs/*.md names things that exist, as written.

Running them all would take hours (pretraining, training, a MONAI Label server); the long ones run, with the same
arguments, in their own tests (``tests/test_bundle_package.py`` packages with ``python -m bundle.package --output-dir``
and installs with ``python -m monai.bundle download --url file://...``; ``tests/test_monailabel.py`` starts the server
with ``.venv-monailabel/bin/python -m monailabel.main start_server``). Here each documented command is checked
statically: ``make`` targets exist; ``python -m`` modules are found by the interpreter the command names; every
option of a project command-line tool is in its ``--help``; every ``monai.bundle`` option is a parameter of the
subcommand or an id of the configs it reads (MONAI would silently add a misspelt id instead of failing).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import io
import re
import runpy
import shlex
import sys
from pathlib import Path

import monai.bundle.scripts as bundle_scripts
import pytest
from monai.bundle import ConfigParser

from conftest import REPO_ROOT

DOCUMENTS = [REPO_ROOT / "README.md", REPO_ROOT / "bundle" / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
MONAILABEL_VENV = REPO_ROOT / ".venv-monailabel"
# options of `monai.bundle run` that are not config ids
RUN_OPTIONS = {"config_file", "meta_file", "logging_file", "args_file", "init_id", "run_id", "final_id", "tracking"}
NOT_CHECKED = ("curl", "scontrol", "head=", ".venv/bin/pip", "pip install", "mlflow ")  # external tools


def documented_commands() -> list[tuple[str, str]]:
    """(document name, command) for every line of every ``bash`` block, continuation lines joined."""
    commands = []
    for document in DOCUMENTS:
        for block in re.findall(r"```bash\n(.*?)```", document.read_text(), flags=re.S):
            for command in block.replace("\\\n", " ").splitlines():
                command = re.sub(r"\s+#\s.*$", "", command).strip()  # trailing comments
                command = re.sub(r"\[(--[^\]]*)\]", r"\1", command)  # optional arguments: [--key value]
                if not command or command.startswith("#"):
                    continue
                loop = re.fullmatch(r"for (\w+) in ([^;]+); do (.+); done", command)
                expanded = [loop.group(3).replace(f"${loop.group(1)}", value) for value in loop.group(2).split()] \
                    if loop else [command]
                commands.extend((document.relative_to(REPO_ROOT).as_posix(), one) for one in expanded)
    return commands


def _makefile_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*):", (REPO_ROOT / "Makefile").read_text(), flags=re.M))


def _options(arguments: list[str]) -> dict[str, str | None]:
    """``--key value`` / ``--key=value`` pairs (a flag's value is None)."""
    found, index = {}, 0
    while index < len(arguments):
        token = arguments[index]
        if token.startswith("--"):
            key, _, value = token[2:].partition("=")
            if not value and index + 1 < len(arguments) and not arguments[index + 1].startswith("--"):
                value = arguments[index + 1]
                index += 1
            found[key] = value or None
        index += 1
    return found


def _config_files(value: str) -> list[str]:
    return re.findall(r"configs/[\w.]+\.json", value)


def _check_monai_bundle(subcommand: str, arguments: list[str]) -> None:
    options = _options(arguments)
    parameters = set(inspect.signature(getattr(bundle_scripts, subcommand)).parameters)
    configs = _config_files(options.get("config_file") or "")
    for config in configs:
        assert (REPO_ROOT / config).is_file(), f"{config} does not exist"
    parser = ConfigParser()
    if configs:
        parser.read_config([str(REPO_ROOT / config) for config in configs])
    for key in options:
        if key in parameters or (subcommand == "run" and key in RUN_OPTIONS):
            continue
        assert configs and key in parser, f"--{key} is neither a parameter of monai.bundle {subcommand} nor an id of {configs}"


def _check_cli(module: str, arguments: list[str]) -> None:
    """Every documented option must be in ``python -m module --help`` (run in this process), or, for a ``fire``
    command line, be a parameter of the function it exposes."""
    source = Path(importlib.util.find_spec(module).origin).read_text()
    exposed = re.search(r"fire\.Fire\((\w+)\)", source)
    if exposed:
        parameters = inspect.signature(getattr(importlib.import_module(module), exposed.group(1))).parameters
        # a function taking **overrides of a bundle config (its default config_file) accepts that config's ids
        overridden = ConfigParser()
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()) and "config_file" in parameters:
            overridden.read_config(parameters["config_file"].default)
        for key in _options(arguments):
            assert key in parameters or key in overridden, f"python -m {module} has no option --{key}"
        return
    help_text = io.StringIO()
    saved = sys.argv
    sys.argv = [module, "--help"]
    try:
        with contextlib.redirect_stdout(help_text), pytest.raises(SystemExit) as stopped:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        sys.argv = saved
    assert stopped.value.code in (0, None), f"python -m {module} --help exited with {stopped.value.code}"
    for key in _options(arguments):
        assert f"--{key}" in help_text.getvalue(), f"python -m {module} has no option --{key}"


def _check_monailabel(module: str, arguments: list[str]) -> None:
    sources = sorted(MONAILABEL_VENV.glob(f"lib/python*/site-packages/{module.replace('.', '/')}.py"))
    if not sources:
        pytest.skip(f"{MONAILABEL_VENV} has no {module} (python -m bundle.monailabel.environment creates it)")
    text = sources[0].read_text()
    assert arguments[0] in text, f"{module} has no subcommand {arguments[0]}"
    for key in _options(arguments):
        assert f'"--{key}"' in text, f"{module} {arguments[0]} has no option --{key}"


@pytest.mark.parametrize(("document", "command"), documented_commands())
def test_documented_command_names_what_exists(document, command):
    tokens = shlex.split(command)
    if tokens[0] == "srun":
        tokens = tokens[1:]
    if command.startswith(NOT_CHECKED):
        return
    if tokens[0] == "bash":  # a script of the repository, run elsewhere (benchmarks/gpu_check.sh on a GPU machine)
        assert (REPO_ROOT / tokens[1]).is_file(), f"{document}: {command}: no script {tokens[1]}"
        return
    if tokens[0] == "make":
        assert set(tokens[1:]) <= _makefile_targets(), f"{document}: {command}: no such make target"
        return
    assert "-m" in tokens, f"{document}: {command}: not a command this test knows how to check"
    interpreter, module, arguments = tokens[0], tokens[tokens.index("-m") + 1], tokens[tokens.index("-m") + 2:]
    assert interpreter in ("python", "torchrun", ".venv-monailabel/bin/python"), f"{document}: {command}"
    if interpreter == ".venv-monailabel/bin/python":
        if module == "monai.bundle":
            _check_monai_bundle(arguments[0], arguments[1:])
        else:
            _check_monailabel(module, arguments)
        return
    assert importlib.util.find_spec(module) is not None, f"{document}: {command}: no module {module}"
    if module == "monai.bundle":
        _check_monai_bundle(arguments[0], arguments[1:])
    else:
        _check_cli(module, arguments)


def test_the_documents_hold_commands():
    documents = {document for document, _ in documented_commands()}
    assert {"README.md", "bundle/README.md", "docs/README.md"} <= documents
