"""Slow end-to-end checks on the real embedded SmolLM2-135M-Instruct."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_embedded_model_converts_to_a_plain_hf_directory(embedded_model_dir):
    config = json.loads((Path(embedded_model_dir) / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["num_hidden_layers"] == 30 and config["vocab_size"] == 49152 and config["tie_word_embeddings"]
    assert (Path(embedded_model_dir) / "model.safetensors").exists()


@pytest.mark.vllm
def test_two_steps_on_real_smollm2_with_vllm(embedded_model_dir, tmp_path):
    pytest.importorskip("vllm")
    out = tmp_path / "run"
    cmd = [
        sys.executable, "scripts/train.py", "--sampler", "vllm", "--steps", "2", "--groups_per_step", "2",
        "--samples_per_group", "2", "--max_tokens", "32", "--max_heldout_rows", "4",
        # Tight, so fp32: SmolLM2 ties lm_head to the embeddings, and a push that unties them shows up here.
        "--dtype", "float32", "--parity_threshold", "1e-3", "--eval.every", "0", "--out_dir", str(out),
    ]
    subprocess.run(cmd, check=True, timeout=900)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
    for r in records:
        assert r["sync/parity_max_abs"] < 1e-3
        assert r["rollout/trainer_lp_mismatch"] < 1e-3
        assert r["opd/active_tokens"] > 0
        # the privileged teacher disagrees with the student on the student's own samples
        assert r["opd/sampled_reverse_kl"] != 0.0
    assert (out / "final" / "model.safetensors").exists()
