"""Classification with `select`: every label is scored by its logprobs in one batched call."""

import radixlm as sgl

LABELS = ["positive", "negative", "neutral"]


@sgl.function
def classify(s, review):
    s += "Classify the sentiment of each review as positive, negative or neutral.\n\n"
    s += "Review: The food was wonderful and the staff were kind.\nSentiment: positive\n\n"
    s += "Review: The package arrived broken, nobody answered.\nSentiment: negative\n\n"
    s += "Review: The shop opens at nine.\nSentiment: neutral\n\n"
    s += "Review: " + review + "\nSentiment: " + sgl.select("label", LABELS)


if __name__ == "__main__":
    sgl.set_default_backend(sgl.Engine())
    reviews = [
        "Absolutely loved it, I would buy it again.",
        "It stopped working after two days.",
        "The hotel is next to the station.",
        "Terrible service, never again.",
    ]
    for review, state in zip(
        reviews, classify.run_batch([{"review": r} for r in reviews]), strict=True
    ):
        scores = state.get_meta_info("label")["normalized_prompt_logprobs"]
        shown = ", ".join(
            f"{label} {score:.2f}" for label, score in zip(LABELS, scores, strict=True)
        )
        print(f"{state['label']:>8}  <- {review}   ({shown})")
