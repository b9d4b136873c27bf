"""Fine-tuning really teaches: the tuned model answers invented facts, asked in new words, that the
base model cannot know."""

import pytest

from engine.chat import ChatModel
from facts import FACTS


def ask_all(model: ChatModel) -> dict[str, str]:
    answers = {}
    for fact in FACTS:
        for question in fact["held_out"]:
            answers[question] = model.reply([{"role": "user", "content": question}],
                                            temperature=0.0, max_new_tokens=40)
    return answers


def correct(answers: dict[str, str]) -> int:
    return sum(
        fact["keyword"].lower() in answers[q].lower() for fact in FACTS for q in fact["held_out"]
    )


@pytest.mark.slow
def test_tuned_model_learns_facts_the_base_model_does_not_know(learned_run):
    for fact in FACTS:
        assert not set(fact["held_out"]) & set(fact["train"]), "held-out questions must be new"
    base_answers = ask_all(ChatModel(base_model="embedded"))

    run = learned_run  # the quick-test recipe, trained once per session (conftest)
    assert run.read_status()["state"] == "finished"

    metrics = run.read_metrics()
    losses = [m["loss"] for m in metrics if m.get("loss") is not None]
    assert losses[-1] < losses[0] / 10, f"loss did not fall: {losses[0]} -> {losses[-1]}"
    assert (run.adapter_dir / "adapter_model.safetensors").is_file()

    tuned_answers = ask_all(ChatModel(run_dir=run.path))
    assert correct(base_answers) == 0, f"the base model already knew: {base_answers}"
    assert correct(tuned_answers) == len(FACTS), f"tuned answers: {tuned_answers}"
