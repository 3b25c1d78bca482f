"""Which text-generation architectures vLLM 0.33.0 can serve with LoRA, read from its source.

vLLM enables LoRA only for a model class that is `SupportsLoRA` (vllm/model_executor/models/interfaces.py:
the protocol, or a class attribute `supports_lora = True`, anywhere in its bases); any other class
stops inside `LLM(enable_lora=True)` with "... does not support LoRA yet."
(vllm/v1/worker/lora_model_runner_mixin.py). The tables below map the `architectures` names of
vllm/model_executor/models/registry.py (`_TEXT_GENERATION_MODELS` and the Transformers-backend
`_TRANSFORMERS_SUPPORTED_MODELS`) to that answer. They were derived from the vLLM 0.33.0 wheel by

    pip download --no-deps vllm==0.33.0 -d /tmp/vllm && unzip -q /tmp/vllm/vllm-0.33.0-*.whl -d /tmp/vllm/src
    python -m gpo_exp.rollout.vllm_lora_archs /tmp/vllm/src/vllm        # prints both tables; --check compares

which follows each registered class's bases through the model modules' imports (no vllm import:
the wheel is CUDA-only). An architecture in neither table is not registered in vLLM 0.33.0; vLLM
then tries its Transformers backend, whose classes are `SupportsLoRA` (models/transformers/base.py).
"""
from __future__ import annotations

import argparse
import ast
from pathlib import Path
from typing import Iterator

# SupportsLoRA in vLLM 0.33.0 (registry name -> class that is SupportsLoRA)
LORA_ARCHITECTURES = frozenset({
    "AXK1ForCausalLM", "AfmoeForCausalLM", "AliceAIForCausalLM", "ApertusForCausalLM", "ArceeForCausalLM",
    "BailingMoeForCausalLM", "BailingMoeV2ForCausalLM", "ChatGLMForConditionalGeneration", "ChatGLMModel",
    "Cohere2ForCausalLM", "CohereForCausalLM", "CwmForCausalLM", "DeciLMForCausalLM", "DeepseekForCausalLM",
    "DeepseekV2ForCausalLM", "DeepseekV32ForCausalLM", "DeepseekV3ForCausalLM", "Emu3ForConditionalGeneration",
    "Ernie4_5ForCausalLM", "Ernie4_5_MoeForCausalLM", "Exaone4ForCausalLM", "ExaoneForCausalLM",
    "ExaoneMoEForCausalLM", "ExaoneMoeForCausalLM", "FalconH1ForCausalLM", "FlexOlmoForCausalLM",
    "GPTBigCodeForCausalLM", "GPTNeoXForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma4ForCausalLM",
    "GemmaForCausalLM", "Glm4ForCausalLM", "Glm4MoeForCausalLM", "Glm4MoeLiteForCausalLM", "GlmForCausalLM",
    "GlmMoeDsaForCausalLM", "GptOssForCausalLM", "GraniteForCausalLM", "GraniteMoeForCausalLM",
    "GraniteMoeHybridForCausalLM", "GraniteMoeSWAForCausalLM", "GraniteMoeSharedForCausalLM",
    "GraniteSWAForCausalLM", "HYV3ForCausalLM", "HYV4ForCausalLM", "HunYuanDenseV1ForCausalLM",
    "HunYuanMoEV1ForCausalLM", "HunYuanVLForConditionalGeneration", "HyperCLOVAXForCausalLM",
    "IQuestCoderForCausalLM", "InklingForCausalLM", "InklingForConditionalGeneration", "InternLM2ForCausalLM",
    "InternLM3ForCausalLM", "Jais2ForCausalLM", "JambaForCausalLM", "K2HorizonForCausalLM", "Kolibri1ForCausalLM",
    "LLaMAForCausalLM", "LagunaForCausalLM", "Lfm2ForCausalLM", "Lfm2MoeForCausalLM", "Llama4ForCausalLM",
    "LlamaForCausalLM", "LongcatFlashForCausalLM", "LongcatFlashNgramForCausalLM", "MellumForCausalLM",
    "MiMoForCausalLM", "MiniCPM3ForCausalLM", "MiniCPMForCausalLM", "MiniMaxM2ForCausalLM", "Ministral3ForCausalLM",
    "MistralForCausalLM", "MistralLarge3ForCausalLM", "MixtralForCausalLM", "MuseGlimmerForCausalLM",
    "NanbeigeForCausalLM", "NemotronForCausalLM", "NemotronHForCausalLM", "NemotronHPuzzleForCausalLM",
    "OPTForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM", "OlmoForCausalLM", "OlmoHybridForCausalLM",
    "OlmoeForCausalLM", "PanguEmbeddedForCausalLM", "PanguProMoEV2ForCausalLM", "PanguUltraMoEForCausalLM",
    "Param2MoEForCausalLM", "Phi3ForCausalLM", "PhiForCausalLM", "PhiMoEForCausalLM", "Plamo3ForCausalLM",
    "Qwen2ForCausalLM", "Qwen2MoeForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Qwen3NextForCausalLM",
    "Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM", "Qwen4ExpForCausalLM", "Rnj1ForCausalLM", "SarvamMLAForCausalLM",
    "SarvamMoEForCausalLM", "SeedOssForCausalLM", "SmolLM3ForCausalLM", "SolarForCausalLM", "Starcoder2ForCausalLM",
    "Step5ForCausalLM", "TeleChat2ForCausalLM", "TeleChat3ForCausalLM", "TeleFLMForCausalLM",
    "VaultGemmaForCausalLM", "VibeVoiceAsrForConditionalGeneration",
})
# Registered, but not SupportsLoRA in vLLM 0.33.0 (e.g. GPT2LMHeadModel, models/gpt2.py: nn.Module, SupportsPP)
NO_LORA_ARCHITECTURES = frozenset({
    "BailingMoeV2_5ForCausalLM", "BailingMoeV3ForCausalLM", "BeamForCausalLM", "BloomForCausalLM",
    "Cohere2MoeForCausalLM", "DbrxForCausalLM", "DeepseekV4ForCausalLM", "DomynEdgeForCausalLM", "DoryForCausalLM",
    "FalconForCausalLM", "FalconMambaForCausalLM", "FlintForCausalLM", "GPT2LMHeadModel", "GPTJForCausalLM",
    "Gemma3nForCausalLM", "Glm5NextForCausalLM", "HCXVisionV2ForCausalLM", "HrmTextForCausalLM",
    "IQuestLoopCoderForCausalLM", "KimiLinearForCausalLM", "Mamba2ForCausalLM", "MambaForCausalLM",
    "MiMoV2FlashForCausalLM", "MiMoV2ForCausalLM", "MiniMaxM3SparseForCausalLM", "OrionForCausalLM",
    "StableLmForCausalLM", "Step1ForCausalLM", "Step3TextForCausalLM", "Step3p5ForCausalLM", "Zamba2ForCausalLM",
})
REGISTRY_TABLES = ("_TEXT_GENERATION_MODELS", "_TRANSFORMERS_SUPPORTED_MODELS")


def supports_lora(architecture: str) -> bool | None:
    """True/False for an architecture vLLM 0.33.0 registers; None for one it does not."""
    if architecture in LORA_ARCHITECTURES:
        return True
    return False if architecture in NO_LORA_ARCHITECTURES else None


def _module_body(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """A module's top-level statements, including those under `if`/`try` (platform-dependent imports)."""
    for node in body:
        if isinstance(node, (ast.If, ast.Try)):
            yield from _module_body(node.body)
            yield from _module_body(node.orelse)
        else:
            yield node


def _base_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Subscript):
        return _base_name(node.value)
    return None


def _sets_supports_lora(cls: ast.ClassDef) -> bool:
    for s in cls.body:
        targets = s.targets if isinstance(s, ast.Assign) else [s.target] if isinstance(s, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == "supports_lora" for t in targets) \
                and isinstance(s.value, ast.Constant) and s.value.value is True:
            return True
    return False


def derive(vllm_dir: Path) -> tuple[set[str], set[str]]:
    """(architectures whose class is SupportsLoRA, those whose class is not), from vLLM's source tree."""
    vllm_dir = Path(vllm_dir)
    modules: dict[str, tuple[dict[str, tuple[list[str], bool]], dict[str, tuple[str, str]]]] = {}
    files = [*(vllm_dir / "model_executor" / "models").rglob("*.py"), *(vllm_dir / "models").rglob("*.py")]
    for path in files:
        try:
            tree = ast.parse(path.read_text())
        except (SyntaxError, UnicodeDecodeError):
            continue
        parts = list(path.relative_to(vllm_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":  # a package: its own name, and relative imports start inside it
            parts = parts[:-1]
        package = parts if path.name == "__init__.py" else parts[:-1]
        classes: dict[str, tuple[list[str], bool]] = {}
        imports: dict[str, tuple[str, str]] = {}
        for node in _module_body(tree.body):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package[: len(package) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                for alias in node.names:
                    imports.setdefault(alias.asname or alias.name, (base, alias.name))  # the first branch (CUDA)
            elif isinstance(node, ast.ClassDef):
                bases = [b for b in map(_base_name, node.bases) if b]
                classes[node.name] = (bases, _sets_supports_lora(node))
        modules[".".join(parts)] = (classes, imports)

    memo: dict[tuple[str, str], bool] = {}

    def lora(module: str, name: str, depth: int = 0) -> bool:
        if name == "SupportsLoRA":
            return True
        if depth > 40 or module not in modules:
            return False
        if (module, name) not in memo:
            classes, imports = modules[module]
            if name in classes:
                bases, flag = classes[name]
                memo[(module, name)] = flag or any(lora(module, b, depth + 1) for b in bases)
            elif name in imports:
                memo[(module, name)] = lora(*imports[name], depth + 1)
            else:
                memo[(module, name)] = False
        return memo[(module, name)]

    registry = ast.parse((vllm_dir / "model_executor" / "models" / "registry.py").read_text())
    yes, no = set(), set()
    for node in registry.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict) and \
                any(isinstance(t, ast.Name) and t.id in REGISTRY_TABLES for t in node.targets):
            for key, value in zip(node.value.keys, node.value.values):
                if isinstance(key, ast.Constant) and isinstance(value, ast.Tuple) and len(value.elts) == 2:
                    mod, cls = (e.value for e in value.elts if isinstance(e, ast.Constant))
                    full = mod if mod.startswith("vllm.") else f"vllm.model_executor.models.{mod}"
                    (yes if lora(full, cls) else no).add(key.value)
    return yes, no


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("vllm_dir", help="the `vllm` package directory of an unpacked vLLM wheel")
    ap.add_argument("--check", action="store_true", help="exit 1 unless the tables above match this source")
    args = ap.parse_args(argv)
    yes, no = derive(Path(args.vllm_dir))
    print(f"SupportsLoRA ({len(yes)}): {', '.join(sorted(yes))}")
    print(f"not SupportsLoRA ({len(no)}): {', '.join(sorted(no))}")
    if args.check and (yes != LORA_ARCHITECTURES or no != NO_LORA_ARCHITECTURES):
        raise SystemExit(f"tables differ from {args.vllm_dir}: only here {sorted(yes ^ LORA_ARCHITECTURES)}, "
                         f"{sorted(no ^ NO_LORA_ARCHITECTURES)}")


if __name__ == "__main__":
    main()
