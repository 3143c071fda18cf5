"""The committed prompt set, covering SpecBench's kinds of request.

Each prompt is a list of chat messages (multi-turn ones carry earlier turns). `--quick`
takes the first prompt of every kind.
"""

from __future__ import annotations

KINDS: dict[str, list[list[dict[str, str]]]] = {
    "multi_turn": [
        [{"role": "user", "content": "I am planning a trip to Kyoto in autumn."},
         {"role": "assistant", "content": "Autumn is a lovely time: the maples turn red in "
          "November. What would you like to plan?"},
         {"role": "user", "content": "Suggest a three-day itinerary with temples and food."}],
        [{"role": "user", "content": "Write a Python function that reverses a string."},
         {"role": "assistant", "content": "def reverse(s):\n    return s[::-1]"},
         {"role": "user", "content": "Now make it reverse the order of words instead."}],
        [{"role": "user", "content": "What is a binary search tree?"},
         {"role": "assistant", "content": "A binary tree where each node's left subtree holds "
          "smaller keys and its right subtree larger keys."},
         {"role": "user", "content": "Show how to insert a key into one, in Python."}],
        [{"role": "user", "content": "Give me a name for a bakery."},
         {"role": "assistant", "content": "How about 'The Rising Loaf'?"},
         {"role": "user", "content": "Give five more in the same spirit, with a tagline each."}],
    ],
    "translation": [
        [{"role": "user", "content": "Translate to French: The meeting has been moved to "
          "Thursday afternoon because the director is travelling."}],
        [{"role": "user", "content": "Translate to German: Please remember to water the plants "
          "and close the windows before you leave the house."}],
        [{"role": "user", "content": "Translate to Spanish: Speculative decoding lets a small "
          "model propose tokens that a large model verifies in a single pass."}],
        [{"role": "user", "content": "Translate to English: Le chat dort sur le canapé pendant "
          "que la pluie tombe doucement sur la ville."}],
    ],
    "summarisation": [
        [{"role": "user", "content": "Summarise in two sentences: The city council voted on "
          "Tuesday to expand the bicycle lane network by forty kilometres over the next three "
          "years. Supporters argued that the plan would reduce traffic and pollution, while "
          "opponents worried about the loss of parking spaces for local shops. The council "
          "promised to consult business owners before each new section is built."}],
        [{"role": "user", "content": "Summarise this function's purpose:\n"
          "def merge(a, b):\n    out, i, j = [], 0, 0\n    while i < len(a) and j < len(b):\n"
          "        if a[i] <= b[j]:\n            out.append(a[i]); i += 1\n        else:\n"
          "            out.append(b[j]); j += 1\n    return out + a[i:] + b[j:]"}],
        [{"role": "user", "content": "Summarise: Photosynthesis converts light energy into "
          "chemical energy. Plants capture sunlight with chlorophyll, take in carbon dioxide "
          "and water, and produce glucose and oxygen. The glucose fuels growth, and the oxygen "
          "is released into the air."}],
        [{"role": "user", "content": "Give a one-paragraph summary of how HTTP caching works "
          "with Cache-Control and ETag headers."}],
    ],
    "qa": [
        [{"role": "user", "content": "Why is the sky blue?"}],
        [{"role": "user", "content": "What is the difference between a process and a thread?"}],
        [{"role": "user", "content": "How does a hash map handle collisions?"}],
        [{"role": "user", "content": "What does the Python GIL do?"}],
    ],
    "maths": [
        [{"role": "user", "content": "What is 17 times 23? Show the steps."}],
        [{"role": "user", "content": "Solve for x: 3x + 7 = 31. Explain each step."}],
        [{"role": "user", "content": "A train travels 180 km in 2.5 hours. What is its "
          "average speed in km/h? Show your working."}],
        [{"role": "user", "content": "Write a Python function that returns the n-th "
          "Fibonacci number iteratively."}],
    ],
    "retrieval": [
        [{"role": "user", "content": "Context: The Eiffel Tower was completed in 1889 for the "
          "World's Fair. It is 330 metres tall and was the tallest man-made structure until "
          "1930.\nQuestion: When was the Eiffel Tower completed and how tall is it?"}],
        [{"role": "user", "content": "Context: def area(r): return 3.14159 * r * r\n"
          "def perimeter(r): return 2 * 3.14159 * r\nQuestion: What do these functions "
          "compute, and what would area(2) return?"}],
        [{"role": "user", "content": "Context: Our refund policy allows returns within 30 "
          "days with a receipt. Opened software cannot be returned. Gift cards are final "
          "sale.\nQuestion: Can I return an opened video game after two weeks?"}],
        [{"role": "user", "content": "Context: The mitochondrion is the site of aerobic "
          "respiration and produces most of the cell's ATP.\nQuestion: Which organelle "
          "produces most of a cell's ATP, and by what process?"}],
    ],
}


def prompt_set(quick: bool = False) -> list[tuple[str, list[dict[str, str]]]]:
    """(kind, messages) pairs in a fixed order, interleaving kinds."""
    per_kind = 1 if quick else max(len(v) for v in KINDS.values())
    out = []
    for i in range(per_kind):
        for kind, prompts in KINDS.items():
            if i < len(prompts):
                out.append((kind, prompts[i]))
    return out
