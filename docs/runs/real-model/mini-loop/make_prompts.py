"""Writes the mini loop's SmolLM2 prompts: short closing messages of a customer, so that a chat model's reply often
ends (EOS) within a few dozen tokens and a polite ending is reachable. The test prompts name items the training
prompts never name.

* prompts/train.jsonl, prompts/test.jsonl: the message alone, one user turn;
* prompts-agent/train.jsonl, prompts-agent/test.jsonl: the same messages as conversations, after a system turn
  (SYSTEM) that casts the model as a support agent who keeps replies short. It does not ask for a polite closing.
"""

import json
import pathlib

TEMPLATES = (
    "Thanks, my {item} works now. Bye!",
    "Great, the new {item} arrived. That is all, thanks!",
    "The refund for my {item} came through. Thank you!",
    "Got it, I will return the {item} tomorrow. Bye!",
    "Perfect, my {item} problem is solved. Reply in one short sentence.",
    "OK, I will wait for the {item}. Thanks, goodbye!",
)
ITEMS = ("lamp", "kettle", "toaster", "blender", "chair", "desk", "jacket", "backpack", "phone case", "charger",
         "headphones", "keyboard", "mouse", "monitor", "printer", "camera", "watch", "wallet", "umbrella", "mug",
         "pillow", "blanket", "sofa", "bookshelf", "mirror", "rug", "vacuum", "fan", "heater", "speaker",
         "router", "tablet", "scarf", "sneakers", "helmet", "bicycle", "tent", "suitcase", "frying pan", "clock")
TEST_ITEMS = ITEMS[-8:]
SYSTEM = "You are a friendly customer support agent for a shop. Keep replies under 20 words."


def main() -> None:
    here = pathlib.Path(__file__).parent
    for folder, as_prompt in (("prompts", str), ("prompts-agent", _agent_conversation)):
        (here / folder).mkdir(exist_ok=True)
        for split, items in (("train", ITEMS[:-8]), ("test", TEST_ITEMS)):
            rows = [{"prompt": as_prompt(t.format(item=i)), "item": i} for i in items for t in TEMPLATES]
            (here / folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _agent_conversation(message: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": message}]


if __name__ == "__main__":
    main()
