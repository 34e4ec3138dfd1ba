"""Hugging Face causal language models by name, built locally (nothing is downloaded).

``hf-causal-lm:<model_type>`` builds a freshly initialised ``AutoModelForCausalLM`` from
``transformers.AutoConfig.for_model(model_type, **kwargs)`` (``llama``, ``gpt2``, ``qwen2``,
...: the shapes in ``student.kwargs``, e.g. ``{hidden_size: 128, num_hidden_layers: 2,
num_attention_heads: 4, intermediate_size: 256}``); ``vocab_size`` is the data's. ``hf-causal-lm:<folder>``
loads a local model folder (``config.json`` and weights, ``local_files_only``): a released
teacher. The model returns the next-token logits ``(batch, length, vocabulary)``;
:meth:`CausalLM.forward_hidden` adds its hidden states (for a hidden-state loss).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from torch import Tensor, nn

PREFIX = "hf-causal-lm:"


def names_a_local_folder(name: str | None) -> bool:
    """Whether ``name`` is ``hf-causal-lm:<folder>`` with that folder present: a model that
    brings its own weights (a released teacher needs no ``teacher.checkpoint``)."""
    return name is not None and name.startswith(PREFIX) and Path(name[len(PREFIX) :]).is_dir()


class CausalLM(nn.Module):
    """``forward(input_ids) -> logits``; ``model`` is the Hugging Face model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits

    def forward_hidden(self, input_ids: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        """The logits and the hidden states ``(batch, length, hidden_size)``: the embeddings'
        output, then each layer's (``num_hidden_layers + 1`` in all; Hugging Face's last is after
        the final norm, the input of the output head)."""
        out = self.model(input_ids=input_ids, use_cache=False, output_hidden_states=True)
        return out.logits, tuple(out.hidden_states)

    @property
    def hidden_shape(self) -> tuple[int, int]:
        """(number of hidden states, their width): ``num_hidden_layers + 1`` and ``hidden_size``."""
        config: Any = self.model.config
        return config.num_hidden_layers + 1, config.hidden_size


def create_causal_lm(name: str, vocab_size: int, kwargs: dict[str, Any]) -> CausalLM:
    try:
        import transformers
    except ImportError:
        raise ValueError(f"model {name!r} needs transformers: pip install 'dtokd[lm]'") from None
    spec = name[len(PREFIX) :]
    if Path(spec).is_dir():
        # float32 unless the kwargs say otherwise (transformers would keep the folder's dtype: a
        # bf16 checkpoint would train with bf16 weights and optimizer state)
        options = {"dtype": "float32", **kwargs}
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(spec, local_files_only=True, **options)
        except (OSError, ValueError) as error:
            raise ValueError(f"{spec} is not a local causal LM folder ({str(error).splitlines()[0][:200]})") from None
        if model.config.vocab_size != vocab_size:
            raise ValueError(
                f"{spec} has a vocabulary of {model.config.vocab_size}, the data's tokenizer "
                f"{vocab_size}: give the model's own tokenizer (data.text.tokenizer)"
            )
        return CausalLM(model)
    if "vocab_size" in kwargs:
        raise ValueError(f"model {name!r}: vocab_size comes from the data's tokenizer; remove it from the kwargs")
    try:
        default = transformers.AutoConfig.for_model(spec)
    except ValueError as error:
        raise ValueError(f"model {name!r}: {str(error).splitlines()[0][:200]}") from None
    known = set(default.to_dict()) | set(inspect.signature(type(default).__init__).parameters)
    unknown = sorted(set(kwargs) - known)
    if unknown:  # a config stores any keyword it is given: a misspelt field would silently do nothing
        raise ValueError(f"model {name!r} does not take kwargs {unknown} (its config has no such field)")
    config = transformers.AutoConfig.for_model(spec, vocab_size=vocab_size, **kwargs)
    return CausalLM(transformers.AutoModelForCausalLM.from_config(config))
