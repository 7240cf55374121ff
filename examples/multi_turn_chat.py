"""A multi-turn chat: role blocks are rendered with the model's own chat template."""

import radixlm as sgl


@sgl.function
def multi_turn_chat(s, questions):
    s += sgl.system("You are a helpful assistant. Answer in one or two sentences.")
    for i, question in enumerate(questions):
        s += sgl.user(question)
        s += sgl.assistant(sgl.gen(f"answer_{i}", max_tokens=48))


if __name__ == "__main__":
    sgl.set_default_backend(sgl.Engine())
    state = multi_turn_chat.run(
        questions=["What is the tallest mountain on Earth?", "How tall is it, in meters?"],
        temperature=0,
    )
    for message in state.messages():
        print(f"{message['role']:>9}: {message['content']}")
