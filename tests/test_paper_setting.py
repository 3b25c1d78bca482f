"""The paper's setting: the sampled eval protocol and truncation counts through a real (tiny) run."""
from __future__ import annotations

import json

from omegaconf import OmegaConf

from gpo_exp.training.run_config import validate
from gpo_exp.run import apply_fast_dev_run, train


def _run(compose, tmp_path, overrides):
    dcfg = compose(["trainer.fast_dev_run=true", "logger.wandb=false", "trainer.progress_bar=false",
                    "trainer.save_checkpoint=false", *overrides])
    cfg = validate(dcfg)
    apply_fast_dev_run(cfg)
    return cfg, train(cfg, tmp_path, OmegaConf.to_container(dcfg, resolve=True))


def test_sampled_protocol_names_its_headline_and_truncations_are_logged(compose, tmp_path):
    """No greedy decoding; headline = sampled pass@1; a 12-token limit cuts arith answers off and is counted."""
    from gpo_exp.report import build_report

    _, summary = _run(compose, tmp_path / "run", ["trainer.eval_protocol=sampled", "trainer.eval_samples=2", "engine.max_new_tokens=12",
                                                  "trainer.eval_rows=4", "gpo.prompts_per_round=4"])
    assert summary["headline_metric"] == "eval/sampled_accuracy_after"
    assert summary["eval/accuracy_after"] is None and 0.0 <= summary["eval/sampled_accuracy_after"] <= 1.0
    rounds = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert "eval/accuracy" not in rounds[0] and rounds[0]["eval/truncated"] > 0.5
    r1 = rounds[1]
    assert r1["rollout/truncated"] == round(r1["rollout/truncated_fraction"] * r1["rollout/trajectories"])
    assert r1["rollout/truncated_fraction"] > 0.5  # "Q: 7,+5,-3,*4" needs ~40 characters
    assert "gpo/estimation_truncated" in r1 and "gpo/candidates_truncated" in r1
    report = build_report(tmp_path)  # the report reads the headline the run names
    assert {r.metric for r in report.rows if r.benchmark == "arith"} >= {"eval/sampled_accuracy_after"}


# --- reasoning presets: random-init twins of their shape, one fast_dev_run each ---------------------
import pytest  # noqa: E402

from gpo_exp.models.config import ModelConfig  # noqa: E402
from gpo_exp.models.random_init import SHAPES, shape_of, small_config  # noqa: E402
from gpo_exp.registry import ConfigError  # noqa: E402
from tests.conftest import CONF_DIR  # noqa: E402

PRESETS = {  # preset -> (hub id, benchmark of its smoke run)
    "r1_distill_qwen_7b": ("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "math"),
    "r1_distill_qwen_1p5b": ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "math"),
    "qwen25_math_1p5b_instruct": ("Qwen/Qwen2.5-Math-1.5B-Instruct", "math"),
    "qwen25_0p5b_instruct": ("Qwen/Qwen2.5-0.5B-Instruct", "gsm8k"),
    "qwen25_1p5b_instruct": ("Qwen/Qwen2.5-1.5B-Instruct", "gsm8k"),
}
FIX = CONF_DIR.parent / "tests" / "fixtures"
DATA = {"math": [f"benchmark.data_files={FIX / 'math_train.jsonl'}", f"benchmark.test_data_files={FIX / 'math500.jsonl'}"],
        "gsm8k": [f"benchmark.data_files={{train: {FIX / 'gsm8k.jsonl'}, test: {FIX / 'gsm8k.jsonl'}}}"]}
SMALL = ["model.source=random", "model.n_layer=1", "model.n_embd=32", "model.n_head=4", "model.dtype=float32",
         "model.gradient_checkpointing=false", "engine.max_new_tokens=8", "gpo.prompts_per_round=2",
         "gpo.samples_per_prompt=2", "gpo.reset_samples=2", "estimator.k=2", "trainer.eval_rows=2",
         "trainer.eval_samples=1"]


def test_shapes_are_the_hub_models_parameter_counts():
    billions = {k: round(v.params / 1e9, 2) for k, v in SHAPES.items()}
    assert billions == {"deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": 7.62, "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": 1.78,
                        "Qwen/Qwen2.5-Math-1.5B-Instruct": 1.54, "Qwen/Qwen2.5-1.5B-Instruct": 1.54,
                        "Qwen/Qwen2.5-0.5B-Instruct": 0.49}
    assert set(SHAPES) == {hub for hub, _ in PRESETS.values()}


@pytest.mark.parametrize("path,heads,kv,inter,tied", [
    ("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", 7, 1, 680, False),  # 28 q heads on 4 kv heads; MLP 5.29x
    ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", 6, 1, 744, False),  # 12 on 2; MLP 5.83x
    ("Qwen/Qwen2.5-0.5B-Instruct", 7, 1, 696, True),  # 14 on 2; MLP 5.43x; tied embeddings
])
def test_small_twin_keeps_the_gqa_group_mlp_ratio_and_tying(path, heads, kv, inter, tied):
    conf = small_config(SHAPES[path], ModelConfig(source="random", path=path), 100, {})
    assert (conf.num_attention_heads, conf.num_key_value_heads, conf.head_dim) == (heads, kv, 32)
    assert (conf.hidden_size, conf.intermediate_size, conf.tie_word_embeddings) == (128, inter, tied)
    assert conf.rope_parameters["rope_theta"] == SHAPES[path].rope_theta


def test_random_source_names_the_known_shapes_and_bad_head_sizes():
    with pytest.raises(ConfigError, match="model.path='gpt2' for model.source=random"):
        shape_of(ModelConfig(source="random", path="gpt2"))
    with pytest.raises(ConfigError, match="model.n_embd=30"):
        small_config(SHAPES["Qwen/Qwen2.5-0.5B-Instruct"], ModelConfig(source="random", n_embd=30, n_head=4), 10, {})


@pytest.mark.parametrize("preset", [pytest.param(p, marks=() if p == "r1_distill_qwen_7b" else pytest.mark.slow)
                                    for p in PRESETS])
def test_preset_fast_dev_run_on_its_random_twin(compose, tmp_path, preset):
    """The whole loop (LoRA all-linear, chat template, GPO round, sampled eval) on a 1-layer twin."""
    hub, bench = PRESETS[preset]
    proto = "sampled" if preset.startswith("r1_") else "greedy"
    cfg, summary = _run(compose, tmp_path, [f"model={preset}", f"benchmark={bench}", *DATA[bench], *SMALL,
                                            f"trainer.eval_protocol={proto}"])
    assert cfg.model.path == hub and cfg.model.lora_target_modules == "all-linear" and cfg.model.lora_r == 16
    # a random twin never reaches an answer: no reward differences, nothing trained, and the run says so
    assert summary["status"] == "no_signal" and summary["gpo/examples"] == 0
    assert summary["rounds"] == 1 and summary["rollout/generated_tokens"] > 0
    assert summary["headline_metric"] == ("eval/sampled_accuracy_after" if proto == "sampled" else "eval/accuracy_after")
    assert summary["config"]["engine"]["temperature"] == (0.6 if preset.startswith("r1_") else 0.7)
    rounds = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert rounds[1]["rollout/truncated_fraction"] == 1.0  # 8 new tokens never finish a random model's answer


# --- the ready experiments and the paper sweep, on the CPU with random twins ------------------------
ON_CPU = ["trainer.accelerator=cpu", "trainer.precision=32-true", *DATA["math"], *SMALL]


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["paper_r1_7b_math", "paper_r1_1p5b_math"])
def test_experiment_fast_dev_run_on_its_random_twin(compose, tmp_path, experiment):
    cfg, summary = _run(compose, tmp_path, [f"experiment={experiment}", *ON_CPU])
    assert cfg.benchmark.name == "math" and cfg.trainer.eval_protocol == "sampled" and cfg.estimator.name == "mc"
    assert summary["status"] == ("ok" if summary["gpo/examples"] else "no_signal")
    assert summary["headline_metric"] == "eval/sampled_accuracy_after"


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["dpo", "kto", "simpo", "orpo", "ppo"])
@pytest.mark.parametrize("gpo", ["true", "false"])
def test_paper_sweep_arm_runs_on_the_7b_twin(compose, tmp_path, optimizer, gpo):
    _, summary = _run(compose, tmp_path, ["experiment=paper_r1_7b_math", f"optimizer={optimizer}",
                                          f"gpo.enabled={gpo}", *ON_CPU])
    assert summary["status"] == ("ok" if summary["gpo/examples"] else "no_signal")
    assert summary["arm"] == (f"gpo-{optimizer}" if gpo == "true" else optimizer)
