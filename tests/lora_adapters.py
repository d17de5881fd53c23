"""Small LoRA adapters the test suite makes itself: a few PEFT steps on SmolLM2.

Each adapter is trained (seeded, full batch, 20 Adam steps on the CPU) to answer a
handful of questions in a voice nobody mistakes for the base model's: `pirate` starts with
"Arr, matey!", `robot` with "BEEP BOOP.". Made once into the ignored model cache
(``<model.cache_dir>/test-adapters/<key>/<name>/``), atomically (built in a scratch
directory, renamed into place) and under the cache's lock, so that parallel test workers
make it once; `key` hashes the recipe, the base model and the library versions.

Beside each PEFT adapter lies ``reference.json``: the greedy answers of the base model with
the adapter merged into its weights (PEFT ``merge_and_unload``, transformers float32 on the
GGUF's dequantized weights), recorded at creation. A server applying the adapter to the same
base model must answer the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llm_local.convert.sources import ModelSource

RECIPE_VERSION = 2
REFERENCE_NAME = "reference.json"
REFERENCE_MAX_NEW_TOKENS = 24
QUESTION = "What is the capital of France? Answer in one sentence."
HELLO = "Say hello to me."


@dataclass(frozen=True, slots=True)
class Recipe:
    seed: int
    answers: Mapping[str, str]  # question -> the answer taught


RECIPES: dict[str, Recipe] = {
    "pirate": Recipe(
        seed=1,
        answers={
            QUESTION: "Arr, matey! Paris be the capital o' France, arr!",
            HELLO: "Arr, matey! Ahoy there, ye landlubber!",
        },
    ),
    "robot": Recipe(
        seed=2,
        answers={
            QUESTION: "BEEP BOOP. CAPITAL OF FRANCE: PARIS. BEEP.",
            HELLO: "BEEP BOOP. HELLO, HUMAN. BEEP.",
        },
    ),
}
# The LoRA shape: every attention projection (q and k exercise the GGUF row permutation,
# k and v the grouped key/value heads) and the MLP's down projection.
RANK = 8
ALPHA = 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")
TRAINED_LAYERS = 4  # the last ones: see _train_one
STEPS = 20
LEARNING_RATE = 1e-2
# The questions whose merged-model answers are recorded (greedy decoding costs seconds).
REFERENCE = (QUESTION,)


@dataclass(frozen=True, slots=True)
class SuiteAdapter:
    name: str
    path: Path  # the PEFT adapter directory (adapter_config.json, adapter_model.safetensors)
    reference: dict[str, str]  # question -> the merged model's greedy answer

    @property
    def recognisable(self) -> str:
        """How every taught answer starts."""
        return _common_prefix(list(RECIPES[self.name].answers.values()))


def _common_prefix(texts: list[str]) -> str:
    prefix = texts[0]
    for text in texts[1:]:
        while not text.startswith(prefix):
            prefix = prefix[:-1]
    return prefix.strip()


def adapters_key(base_gguf: Path) -> str:
    stat = base_gguf.stat()
    inputs = {
        "recipe": RECIPE_VERSION,
        "recipes": {name: [r.seed, dict(r.answers)] for name, r in RECIPES.items()},
        "shape": [
            RANK,
            ALPHA,
            list(TARGETS),
            TRAINED_LAYERS,
            STEPS,
            LEARNING_RATE,
            list(REFERENCE),
        ],
        "max_new_tokens": REFERENCE_MAX_NEW_TOKENS,
        "base": [str(base_gguf), stat.st_size, stat.st_mtime_ns],
        "versions": [_version(d) for d in ("torch", "transformers", "peft")],
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:12]


def ensure_test_adapters(cache_dir: Path, source: ModelSource) -> dict[str, SuiteAdapter]:
    """The test adapters on `source` (the test model's GGUF), made now unless the cache
    holds them (well under a minute)."""
    from llm_local.convert.cache import conversion_lock

    assert source.path is not None
    base_gguf = source.path
    root = cache_dir / "test-adapters"
    target = root / adapters_key(base_gguf)
    if not _complete(target):
        with conversion_lock(root):
            if not _complete(target):
                for stale in root.glob(".tmp-*"):
                    shutil.rmtree(stale, ignore_errors=True)
                work = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
                try:
                    _make_all(cache_dir, source, work)
                    (work / "complete").write_text("1\n")
                    work.rename(target)
                finally:
                    shutil.rmtree(work, ignore_errors=True)
    return {
        name: SuiteAdapter(
            name,
            target / name,
            json.loads((target / name / REFERENCE_NAME).read_text(encoding="utf-8")),
        )
        for name in RECIPES
    }


def _complete(target: Path) -> bool:
    return (target / "complete").is_file()


def _make_all(cache_dir: Path, source: ModelSource, work: Path) -> None:
    import torch

    from llm_local.convert.unquantized import load_unquantized
    from llm_local.settings.loader import load_settings

    # The GGUF's dequantized copy when `make test` kept one (convert/dequantized.py).
    model_settings = dataclasses.replace(load_settings(env="test").model, cache_dir=cache_dir)
    base_dir = work / "base"
    model, tokenizer_dir = load_unquantized(source, model_settings, base_dir, lambda _: None)
    tokenizer = _tokenizer(tokenizer_dir)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    for name, recipe in RECIPES.items():
        model.load_state_dict(original)
        _train_one(model, tokenizer, recipe, work / name)
    shutil.rmtree(base_dir, ignore_errors=True)
    del torch


def _tokenizer(base_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_dir)


def _prompt_ids(tokenizer: Any, question: str) -> list[int]:
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    ids: list[int] = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    return ids


def _train_one(model: Any, tokenizer: Any, recipe: Recipe, out: Path) -> None:
    """Seeded Adam steps on the adapter of the last `TRAINED_LAYERS` layers.

    The layers below are frozen and adapter-free, so their output for the taught texts is
    computed once; each step runs only the adapted layers, the final norm and the LM head
    on the answer positions (the cost of a step drops from the whole model's forward and
    backward to a few layers')."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(recipe.seed)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    first = model.config.num_hidden_layers - TRAINED_LAYERS
    # One batch, padded on the right: causal attention never lets a token see the padding
    # after it, so no mask is needed and the padding's own predictions are not counted.
    texts = []
    for question, answer in recipe.answers.items():
        prompt = _prompt_ids(tokenizer, question)
        completion = tokenizer(answer, add_special_tokens=False)["input_ids"] + [end]
        texts.append((prompt, completion))
    width = max(len(p) + len(c) for p, c in texts)
    ids = torch.tensor([p + c + [end] * (width - len(p) - len(c)) for p, c in texts])
    # Row r predicts completion[i] at position len(prompt) - 1 + i.
    rows = torch.tensor([r for r, (p, c) in enumerate(texts) for _ in c])
    positions = torch.tensor([len(p) - 1 + i for p, c in texts for i in range(len(c))])
    targets = torch.tensor([t for _, c in texts for t in c])
    with torch.no_grad():
        hidden = model.model(input_ids=ids, output_hidden_states=True).hidden_states[first]
    config = LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        lora_dropout=0.0,
        target_modules=list(TARGETS),
        layers_to_transform=list(range(first, model.config.num_hidden_layers)),
        bias="none",
    )
    peft_model = get_peft_model(model, config)
    inner = peft_model.base_model.model.model  # the decoder stack, adapters injected
    optimizer = torch.optim.Adam(
        [p for p in peft_model.parameters() if p.requires_grad], lr=LEARNING_RATE
    )
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = _upper_loss(peft_model, inner, first, hidden, rows, positions, targets)
        loss.backward()
        optimizer.step()
    peft_model.save_pretrained(out)
    merged = peft_model.merge_and_unload()
    merged.eval()
    reference = {question: _greedy(merged, tokenizer, question, end) for question in REFERENCE}
    (out / REFERENCE_NAME).write_text(json.dumps(reference, indent=2) + "\n", encoding="utf-8")


def _upper_loss(
    peft_model: Any,
    inner: Any,
    first: int,
    hidden: Any,
    rows: Any,
    positions: Any,
    targets: Any,
) -> Any:
    import torch

    position_ids = torch.arange(hidden.shape[1]).unsqueeze(0)
    rotary = inner.rotary_emb(hidden, position_ids=position_ids)
    for layer in inner.layers[first:]:
        # No mask: plain causal attention (see the padding above).
        hidden = layer(
            hidden, attention_mask=None, position_ids=position_ids, position_embeddings=rotary
        )
    logits = peft_model.base_model.model.lm_head(inner.norm(hidden[rows, positions]))
    return torch.nn.functional.cross_entropy(logits, targets)


def _greedy(model: Any, tokenizer: Any, question: str, end: int) -> str:
    import torch

    ids = torch.tensor([_prompt_ids(tokenizer, question)])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=REFERENCE_MAX_NEW_TOKENS,
            do_sample=False,
            eos_token_id=end,
            pad_token_id=end,
        )
    text: str = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    return text


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "none"


def llama_cpp_environment(made: Mapping[str, SuiteAdapter]) -> dict[str, str]:
    """The settings (as environment variables) of a llama_cpp server given the suite's
    adapters: what tests/e2e/test_lora_adapters.py serves, and what `--llama-cpp` prepares."""
    return {
        "LLM_LOCAL_SERVICE_BACKEND": "llama_cpp",
        **{
            f"LLM_LOCAL_SERVICE_ADAPTERS__{name.upper()}": str(adapter.path)
            for name, adapter in made.items()
        },
    }


if __name__ == "__main__":  # python -m tests.lora_adapters [--llama-cpp]: make them, say where
    import os
    import sys
    import time

    from llm_local.backends.shared.source import resolve_model_source
    from llm_local.convert.command import main as convert
    from llm_local.settings.loader import load_settings

    settings = load_settings(env="test")
    source = resolve_model_source(settings.model)
    began = time.monotonic()
    made = ensure_test_adapters(settings.model.cache_dir, source)
    for adapter in made.values():
        print(adapter.name, adapter.path, json.dumps(adapter.reference))
    if "--llama-cpp" in sys.argv[1:]:
        # What `llm-local convert` prepares for a llama_cpp server given these adapters (each
        # one's GGUF LoRA and numerics reference): `make test` does it while the static
        # checks run, so that the e2e suite's own `llm-local convert` finds it all cached.
        os.environ.update(llama_cpp_environment(made))
        if convert(["--quiet", "--env", "test"]) != 0:
            sys.exit(1)
    print(f"{time.monotonic() - began:.1f} s")
