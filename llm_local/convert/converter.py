"""Run CTranslate2's transformers converter and make the result self-sufficient.

The output holds the CTranslate2 model and every tokenizer file serving needs
(tokenizer.json, tokenizer_config.json, chat_template.jinja, generation_config.json,
...), so the server never reads the Hugging Face directory or the network.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_local.convert.errors import ConversionError, first_line

# Copied from the Hugging Face directory when present. Not config.json: CTranslate2
# writes its own config.json, which must not be replaced.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
REQUIRED_FILES = ("model.bin", "config.json", "tokenizer.json", "tokenizer_config.json")
_MAX_LISTED_ARCHITECTURES = 12


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """What the manifest records about the model itself."""

    model_type: str
    architectures: list[str]
    context_length: int | None  # max_position_embeddings, when the config says

    def as_dict(self) -> dict[str, object]:
        return {
            "model_type": self.model_type,
            "architectures": self.architectures,
            "context_length": self.context_length,
        }


def check_architecture(hf_dir: Path) -> ModelFacts:
    """Fail in seconds, before loading any weights, when CTranslate2 cannot convert it."""
    import transformers
    from ctranslate2.converters import transformers as ct2_transformers

    try:
        config = transformers.AutoConfig.from_pretrained(hf_dir)
    except (OSError, ValueError, KeyError) as exc:
        raise ConversionError(
            f"cannot read the model config in {hf_dir}: {first_line(exc)}"
        ) from exc
    config_name = type(config).__name__
    loaders: dict[str, Any] | None = getattr(ct2_transformers, "_MODEL_LOADERS", None)
    if loaders is not None and config_name not in loaders:
        families = sorted(name.removesuffix("Config") for name in loaders)
        shown = ", ".join(families[:_MAX_LISTED_ARCHITECTURES])
        raise ConversionError(
            f"unsupported architecture: CTranslate2 cannot convert {config.model_type!r} models "
            f"({config_name}); it converts {shown}, ... ({len(families)} in all)"
        )
    return ModelFacts(
        model_type=str(config.model_type),
        architectures=list(getattr(config, "architectures", None) or []),
        context_length=getattr(config, "max_position_embeddings", None),
    )


def convert_to_ct2(
    hf_dir: Path,
    output_dir: Path,
    quantization: str,
    *,
    preloaded_model: Any = None,
    on_model: Callable[[Any, Any], None] | None = None,
) -> None:
    """Convert `hf_dir` (or `preloaded_model`, with `hf_dir` giving its config and
    tokenizer) to a CTranslate2 model in `output_dir`, tokenizer files included.

    `on_model(model, tokenizer)` sees the transformers model with its unquantized weights
    before the converter reads them: the converter takes the model apart as it goes, so
    nothing can use it afterwards."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    except (OSError, ValueError) as exc:
        raise ConversionError(f"cannot load the tokenizer in {hf_dir}: {first_line(exc)}") from exc
    present = [name for name in TOKENIZER_FILES if (hf_dir / name).is_file()]
    converter = _converter_class()(
        str(hf_dir),
        copy_files=present,
        model=preloaded_model,
        tokenizer=tokenizer,
        on_model=on_model,
    )
    try:
        converter.convert(str(output_dir), quantization=quantization, force=True)
    except (ValueError, NotImplementedError) as exc:
        raise ConversionError(f"CTranslate2 cannot convert this model: {first_line(exc)}") from exc
    _complete_tokenizer_files(tokenizer, output_dir)
    missing = [name for name in REQUIRED_FILES if not (output_dir / name).is_file()]
    if missing:
        raise ConversionError(f"the converted model lacks {', '.join(missing)}")


def write_tokenizer_files(tokenizer: Any, hf_dir: Path, target: Path) -> None:
    """The tokenizer files serving reads, as a conversion leaves them beside model.bin."""
    target.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (hf_dir / name).is_file() and not (target / name).exists():
            shutil.copy(hf_dir / name, target / name)
    _complete_tokenizer_files(tokenizer, target)


def _converter_class() -> Any:
    from ctranslate2.converters import TransformersConverter

    class PreloadedConverter(TransformersConverter):  # type: ignore[misc]
        """Uses a model and tokenizer already in memory instead of loading them again,
        and shows the model to `on_model` before converting it."""

        def __init__(
            self,
            path: str,
            *,
            model: Any,
            tokenizer: Any,
            on_model: Callable[[Any, Any], None] | None,
            **kwargs: Any,
        ) -> None:
            super().__init__(path, **kwargs)
            self._preloaded_model = model
            self._preloaded_tokenizer = tokenizer
            self._on_model = on_model

        def load_model(self, model_class: Any, model_name_or_path: str, **kwargs: Any) -> Any:
            model = self._preloaded_model
            if model is None:
                model = super().load_model(model_class, model_name_or_path, **kwargs)
            if self._on_model is not None:
                self._on_model(model, self._preloaded_tokenizer)
            return model

        def load_tokenizer(
            self, tokenizer_class: Any, model_name_or_path: str, **kwargs: Any
        ) -> Any:
            return self._preloaded_tokenizer

    return PreloadedConverter


def _complete_tokenizer_files(tokenizer: Any, output_dir: Path) -> None:
    """Fill in what the source lacked: a tokenizer.json made from a slow tokenizer, a
    chat template kept only inside tokenizer_config.json."""
    scratch = output_dir / ".tokenizer"
    tokenizer.save_pretrained(scratch)
    for made in sorted(scratch.iterdir()):
        if not (output_dir / made.name).exists() and made.name in TOKENIZER_FILES:
            shutil.move(str(made), output_dir / made.name)
    shutil.rmtree(scratch)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and not (output_dir / "chat_template.jinja").exists():
        (output_dir / "chat_template.jinja").write_text(template, encoding="utf-8")
