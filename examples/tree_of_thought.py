"""Tree of thought with nested forks: ideas, then critiques of each idea, then a choice.

Each fork starts from its parent's text, which is prefilled once and then shared in the KV cache.
"""

import radixlm as sgl

IDEA_STARTS = ["One idea is to", "Alternatively, you can"]
CRITIQUE_STARTS = ["A strength of this idea is that", "A weakness of this idea is that"]


@sgl.function
def tree_of_thought(s, question):
    s += sgl.user(question + " Give one short idea.")
    s += sgl.assistant_begin()
    ideas = s.fork(len(IDEA_STARTS))
    ideas += lambda i: IDEA_STARTS[i] + sgl.gen("idea", max_tokens=24, stop=["\n", "."]) + ".\n"
    # fork() waits for its state, so each loop below starts work on every branch before waiting.
    critiques = [idea.fork(len(CRITIQUE_STARTS)) for idea in ideas]  # forks of forks
    for group in critiques:
        group += lambda j: CRITIQUE_STARTS[j] + sgl.gen("critique", max_tokens=24, stop=["\n", "."])
    for idea, group in zip(ideas, critiques, strict=True):
        group.join()
        idea += "Is this a good idea? " + sgl.select("good", ["yes", "no"]) + "\n"
    ideas.join()
    best = next((i for i, idea in enumerate(ideas) if idea["good"] == "yes"), 0)
    s += "In short: " + IDEA_STARTS[best].lower() + ideas[best]["idea"] + ". Also,"
    s += sgl.gen("answer", max_tokens=32, stop="\n")
    s += sgl.assistant_end()
    return ideas


if __name__ == "__main__":
    sgl.set_default_backend(sgl.Engine())
    state = tree_of_thought.run(
        question="How can I keep basil plants alive indoors?", temperature=0
    )
    for start, idea in zip(IDEA_STARTS, state.ret_value, strict=True):
        print(f"{start}{idea['idea']}.   good: {idea['good']}")
        for critique_start, critique in zip(CRITIQUE_STARTS, idea["critique"], strict=True):
            print(f"    {critique_start}{critique}.")
    print(state.messages()[-1]["content"])
