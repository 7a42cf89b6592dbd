"""Children's Book Test (Hill et al., 2016) as an lm-eval multiple-choice task.

A document has 20 context ``sentences``, a ``question`` with the blank ``XXXXX``, 10
``options`` and the ``answer``. The context is the sentences and the question up to the
blank; each choice is an option followed by the rest of the question, so the scored
continuation is "option + rest of sentence" (the first release's scoring).
"""


def _parts(doc):
    before, _, after = doc["question"].partition("XXXXX")
    return before, after


def doc_to_text(doc):
    before, _ = _parts(doc)
    return (" ".join(s.strip() for s in doc["sentences"]) + " " + before).rstrip()


def doc_to_choice(doc):
    before, after = _parts(doc)
    return [option + after for option in doc["options"]]


def doc_to_target(doc):
    return doc["options"].index(doc["answer"])
