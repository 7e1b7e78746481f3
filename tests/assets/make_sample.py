"""Writes arxiv_sample.jsonl: 96 synthetic arXiv-style records in 3 categories, for fast hermetic tests.

The texts are made up from per-category vocabularies, so a tiny model can learn the labels. Regenerate with
`python tests/assets/make_sample.py` (deterministic).
"""

import json
import random
from pathlib import Path

VOCAB = {
    "cs.CL": ["language", "translation", "parsing", "tokens", "dialogue", "grammar", "text", "speech"],
    "cs.CV": ["images", "pixels", "segmentation", "detection", "video", "camera", "vision", "depth"],
    "cs.RO": ["robot", "grasping", "locomotion", "manipulator", "navigation", "control", "sensors", "arm"],
}
SECONDARY = {"cs.CL": "cs.AI", "cs.CV": "cs.LG", "cs.RO": "cs.SY"}


def main() -> None:
    rng = random.Random(0)
    lines = []
    for c, (label, words) in enumerate(VOCAB.items()):
        for i in range(32):
            picks = [rng.choice(words) for _ in range(24)]
            title = f"On {picks[0]} and {picks[1]} for {picks[2]}"
            abstract = "We study " + " ".join(picks[3:]) + ". Results show better " + picks[4] + "."
            record = {
                "id": f"2501.{c:01d}{i:04d}",
                "title": title,
                "abstract": abstract,
                "categories": [label, SECONDARY[label]],
                "primary_category": label,
                "published": "2025-01-15",
            }
            lines.append(json.dumps(record))
    rng.shuffle(lines)
    Path(__file__).with_name("arxiv_sample.jsonl").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
