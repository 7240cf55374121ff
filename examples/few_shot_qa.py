"""Few-shot question answering, a batch at a time: the shared examples are prefilled once."""

import radixlm as sgl

EXAMPLES = """The following are questions with answers.

Q: What is the capital of France?
A: Paris
Q: What is the capital of Germany?
A: Berlin
Q: What is the capital of Italy?
A: Rome
"""


@sgl.function
def few_shot_qa(s, question):
    s += EXAMPLES
    s += "Q: " + question + "\n"
    s += "A:" + sgl.gen("answer", stop="\n", max_tokens=16)


if __name__ == "__main__":
    sgl.set_default_backend(sgl.Engine())  # or sgl.RuntimeEndpoint("http://127.0.0.1:30000")
    questions = [
        "What is the capital of Japan?",
        "What is the capital of Spain?",
        "What is the capital of Canada?",
    ]
    states = few_shot_qa.run_batch([{"question": q} for q in questions], temperature=0)
    for q, state in zip(questions, states, strict=True):
        meta = state.get_meta_info("answer")
        print(
            f"{q} ->{state['answer']}   ({meta['cached_tokens']}/{meta['prompt_tokens']} prompt tokens cached)"
        )
