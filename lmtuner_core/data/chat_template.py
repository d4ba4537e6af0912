"""The chat template lmtuner gives a model that has none (a base model, the tiny test model): training,
generate, analyze_dataset and vLLM then all format conversations the same way."""

from __future__ import annotations

from typing import Any

# ChatML with a bos prefix. Assistant content and its <|im_end|> sit inside {% generation %} so that
# return_assistant_tokens_mask (and TRL's assistant_only_loss) train on exactly those tokens.
CHAT_TEMPLATE = r"""
{%- macro render_content(content) -%}
{%- if content is string -%}{{ content }}
{%- elif content is mapping -%}{{ content | tojson }}
{%- elif content is iterable -%}
{%- for part in content -%}{%- if part.type == 'text' -%}{{ part.text }}{%- endif -%}{%- endfor -%}
{%- elif content is defined and content is not none -%}{{ content }}
{%- endif -%}
{%- endmacro -%}
{{- bos_token -}}
{%- set merge_system = tools and messages and messages[0].role == 'system' -%}
{%- if tools -%}
{{- '<|im_start|>system\n' -}}
{%- if merge_system -%}{{- render_content(messages[0].content) + '\n\n' -}}{%- endif -%}
{{- '# Tools\nYou may call these functions:\n' -}}
{%- for tool in tools -%}{{- tool | tojson -}}{{- '\n' -}}{%- endfor -%}
{{- 'To call a function, reply with <tool_call>\n' -}}
{{- '{"name": <function-name>, "arguments": <args-object>}\n</tool_call><|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
{%- if not (loop.first and merge_system) -%}
{%- if message.role == 'assistant' -%}
{{- '<|im_start|>assistant\n' -}}
{%- generation -%}
{%- set content = render_content(message.content) if message.content is defined else '' -%}
{{- content -}}
{%- if message.tool_calls is defined and message.tool_calls -%}
{%- for call in message.tool_calls -%}
{%- set fn = call.function if call.function is defined else call -%}
{%- if content or not loop.first -%}{{- '\n' -}}{%- endif -%}
{{- '<tool_call>\n{"name": ' + (fn.name | tojson) + ', "arguments": ' -}}
{%- if fn.arguments is string -%}{{- fn.arguments -}}{%- else -%}{{- fn.arguments | tojson -}}{%- endif -%}
{{- '}\n</tool_call>' -}}
{%- endfor -%}
{%- endif -%}
{{- '<|im_end|>' -}}
{%- endgeneration -%}
{{- '\n' -}}
{%- else -%}
{{- '<|im_start|>' + message.role + '\n' -}}
{{- render_content(message.content) if message.content is defined else '' -}}
{{- '<|im_end|>\n' -}}
{%- endif -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
""".strip()


def ensure_chat_template(tokenizer: Any) -> bool:
    """Gives the tokenizer CHAT_TEMPLATE when it has no template of its own; True when it did. Either way its
    template renders in the bounded sandbox from here on (template_bounds: a model's template is its author's)."""
    from lmtuner_core.data.template_bounds import bound_chat_templates

    bound_chat_templates()
    if tokenizer.chat_template:
        return False
    tokenizer.chat_template = CHAT_TEMPLATE
    return True
