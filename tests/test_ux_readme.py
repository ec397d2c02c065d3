"""The README's commands work as written in a fresh clone (issue 11, section 3):
outside the Quick start, the project's commands are the virtualenv's."""

import re
from pathlib import Path

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
# Not Python packages, so not in the virtualenv: the README says where to get them.
EXTERNAL = ("grpcurl", "openssl", "docker", "systemctl")


def commands_outside_the_quick_start():
    text = README.split("## Running the daemon", 1)[1]
    for language, block in re.findall(r"```(sh|console)\n(.*?)```", text, re.S):
        previous = ""
        for line in block.splitlines():
            if language == "console":
                if line.startswith("$ "):
                    yield line[2:]
            elif line.strip() and not line.lstrip().startswith("#") and not previous.endswith("\\"):
                yield line.strip()
            previous = line.rstrip()


def test_commands_outside_the_quick_start_are_the_virtualenvs():
    commands = list(commands_outside_the_quick_start())
    assert len(commands) > 10
    for command in commands:
        assert command.startswith(".venv/bin/") or command.split()[0] in EXTERNAL, command


def test_the_readme_says_where_grpcurl_comes_from_and_how_to_get_the_proto():
    assert "github.com/fullstorydev/grpcurl" in README
    assert ".venv/bin/aggregator-client --proto > orderbook.proto" in README


def test_every_exit_code_of_the_client_is_documented():
    from aggregator import client

    codes = {value for name, value in vars(client).items() if name.startswith("EXIT_")}
    table = README.split("Exit codes:", 1)[1].split("\n\n", 2)[1]
    assert {int(code) for code in re.findall(r"^\| (\d+) \|", table, re.M)} == codes
