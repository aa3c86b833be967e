"""The docs stay true: README's commands are what CI runs, and every module is on the map."""

from __future__ import annotations

import re

from doubles import ROOT


def _readme_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```sh\n(.*?)```", readme, re.S)
    assert block, "README must open with a shell block of the two set-up commands"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_run_and_test_commands() -> None:
    """The README's first block has two commands: one runs the service, one runs the tests."""
    commands = _readme_commands()
    assert len(commands) == 2
    assert "python app.py" in commands[0] and "pytest" in commands[1]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    """.ci/run runs the README's test command verbatim."""
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert _readme_commands()[1] in ci


def test_every_module_is_on_the_readme_map() -> None:
    """Each top-level module has its line in the README's map of the house."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for module in sorted(p.name for p in ROOT.glob("*.py")):
        assert f"| `{module}` |" in readme, module


def test_every_cli_command_is_documented() -> None:
    """Every CLI command of app.py appears in the README's command-line section and its own help."""
    source = (ROOT / "app.py").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = re.findall(r'add_parser\("([a-z-]+)"', source)
    assert {"set-webhook", "webhook-info", "replay-dead"} <= set(commands)
    for command in commands:
        if command != "serve":
            assert f"python app.py {command}" in readme, command
