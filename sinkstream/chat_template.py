"""Chat templates rendered in a Jinja sandbox set up as transformers sets up its own (`apply_chat_template`):
an immutable sandbox with ``trim_blocks``/``lstrip_blocks`` and loop controls, a ``tojson`` filter that keeps
non-ASCII text, ``raise_exception`` and ``strftime_now``, the ``{% generation %}`` block (rendered as its
body; transformers uses it to mark assistant tokens for training), namespaces that refuse underscore names.
Templates come from model files: untrusted code, which the sandbox keeps from reaching Python internals."""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache


def _raise(message):
    from jinja2.exceptions import TemplateError
    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=1)
def _environment():
    import jinja2.ext
    import jinja2.utils
    from jinja2 import nodes
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body).set_lineno(lineno)

    class Namespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):  # noqa: N805 - Jinja's own signature trick, so namespace(self=...) works
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise SecurityError(f"a chat template cannot set {name!r} on a namespace")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise, strftime_now=_strftime_now, namespace=Namespace)
    return env


@lru_cache(maxsize=16)
def compile_template(source: str):
    """The compiled template of `source` (cached by its text)."""
    return _environment().from_string(source)


def render(source: str, messages: list[dict], *, add_generation_prompt: bool = False, tools=None, documents=None,
           **variables) -> str:
    """The template `source` rendered for `messages` (copied: a template cannot change the caller's dicts);
    `variables` (the special tokens, say ``bos_token``) are visible to it by name."""
    for m in messages:
        if not isinstance(m, dict):
            raise TypeError(f"chat messages must be dicts, got {m!r}")
    return compile_template(source).render(messages=[dict(m) for m in messages], tools=tools, documents=documents,
                                           add_generation_prompt=add_generation_prompt, **variables)
