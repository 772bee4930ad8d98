"""The prompt around an image question: the model's chat template, else llava-1.5's conversation format.

llava-1.5 was trained on ``USER: <image>\\n{question} ASSISTANT:``; llava-hf
folders ship that as a chat template, so both routes give the same text for
them, and a fine-tune with its own template gets its own.
"""

from __future__ import annotations

from onecard.errors import BadInputError

LLAVA_15_FORMAT = "USER: {image}\n{question} ASSISTANT:"


def build_prompt(processor, question: str, use_chat_template: bool = True) -> str:
    """The prompt text with one image token for ``question`` (the processor expands it to the patch count)."""
    if not isinstance(question, str) or not question.strip():
        raise BadInputError("the question is empty; ask something about the image, e.g. \"What is in this picture?\"")
    image_token = getattr(processor, "image_token", "<image>")
    if image_token in question:
        raise BadInputError(f"the question contains the image placeholder {image_token!r}; onecard inserts it, "
                            "remove it from the question")
    if use_chat_template and getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        if text.count(image_token) == 1:
            return text
        # A text-only template (drops the image part): the llava-1.5 format is the safe answer.
    return LLAVA_15_FORMAT.format(image=image_token, question=question)
