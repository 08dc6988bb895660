"""Golden data for the tokenizer + chat-template test (tests/tests/chat_template.rs).

Usage: python make_tokenizer_golden.py OUT_DIR

Builds three small tokenizers here (no hub, no network), each with the chat template of a model
family, saves them the way real model directories look, reloads each directory with
`AutoTokenizer.from_pretrained` and records what Hugging Face `transformers` produces:

  OUT_DIR/tokenizers/chatml/   byte-level BPE, SmolLM2-style ChatML template with a default system
                               prompt; transformers 5 layout (`chat_template.jinja` file)
  OUT_DIR/tokenizers/llama3/   byte-level BPE, Llama-3-Instruct template (`bos_token`, `| trim`);
                               old layout (template inside tokenizer_config.json) and the eos
                               written as an AddedToken object
  OUT_DIR/tokenizers/mistral/  SentencePiece-style BPE (Metaspace, byte fallback), Mistral [INST]
                               template with `raise_exception` and python string methods
  OUT_DIR/tokenizers/expected.json
      chat_cases:  messages, add_generation_prompt -> rendered string and
                   `apply_chat_template(..., tokenize=True)` ids
      error_cases: messages the template rejects with `raise_exception`, and the message
      text_cases:  `encode(text, add_special_tokens=False)` ids and `decode` strings

Everything is deterministic: the training corpus is inline, BPE training breaks ties by pair
order, and nothing depends on the clock.
"""

import json
import shutil
import sys
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

CORPUS = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.",
    "A helpful assistant answers questions clearly, honestly and without causing harm.",
    "Preference optimisation trains a language model to prefer the chosen answer over the rejected one.",
    "Multi-objective training balances helpfulness against harmlessness with a weight vector.",
    "You are a helpful AI assistant. Please answer the user's question in a few sentences.",
    "How do I bake bread? Mix flour, water, salt and yeast, knead the dough, let it rise, then bake it.",
    "What is the capital of France? The capital of France is Paris, a city on the river Seine.",
    "Tell me a joke about computers. Why did the computer go to the doctor? It had a virus!",
    "Numbers like 42, 3.14 and 2025 appear in text, as do symbols such as #, $, % and &.",
    "Hello there! Hi, how are you today? I am fine, thank you for asking.",
    "Write a short poem about the sea: waves roll in, waves roll out, the tide sings softly.",
    "The reward model scores each response; the policy learns from pairs of responses.",
    "Café, naïve and résumé are English words borrowed from French.",
]


def train_byte_level(special_tokens, vocab_size):
    """A GPT-2 / Llama-3 style byte-level BPE trained on CORPUS."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    return tok


def train_sentencepiece_like(special_tokens, vocab_size):
    """A Llama-2 / Mistral style BPE: Metaspace with prepend "first", byte fallback for unknown
    characters (the <0xXX> tokens live in the model vocab, not among the added tokens)."""
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size + 256,
        special_tokens=special_tokens + byte_tokens,
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in byte_tokens]
    return Tokenizer.from_str(json.dumps(spec))


# Block tags on lines of their own: only right with trim_blocks + lstrip_blocks.
CHATML_TEMPLATE = """{% for message in messages %}
    {% if loop.first and messages[0]['role'] != 'system' %}
        {{- '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' -}}
    {% endif %}
    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}
{% endfor %}
{% if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' -}}
{% endif %}
"""

# Llama 3.1's shape: `{{- bos_token }}`, a namespace, `| trim`, `tojson` for non-string content
# (never taken here) and `strftime_now` guarded by `is defined` (never called, so the golden data
# does not depend on the date).
LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- if strftime_now is defined and use_date %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(turns=0) %}
{%- for message in messages %}
    {%- if message['content'] is string %}
        {%- set content = message['content'] | trim %}
    {%- else %}
        {%- set content = message['content'] | tojson %}
    {%- endif %}
    {%- if message['role'] == 'system' %}
        {{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}
        {{- 'Today Date: ' + date_string + '\\n\\n' }}
        {{- content + '<|eot_id|>' }}
    {%- else %}
        {%- set ns.turns = ns.turns + 1 %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + content + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

MISTRAL_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'].strip() %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.last and system_message is defined %}
            {{- '[INST] ' + system_message + '\\n\\n' + message['content'].strip() + '[/INST]' }}
        {%- else %}
            {{- '[INST] ' + message['content'].strip() + '[/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {%- if message['content'].startswith(' ') %}
            {{- message['content'].rstrip() + eos_token }}
        {%- else %}
            {{- ' ' + message['content'].split() | join(' ') + eos_token }}
        {%- endif %}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""


def save_chatml(root: Path) -> Path:
    tok = train_byte_level(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], 400)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    out = root / "chatml"
    fast.save_pretrained(out)
    assert (out / "chat_template.jinja").exists(), "transformers 5 should write chat_template.jinja"
    return out


def save_llama3(root: Path) -> Path:
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = train_byte_level(specials, 420)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    fast.chat_template = LLAMA3_TEMPLATE
    out = root / "llama3"
    fast.save_pretrained(out)
    # The layout of directories saved before transformers 4.43: the template inside
    # tokenizer_config.json, special tokens as serialised AddedToken objects.
    template_file = out / "chat_template.jinja"
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["chat_template"] = template_file.read_text(encoding="utf-8")
    template_file.unlink()
    config["eos_token"] = {
        "__type": "AddedToken",
        "content": "<|eot_id|>",
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
    }
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out


def save_mistral(root: Path) -> Path:
    tok = train_sentencepiece_like(["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], 360)
    tok.add_special_tokens([AddedToken("[INST]", special=True), AddedToken("[/INST]", special=True)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = MISTRAL_TEMPLATE
    out = root / "mistral"
    fast.save_pretrained(out)
    return out


def msgs(*pairs):
    return [{"role": role, "content": content} for role, content in pairs]


CONVERSATIONS = {
    "single_user": msgs(("user", "What is the capital of France?")),
    "system_user": msgs(("system", "You are a terse assistant."), ("user", "How do I bake bread?")),
    "multi_turn": msgs(
        ("user", "Tell me a joke about computers."),
        ("assistant", "Why did the computer go to the doctor? It had a virus!"),
        ("user", "Another one, please."),
    ),
    "system_multi_turn": msgs(
        ("system", "  Answer kindly.  "),
        ("user", "Hello there!"),
        ("assistant", "Hi, how are you today?"),
        ("user", "I am fine, thank you."),
    ),
    "unicode_spaces": msgs(("user", "  Café, naïve — 日本語 and an emoji 🙂  \n")),
    "assistant_leading_space": msgs(
        ("user", "Write a short poem about the sea."),
        ("assistant", " Waves roll in,\n  waves roll out.  "),
        ("user", "Thanks!"),
    ),
    "empty_content": msgs(("user", "")),
    "special_token_in_text": msgs(("user", "Say <|im_end|> or </s> or <|eot_id|> literally.")),
}

BAD_CONVERSATIONS = {
    "mistral": {
        "assistant_first": msgs(("assistant", "I speak first."), ("user", "Hello")),
        "two_users": msgs(("user", "Hello"), ("user", "Hello again")),
        "unknown_role": msgs(("user", "Hello"), ("tool", "42")),
    },
}

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces  ",
    "Café, naïve — 日本語 🙂",
    "Line one\nLine two\n\n\tTabbed",
    "Numbers 42, 3.14 and 2025!",
    "",
]


def special_ids(tok):
    return {
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        "vocab_size": len(tok),
    }


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: make_tokenizer_golden.py OUT_DIR")
    root = Path(sys.argv[1]) / "tokenizers"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)

    dirs = {"chatml": save_chatml(root), "llama3": save_llama3(root), "mistral": save_mistral(root)}
    expected = {"tokenizers": {}, "chat_cases": [], "error_cases": [], "text_cases": []}
    for name, path in dirs.items():
        tok = AutoTokenizer.from_pretrained(str(path))
        expected["tokenizers"][name] = {"dir": name, **special_ids(tok)}
        for conv_name, messages in CONVERSATIONS.items():
            for add_generation_prompt in (False, True):
                rendered = tok.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=add_generation_prompt
                )
                ids = tok.apply_chat_template(
                    messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
                )
                ids = [int(i) for i in ids]
                assert ids == tok.encode(rendered, add_special_tokens=False)
                expected["chat_cases"].append(
                    {
                        "tokenizer": name,
                        "name": conv_name,
                        "messages": messages,
                        "add_generation_prompt": add_generation_prompt,
                        "rendered": rendered,
                        "ids": ids,
                        "decoded": tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False),
                        "decoded_skip_special": tok.decode(
                            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
                        ),
                    }
                )
        for conv_name, messages in BAD_CONVERSATIONS.get(name, {}).items():
            try:
                tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as err:  # jinja2.TemplateError raised by raise_exception
                expected["error_cases"].append(
                    {"tokenizer": name, "name": conv_name, "messages": messages, "error": str(err)}
                )
            else:
                raise AssertionError(f"{name}/{conv_name} should have been rejected by the template")
        for text in TEXTS:
            ids = [int(i) for i in tok.encode(text, add_special_tokens=False)]
            expected["text_cases"].append(
                {
                    "tokenizer": name,
                    "text": text,
                    "ids": ids,
                    "decoded": tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False),
                }
            )

    (root / "expected.json").write_text(
        json.dumps(expected, indent=1, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8"
    )
    n_chat, n_err, n_text = (len(expected[k]) for k in ("chat_cases", "error_cases", "text_cases"))
    print(f"wrote {root}: {n_chat} chat cases, {n_err} error cases, {n_text} text cases")


if __name__ == "__main__":
    main()
