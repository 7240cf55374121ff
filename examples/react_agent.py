"""A ReAct-style agent: the model thinks, picks a tool with `select`, and reads its result.

Tools are plain Python functions; the program calls them between generations.
"""

import radixlm as sgl

FACTS = {
    "linux": "Linux was created by Linus Torvalds.",
    "linus torvalds": "Linus Torvalds lives in the United States.",
}


def search(query: str) -> str:
    """A toy search engine over a few facts."""
    return next((fact for key, fact in FACTS.items() if key in query.lower()), "No result.")


def calculate(expression: str) -> str:
    """Arithmetic only."""
    allowed = set("0123456789+-*/(). ")
    return str(eval(expression)) if set(expression) <= allowed else "Not arithmetic."  # noqa: S307


TOOLS = {"Search": search, "Calculate": calculate}

EXAMPLE = """Question: In which city was the founder of Microsoft born?
Thought 1: I need to find who founded Microsoft.
Action 1: Search [founder of Microsoft]
Observation 1: Microsoft was founded by Bill Gates.
Thought 2: Now I need to find where Bill Gates was born.
Action 2: Search [Bill Gates birthplace]
Observation 2: Bill Gates was born in Seattle.
Thought 3: I have the answer.
Action 3: Finish [Seattle]

Question: What is 12 times the number of days in a week?
Thought 1: A week has 7 days, so I compute 12*7.
Action 1: Calculate [12*7]
Observation 1: 84
Thought 2: I have the answer.
Action 2: Finish [84]

"""


@sgl.function
def react(s, question, max_steps=4):
    s += EXAMPLE + "Question: " + question + "\n"
    for i in range(1, max_steps + 1):
        s += f"Thought {i}:" + sgl.gen(f"thought_{i}", stop="\n", max_tokens=32) + "\n"
        s += f"Action {i}: " + sgl.select(f"action_{i}", [*TOOLS, "Finish"]) + " ["
        s += sgl.gen(f"input_{i}", stop="]", max_tokens=16) + "]\n"
        if s[f"action_{i}"] == "Finish":
            return s[f"input_{i}"]
        s += f"Observation {i}: " + TOOLS[s[f"action_{i}"]](s[f"input_{i}"]) + "\n"
    return None


if __name__ == "__main__":
    sgl.set_default_backend(sgl.Engine())
    state = react.run(question="Where does the creator of Linux live?", temperature=0)
    print(state.text())
    print("Final answer:", state.ret_value)
