"""A tiny random Llama that vLLM can serve on CPU, made without any download.

Why these numbers: vLLM's CPU attention backend needs head_dim >= 64 (hidden 128 / 2 heads),
float32 because bfloat16 dies with SIGILL on these VMs, and ``max_position_embeddings`` large
enough for the longest prompt in the replayed traces (Mooncake synthetic prompts reach ~40k tokens,
Azure ~14k). The weights are random, so outputs are gibberish, but every serving code path (prefill,
decode, KV-cache paging, preemption, prefix caching) is the real one.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["write_tiny_model", "DEFAULT_MAX_POSITIONS"]

DEFAULT_MAX_POSITIONS = 65536

_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Enough varied text for a byte-level BPE to learn a few hundred merges in well under a second.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "vLLM serves large language models with paged attention and continuous batching.",
    "OpenTelemetry exports traces, metrics and logs to any collector over OTLP.",
    "Prometheus scrapes metrics, evaluates rules and sends alerts to Alertmanager.",
    "Key-value cache usage, preemptions and queueing show when a server is saturated.",
    "Hello, world! How are you today? I am fine, thank you very much.",
    "def add(a, b):\n    return a + b\n",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 and symbols {}[]()<>:;,.!?'\"",
]


def write_tiny_model(directory: str | Path, *, max_position_embeddings: int = DEFAULT_MAX_POSITIONS,
                     vocab_size: int = 512, seed: int = 0, hidden_size: int = 128,
                     num_hidden_layers: int = 2) -> Path:
    """Write config, random weights (safetensors) and a trained tokenizer to ``directory``.

    ``hidden_size`` / ``num_hidden_layers`` make a larger model whose steps take GPU-like
    milliseconds on a CPU (the demo's), so an overload builds over seconds rather than between
    two scrapes; heads stay 64 wide (the CPU attention backend's minimum).
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    specials = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="</s>")
    fast.chat_template = _CHAT_TEMPLATE
    fast.model_max_length = max_position_embeddings
    fast.save_pretrained(out)

    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=hidden_size // 64,
        num_key_value_heads=max(1, hidden_size // 128), max_position_embeddings=max_position_embeddings,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id, torch_dtype="float32", tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    # Some transformers versions write the chat template only into tokenizer_config.json, others
    # into chat_template.jinja; vLLM reads either, write the latter explicitly for clarity.
    (out / "chat_template.jinja").write_text(_CHAT_TEMPLATE)
    (out / "vllm_otel_tiny_model.json").write_text(json.dumps(
        {"made_by": "vllm-otel tiny-model", "seed": seed,
         "max_position_embeddings": max_position_embeddings, "head_dim": 64,
         "hidden_size": hidden_size, "num_hidden_layers": num_hidden_layers}, indent=2))
    return out
