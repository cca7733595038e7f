"""The paper's two real tokenizers, with their real chat templates, on tiny random models; nothing downloaded.

- Mistral-7B-Instruct-v0.2: the sentencepiece model that `mistral-common` ships
  (`mistral_common/data/tokenizer.model.v1`, 32,000 tokens), read by transformers as a `LlamaTokenizer`
  with `legacy: true` (the prefix space that makes "UTI" after `[/INST]` tokenize as `UT, I` in the
  full text but `▁U, TI` alone), no pad token, and Mistral-Instruct-v0.2's original chat template
  (`[INST] ... [/INST]`, no system role, strict user/assistant alternation, raises otherwise), paired
  with a random `MistralForCausalLM` of vocab 32,000.
- Llama-3-8B-Instruct: the tiktoken BPE that `llama-models` ships (`llama_models/llama3/tokenizer.model`,
  128,000 tokens) converted by transformers' `TikTokenConverter` with Llama 3's split regex and its 256
  special tokens registered as special, BOS added as in the hub's `tokenizer.json`, `<|eot_id|>` as EOS,
  no pad token, and Llama-3-Instruct's chat template (`<|start_header_id|>role<|end_header_id|>\\n\\n
  ...<|eot_id|>`), paired with a random `LlamaForCausalLM` of vocab 128,256.

Each is saved with `save_pretrained` into a folder that `AutoTokenizer` / `AutoModelForCausalLM` load,
exactly as clinft-ray loads `model.name_or_path`. The models are tiny (hidden size 64 for Mistral, 32 for Llama 3's larger vocabulary; 2 layers,
tied embeddings) so that training steps stay fast on a CPU even with Llama 3's vocabulary.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

MISTRAL_V02_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Llama 3's pre-tokenizer split (llama_models/llama3/tokenizer.py, `pat_str`).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_NAMED = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
                "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
                "<|eot_id|>", "<|python_tag|>", "<|image|>"]
LLAMA3_SPECIAL = LLAMA3_NAMED + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(LLAMA3_NAMED))]
FAMILIES = ("mistral", "llama3")


def package_file(package: str, relative: str) -> Path:
    """A data file shipped inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{package} is not installed; pip install -e '.[test]'")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package}")
    return path


def mistral_tokenizer(out: Path):
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(package_file("mistral_common", "data/tokenizer.model.v1"), out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "legacy": True, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "model_max_length": 32768}))
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = MISTRAL_V02_TEMPLATE
    return tok


def llama3_tokenizer():
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    raw = TikTokenConverter(vocab_file=str(package_file("llama_models", "llama3/tokenizer.model")),
                            pattern=LLAMA3_PATTERN, extra_special_tokens=LLAMA3_SPECIAL).converted()
    bos = "<|begin_of_text|>"
    raw.post_processor = processors.Sequence([  # as the hub's tokenizer.json: BOS on every encoded text
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                      special_tokens=[(bos, raw.token_to_id(bos))]),
    ])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=bos, eos_token="<|eot_id|>",
                                  model_max_length=8192)
    tok.chat_template = LLAMA3_TEMPLATE
    return tok


HIDDEN = {"mistral": 64, "llama3": 32}  # the widths at which each learns the demo's task (test_real_tokenizers)


def build(family: str, out: str | Path, *, seed: int = 0, hidden_size: int | None = None) -> Path:
    """Write the tokenizer of `family` ("mistral" or "llama3") and a random model of its architecture
    and vocabulary into `out`; returns `out`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = mistral_tokenizer(out) if family == "mistral" else llama3_tokenizer()
    assert tok.pad_token is None  # as on the hub: clinft-ray has to pick one
    tok.save_pretrained(out)
    hidden_size = hidden_size or HIDDEN[family]
    shape = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                 tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    if family == "mistral":
        model = MistralForCausalLM(MistralConfig(vocab_size=32000, sliding_window=None,
                                                 rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                                 **shape))
    elif family == "llama3":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=128256,
                                             rope_parameters={"rope_type": "default", "rope_theta": 5e5}, **shape))
    else:
        raise ValueError(f"family {family!r}: use one of {FAMILIES}")
    model.save_pretrained(out)
    return out
