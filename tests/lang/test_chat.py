"""Role prefixes and suffixes cut from real chat templates."""

from __future__ import annotations

from radixlm.lang.chat import ChatTemplate, render_chatml
from radixlm.tokenizer import Tokenizer


def build(template: ChatTemplate, roles_and_contents: list[tuple[str, str]]) -> str:
    """The text the interpreter writes for these messages, role block by role block."""
    text = ""
    history: list[dict[str, str]] = []
    for role, content in roles_and_contents:
        prefix, suffix = template.prefix_and_suffix(role, history)
        text += prefix + content + suffix
        history.append({"role": role, "content": content})
    return text


def test_role_blocks_reproduce_the_smollm2_template(smollm2_path: str) -> None:
    tok = Tokenizer.load(smollm2_path)
    template = ChatTemplate.from_tokenizer(tok)
    convo = [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye")]
    msgs = [{"role": r, "content": c} for r, c in convo]
    assert build(template, convo) == tok.apply_chat_template(msgs, add_generation_prompt=False)
    # No system message: the template's default one comes with the first message's prefix.
    prefix, suffix = template.prefix_and_suffix("user", [])
    assert prefix.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prefix.endswith("<|im_start|>user\n") and suffix == "<|im_end|>\n"
    # The assistant prefix is exactly the template's generation prompt.
    history = [{"role": "user", "content": "Hi"}]
    gen_prompt = tok.apply_chat_template(history, add_generation_prompt=True)
    base = tok.apply_chat_template(history, add_generation_prompt=False)
    assert template.prefix_and_suffix("assistant", history)[0] == gen_prompt[len(base) :]


def test_template_that_adds_bos_once_and_folds_system_into_user() -> None:
    # Llama-2 style: BOS on each turn pair, and the system prompt inside the first user turn.
    def render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        out, system = "", ""
        for m in messages:
            if m["role"] == "system":
                system = f"<<SYS>>{m['content']}<</SYS>>"
            elif m["role"] == "user":
                out += f"<s>[INST] {system}{m['content']} [/INST]"
                system = ""
            else:
                out += f" {m['content']} </s>"
        return out

    template = ChatTemplate(render)
    text = build(template, [("user", "Hi"), ("assistant", "Hello"), ("user", "Bye")])
    assert text == "<s>[INST] Hi [/INST] Hello </s><s>[INST] Bye [/INST]"


def test_chatml_fallback() -> None:
    template = ChatTemplate()
    assert template.render is render_chatml
    assert template.prefix_and_suffix("user", []) == ("<|im_start|>user\n", "<|im_end|>\n")
    assert ChatTemplate.from_model_path("/no/such/model").render is render_chatml
