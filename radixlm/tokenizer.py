"""Text <-> token ids: a Hugging Face `tokenizers` tokenizer, the chat template and streaming decode."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from radixlm.models.gguf import convert_gguf, is_gguf_file

if TYPE_CHECKING:
    import jinja2
    import tokenizers

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class Tokenizer:
    """A model's tokenizer: encode/decode, its special tokens and its chat template."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        vocab_size: int,
        bos_token_id: int | None,
        eos_token_ids: tuple[int, ...],
        chat_template: str | None,
        add_bos: bool = False,
        special_tokens: dict[str, str] | None = None,
    ) -> None:
        self.backend = backend
        self.vocab_size = vocab_size
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids
        self.chat_template = chat_template
        self.add_bos = add_bos
        # Token strings the chat template sees as bos_token, eos_token, ...
        self.special_tokens = dict(special_tokens or {})
        self._special_ids = frozenset(
            i for i, t in backend.get_added_tokens_decoder().items() if t.special
        )
        # Tokens that spell one byte (<0x41>) in a vocabulary with byte fallback (SentencePiece).
        self.byte_token_ids: frozenset[int] = frozenset()
        if getattr(backend.model, "byte_fallback", False):
            self.byte_token_ids = frozenset(
                i for t, i in backend.get_vocab().items() if _BYTE_TOKEN.fullmatch(t)
            )
        self._template: jinja2.Template | None = None

    @classmethod
    def load(cls, model_path: str, chat_template: str | None = None) -> Tokenizer:
        """Load from a Hugging Face folder (tokenizer.json + tokenizer_config.json) or a GGUF
        file; `chat_template` is a Jinja file that replaces the model's chat template (checked
        here: ValueError if it does not compile)."""
        from tokenizers import Tokenizer as Backend

        path = Path(model_path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"model path {model_path!r} does not exist")
        folder = convert_gguf(path, weights=False) if is_gguf_file(path) else path
        if not (folder / "tokenizer.json").is_file():
            raise ValueError(
                f"{model_path!r} is neither a GGUF file nor a folder with a tokenizer.json "
                "(only fast tokenizers are supported)"
            )
        backend = Backend.from_file(str(folder / "tokenizer.json"))
        tok_config = _read_json(folder / "tokenizer_config.json")
        config = _read_json(folder / "config.json")
        gen_config = _read_json(folder / "generation_config.json")

        special = {
            key: text for key in _SPECIAL_TOKEN_KEYS if (text := _token_text(tok_config.get(key)))
        }

        def token_id(key: str) -> int | None:
            return backend.token_to_id(special[key]) if key in special else None

        bos_id = token_id("bos_token")
        if bos_id is None:
            bos_id = config.get("bos_token_id")
        eos_ids: list[int] = []
        for ids in (
            gen_config.get("eos_token_id"),
            config.get("eos_token_id"),
            token_id("eos_token"),
        ):
            for i in ids if isinstance(ids, list) else [ids]:
                if i is not None and i not in eos_ids:
                    eos_ids.append(int(i))

        template = _chat_template(folder, tok_config)
        if chat_template is not None:
            template = _read_chat_template_file(chat_template)
        return cls(
            backend,
            vocab_size=max(
                int(config.get("vocab_size", 0)), backend.get_vocab_size(with_added_tokens=True)
            ),
            bos_token_id=bos_id,
            eos_token_ids=tuple(eos_ids),
            chat_template=template,
            # A tokenizer.json whose post-processor adds BOS does so without this flag.
            add_bos=bool(tok_config.get("add_bos_token")) and bos_id is not None,
            special_tokens=special,
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, BOS is added if the model expects it.

        Special tokens written in the text (like `<|im_start|>`) are always parsed as such, so a
        rendered chat prompt, which carries its own BOS, must be encoded with
        `add_special_tokens=False`.
        """
        ids: list[int] = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and (not ids or ids[0] != self.bos_token_id):
            assert self.bos_token_id is not None  # add_bos implies it
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(
        self,
        ids: Sequence[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> str:
        """The text of `ids`.

        `spaces_between_special_tokens` is accepted for SGLang's sampling parameters and, as with
        the Hugging Face fast tokenizers SGLang uses, changes nothing.
        """
        del spaces_between_special_tokens
        text: str = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return text

    def token_text(self, token_id: int) -> str:
        """The decoded text of one token (U+FFFD where it is part of a multi-byte character)."""
        text: str = self.backend.decode([token_id], skip_special_tokens=False)
        return text

    def is_special(self, token_id: int) -> bool:
        """Whether the id is a special (control) token, which decoding may skip."""
        return token_id in self._special_ids

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render a conversation to a prompt string, as Hugging Face's apply_chat_template does."""
        if self.chat_template is None:
            raise ValueError("this model has no chat template")
        if self._template is None:
            self._template = _compile_chat_template(self.chat_template)
        context = {**self.special_tokens, **kwargs}
        rendered: str = self._template.render(
            messages=messages, tools=tools, add_generation_prompt=add_generation_prompt, **context
        )
        return rendered


class IncrementalDetokenizer:
    """Turns a growing list of output ids into text, never emitting half of a multi-byte character.

    Each push decodes only a window: the tokens of the last emitted piece (context for decoders
    that depend on the previous token, like a leading-space rule) plus the tokens not yet emitted.
    Text ending in U+FFFD is held back until the character's remaining bytes arrive. With byte
    fallback, a run of byte tokens is held back until it ends: the decoder turns a whole run to
    U+FFFD if any of it is not UTF-8, so a window must not cut one.
    """

    __slots__ = (
        "tokenizer",
        "skip_special_tokens",
        "spaces_between_special_tokens",
        "ids",
        "text",
        "_prefix_offset",
        "_read_offset",
    )

    def __init__(
        self,
        tokenizer: Tokenizer,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self.ids: list[int] = []
        self.text = ""
        # Invariant: ids[:_read_offset] are emitted; ids[_prefix_offset:_read_offset] is the window
        # that produced the last emitted piece.
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, new_ids: Sequence[int]) -> str:
        """Append ids and return the text they complete (possibly empty)."""
        self.ids.extend(new_ids)
        prefix_text = self._decode(self.ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self.ids[self._prefix_offset :])
        if (
            len(full_text) <= len(prefix_text)
            or full_text.endswith("\ufffd")
            or (
                self.tokenizer.byte_token_ids
                and self._last_decoded() in self.tokenizer.byte_token_ids
            )
        ):
            return ""
        delta = full_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """Emit whatever is held back (U+FFFD for an unfinished character); call at the end."""
        prefix_text = self._decode(self.ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self.ids[self._prefix_offset :])
        delta = full_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.ids)
        self.text += delta
        return delta

    def _last_decoded(self) -> int | None:
        """The last id a decode sees (skipped special tokens are left out before decoding)."""
        for i in reversed(self.ids):
            if not (self.skip_special_tokens and self.tokenizer.is_special(i)):
                return i
        return None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids, self.skip_special_tokens, self.spaces_between_special_tokens
        )


def _compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in the sandboxed environment Hugging Face gives templates."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks."""

        tags = {"generation"}

        def parse(self, parser: Any) -> nodes.Node:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = self.call_method("_render")
            return nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return str(caller())

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        value: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: tuple[str, str] | None = None,
        sort_keys: bool = False,
    ) -> str:
        # Jinja's own tojson escapes HTML characters, which would change the prompt.
        return json.dumps(
            value,
            ensure_ascii=ensure_ascii,
            indent=indent,
            separators=separators,
            sort_keys=sort_keys,
        )

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


def _chat_template(folder: Path, tok_config: dict[str, Any]) -> str | None:
    """The chat template: chat_template.jinja if present, else tokenizer_config's (default) one."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t["name"]: t["template"] for t in template}
        return named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) else None


def _read_chat_template_file(path: str) -> str:
    """A chat template given as a Jinja file, compiled once to report its errors at start."""
    import jinja2

    source = Path(path).expanduser().read_text()
    try:
        _compile_chat_template(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template {path!r}, line {e.lineno}: {e.message}") from None
    return source


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or a serialized AddedToken."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else {}
