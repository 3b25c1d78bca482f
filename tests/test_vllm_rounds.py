"""The round loop tells an engine that keeps its own weights (engine.backend=vllm) when to follow the policy.

A real GPO round on the embedded tiny model, with the HF engine extended by the two hooks the vLLM
backend implements (`follow_policy`, `release`): the callback must sync at fit start, let the engine
sleep when training starts, and sync again after training, with the trained weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from omegaconf import OmegaConf

from gpo_exp.training.run_config import validate
from gpo_exp.rollout import backends
from gpo_exp.rollout.engine import HFRolloutEngine
from gpo_exp.run import apply_fast_dev_run, train


@dataclass
class RecordingEngine(HFRolloutEngine):
    events: list = field(default_factory=list)

    def follow_policy(self, policy, round_idx: int = 0) -> None:
        snapshot = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
        self.events.append(("follow", round_idx, snapshot, policy is self.model))

    def release(self) -> None:
        self.events.append(("release",))


def test_the_engine_follows_the_policy_at_fit_start_and_after_each_round(compose, tmp_path, monkeypatch):
    made = []
    build = backends.build_engine

    def recording(cfg, policy, tokenizer, default_max_new_tokens, work_dir, seed=0, progress=False, max_prompt_len=None):
        assert max_prompt_len is None  # the HF engine needs no KV-cache size
        base = build(cfg, policy, tokenizer, default_max_new_tokens, work_dir, seed, progress)
        made.append(RecordingEngine(base.model, base.eos_id, base.pad_id, base.cfg, base.default_max_new_tokens))
        return made[-1]

    monkeypatch.setattr(backends, "build_engine", recording)
    dcfg = compose(["trainer.fast_dev_run=true", "logger.wandb=false", "trainer.progress_bar=false"])
    cfg = validate(dcfg)
    apply_fast_dev_run(cfg)
    summary = train(cfg, tmp_path, OmegaConf.to_container(dcfg, resolve=True))
    assert summary["status"] == "ok" and summary["rounds"] == 1
    events = made[0].events
    assert [e[:2] for e in events] == [("follow", 0), ("release",), ("follow", 1)]
    assert events[0][3] and events[2][3]  # handed the policy module itself
    before, after = events[0][2], events[2][2]
    assert any(not torch.equal(before[n], after[n]) for n in before)  # the second sync sees the trained weights
