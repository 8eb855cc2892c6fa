#!/usr/bin/python3
"""chat_ref.py - the peer for lorakit's chat templates: renders a tokenizer_config.json's own
chat_template with Jinja (Debian's python3-jinja2), set up as transformers' apply_chat_template
sets it up (trim_blocks, lstrip_blocks, the loopcontrols extension, raise_exception, a tojson
that keeps non-ASCII text, the special tokens of tokenizer_config.json as variables), but without
strftime_now: Llama 3.2's template then writes its fixed date_string, as lorakit does.

usage: chat_ref.py TOKENIZER_CONFIG MESSAGES_JSON ADD_GENERATION_PROMPT [ENABLE_THINKING]
  ADD_GENERATION_PROMPT and ENABLE_THINKING are 0 or 1; without ENABLE_THINKING the variable is
  left undefined (the template's default). The rendered text goes to stdout as UTF-8, as is.
"""
import json
import sys

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def main():
    with open(sys.argv[1], encoding="utf-8") as f:
        cfg = json.load(f)
    with open(sys.argv[2], encoding="utf-8") as f:
        messages = json.load(f)
    template = cfg["chat_template"]
    if isinstance(template, list):  # named templates: the default one
        template = next(t["template"] for t in template if t.get("name") == "default")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    variables = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = cfg.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            variables[key] = value
    if len(sys.argv) > 4:
        variables["enable_thinking"] = sys.argv[4] == "1"
    text = env.from_string(template).render(messages=messages, tools=None, documents=None,
                                            add_generation_prompt=sys.argv[3] == "1", **variables)
    sys.stdout.buffer.write(text.encode("utf-8"))


if __name__ == "__main__":
    main()
