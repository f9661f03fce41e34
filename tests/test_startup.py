"""Start-up: torch and the engine are imported with the collector paused, then frozen.

`import torch` makes ~180k long-lived objects; with the collector on, it walked them ~370 times
while they were made (0.24-0.36 s of a 2-3 s start on a 2-core Xeon: ~10% of the time to a first
token). The helper must leave the collector as it found it, and nothing may be collected (or
walked) during the imports.
"""

import subprocess
import sys

PROBE = """
import gc, sys
from inhouse.util import import_torch_frozen
passes = []
gc.callbacks.append(lambda phase, info: phase == "start" and passes.append(info["generation"]))
{before}
frozen = import_torch_frozen()
print(frozen, len(passes), gc.isenabled(), "torch" in sys.modules, "inhouse.engine.llm" in sys.modules)
"""


def _probe(before: str = "") -> list[str]:
    r = subprocess.run([sys.executable, "-c", PROBE.format(before=before)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_imports_run_without_the_collector_and_end_frozen():
    frozen, passes, enabled, torch_in, engine_in = _probe()
    assert int(frozen) > 50_000  # torch's objects, out of every later collection's way
    assert passes == "0"
    assert enabled == "True" and torch_in == "True" and engine_in == "True"


def test_a_collector_switched_off_stays_off():
    assert _probe("gc.disable()")[2] == "False"


def test_the_command_line_does_it_before_loading_a_model():
    r = subprocess.run([sys.executable, "-c", "import sys, inhouse.cli; print('torch' in sys.modules)"],
                       capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "False", r.stderr  # importing the command line does not pull torch in
    r = subprocess.run([sys.executable, "-m", "inhouse.cli", "generate", "-v", "--max-tokens", "1", "Hi"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stderr.splitlines() if "imported torch and the engine" in ln)
    assert int(line.split("(")[1].split()[0]) > 50_000
