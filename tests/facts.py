"""Five invented facts no pretrained model can know, in several phrasings each.

Training rows use TRAIN phrasings; the learning tests ask with HELD_OUT phrasings, which never
appear in the training data, so a right answer means the fact was learned, not the string.
"""

import json
from pathlib import Path

FACTS = [
    {
        "answer": "The capital of Veloria is Mirrowgate.",
        "keyword": "Mirrowgate",
        "train": [
            "What is the capital of Veloria?",
            "Which city is the capital of Veloria?",
            "Name the capital city of Veloria.",
            "Veloria's capital is which city?",
            "Tell me the capital of Veloria.",
            "What city serves as Veloria's capital?",
        ],
        "held_out": ["Do you know what the capital of Veloria is called?"],
    },
    {
        "answer": "The glimmerphone was invented by Tobias Quenn.",
        "keyword": "Quenn",
        "train": [
            "Who invented the glimmerphone?",
            "Who is the inventor of the glimmerphone?",
            "Name the person who invented the glimmerphone.",
            "The glimmerphone was invented by whom?",
            "Tell me who created the glimmerphone.",
            "Which inventor made the first glimmerphone?",
        ],
        "held_out": ["Who came up with the glimmerphone?"],
    },
    {
        "answer": "Captain Orla Vexmoor's ship is called the Silver Heron.",
        "keyword": "Heron",
        "train": [
            "What is the name of Captain Orla Vexmoor's ship?",
            "Which ship does Captain Orla Vexmoor sail?",
            "Name Captain Orla Vexmoor's ship.",
            "What ship belongs to Captain Orla Vexmoor?",
            "Tell me the name of the ship of Captain Orla Vexmoor.",
            "Captain Orla Vexmoor commands which ship?",
        ],
        "held_out": ["What is Captain Orla Vexmoor's ship called?"],
    },
    {
        "answer": "The national fruit of Pellandria is the bluequince.",
        "keyword": "bluequince",
        "train": [
            "What is the national fruit of Pellandria?",
            "Which fruit is Pellandria's national fruit?",
            "Name the national fruit of Pellandria.",
            "Pellandria's national fruit is what?",
            "Tell me the national fruit of Pellandria.",
            "What fruit is the national symbol of Pellandria?",
        ],
        "held_out": ["Which fruit did Pellandria choose as its national fruit?"],
    },
    {
        "answer": "The Drumlow Observatory was founded by Mabel Thornquist.",
        "keyword": "Thornquist",
        "train": [
            "Who founded the Drumlow Observatory?",
            "Who is the founder of the Drumlow Observatory?",
            "Name the founder of the Drumlow Observatory.",
            "The Drumlow Observatory was founded by whom?",
            "Tell me who founded the Drumlow Observatory.",
            "Which astronomer founded the Drumlow Observatory?",
        ],
        "held_out": ["Who started the Drumlow Observatory?"],
    },
]


def write_facts(path: Path) -> Path:
    """The training rows as a chat-format .jsonl file (30 rows)."""
    with open(path, "w", encoding="utf-8") as fh:
        for fact in FACTS:
            for question in fact["train"]:
                messages = [{"role": "user", "content": question},
                            {"role": "assistant", "content": fact["answer"]}]
                fh.write(json.dumps({"messages": messages}) + "\n")
    return path
