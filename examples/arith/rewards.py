"""The reward of examples/grpo_arith.yaml: exact match, with partial credit for a number
close to the answer. A task's reward function gets the JSONL record (a dict) and the
completion (``.text``: the generated text, EOS removed and stripped; ``.token_ids``: the
engine's ids; ``.finish_reason``), and returns a number or a dict of numbers holding
``"reward"`` — every other entry is logged per step (mean over the batch)."""


def reward(record: dict, completion) -> dict:
    answer = record["answer"]
    exact = float(completion.text == answer)
    try:
        value = int(completion.text)
    except ValueError:   # not a number at all
        return {"reward": 0.0, "exact_match": 0.0, "is_number": 0.0}
    closeness = max(0.0, 1.0 - abs(value - int(answer)) / 10.0)
    return {"reward": exact if exact else 0.5 * closeness, "exact_match": exact, "is_number": 1.0}
