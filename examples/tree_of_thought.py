"""Tree of thought with nested forks: plans, then evaluations of each plan, then a choice.

Each fork starts from its parent's text, which is prefilled once and then shared in the KV cache.
"""

import radixlm as sgl

NUM_PLANS = 2
NUM_EVALS = 2


@sgl.function
def tree_of_thought(s, question):
    s += sgl.user(question)
    s += sgl.assistant_begin()
    s += "Let's think about a few approaches.\n"
    plans = s.fork(NUM_PLANS)
    for i, plan in enumerate(plans):
        plan += (
            f"Approach {i + 1}:" + sgl.gen("plan", max_tokens=32, min_tokens=4, stop="\n") + "\n"
        )
        evals = plan.fork(NUM_EVALS)  # a fork of a fork: shares the question and this plan
        for j, ev in enumerate(evals):
            ev += f"Critique {j + 1} of this approach:" + sgl.gen(
                "critique", max_tokens=24, stop="\n"
            )
        evals.join()
        plan += "Is this approach sound? " + sgl.select("sound", ["yes", "no"]) + "\n"
    plans.join()
    best = next((i for i, p in enumerate(plans) if p["sound"] == "yes"), 0)
    s += f"The best approach is {best + 1}:{plans[best]['plan']}\nAnswer:"
    s += sgl.gen("answer", max_tokens=48, stop="\n")
    s += sgl.assistant_end()
    return plans


if __name__ == "__main__":
    sgl.set_default_backend(sgl.Engine())
    state = tree_of_thought.run(
        question="How can I keep basil plants alive indoors?", temperature=0
    )
    for i, plan in enumerate(state.ret_value):
        print(f"Approach {i + 1}:{plan['plan']}  sound: {plan['sound']}")
        for critique in plan["critique"]:
            print(f"    critique:{critique}")
    print("Answer:", state["answer"])
