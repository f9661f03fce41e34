"""`inhouse` on a Meta-layout directory (2 shards + tokenizer.model), as a user who downloaded Llama has it."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

from inhouse.tokenizer import llama3_tokenizer_path

BIN = Path(sys.executable).parent / "inhouse"
CMD = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "inhouse.cli"]


def test_generate_and_info_on_a_meta_checkpoint(tmp_path, weights_helpers):
    h = weights_helpers
    args = h.TINY.replace(vocab_size=128256)
    params = {**h.PARAMS_JSON, "vocab_size": 128256}
    h.save_meta(str(tmp_path), h.random_state_dict(args, seed=3), params, n_shards=2)
    shutil.copy(llama3_tokenizer_path(), tmp_path / "tokenizer.model")

    r = subprocess.run(CMD + ["info", str(tmp_path), "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["format"] == "meta" and info["architecture"]["vocab_size"] == 128256
    assert "factor 8" in info["architecture"]["rope_scaling"]

    r = subprocess.run(CMD + ["generate", str(tmp_path), "Hello", "--json", "--max-tokens", "6", "--dtype", "float32"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    # Llama 3.1 chat format: <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>
    # <|start_header_id|>assistant<|end_header_id|>\n\n = 11 tokens
    assert out["usage"]["prompt_tokens"] == 11
    assert 1 <= len(out["token_ids"]) <= 6
