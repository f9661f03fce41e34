"""End to end on the embedded SmolLM2-135M: a LoRA run teaches it facts it did not know.

The full run (40 facts, 6 epochs) is `python benchmarks/finetune_accuracy.py` (100% after, 0% before;
see BENCHMARKS.md). Here the same script on the first 10 facts, 8 epochs (~30 s on 2 idle cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def test_lora_teaches_the_embedded_model_invented_facts(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "finetune_accuracy.py"), "--n", "10",
                        "--epochs", "8", "--out", str(tmp_path / "ad")], capture_output=True, text=True, timeout=1200)
    assert r.returncode in (0, 1), r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["base_accuracy"] == 0.0  # the base model cannot know an invented organization
    assert res["accuracy"] >= 0.9, r.stdout
    assert os.path.exists(tmp_path / "ad" / "adapter_model.safetensors")
