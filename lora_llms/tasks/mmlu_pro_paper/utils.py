"""Prompt and choices of the paper-style MMLU-Pro task (zero-shot answer letters)."""

LETTERS = "ABCDEFGHIJKLMNOP"
RESPONSE_TEMPLATE = "\n\n### Response:\n"  # the fine-tuning prompt's response marker (lora_llms.data)


def doc_to_text(doc) -> str:
    options = "\n".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(doc["options"]))
    return (
        f"The following is a multiple choice question about {doc['category']}. "
        f"Answer with the letter of the correct option.\n\n"
        f"Question: {doc['question']}\n{options}{RESPONSE_TEMPLATE}"
    )


def doc_to_choice(doc) -> list[str]:
    return list(LETTERS[: len(doc["options"])])
