"""The request plan of benchmarks/serve_load.py: valid requests and the malformed kinds mixed into them (broken
JSON, lone surrogates, oversized bodies, unknown adapters), in a seeded order."""

from __future__ import annotations

import json
import random

STABLE = ("lora0", "lora1", "ia3")  # adapters loaded for the whole run
CHURN = "churn"  # added and removed during the run

MALFORMED = [  # (kind, body bytes)
    ("lone_surrogate", lambda t: json.dumps({"adapter": "lora0", "texts": [t, "\ud800 broken"]})),
    ("lone_low_surrogate", lambda t: json.dumps({"adapter": "ia3", "texts": ["\udfff" + t]})),
    ("empty_texts", lambda t: json.dumps({"adapter": "lora1", "texts": []})),
    ("too_many_texts", lambda t: json.dumps({"adapter": "lora0", "texts": [t] * 65})),
    ("too_long_text", lambda t: json.dumps({"adapter": "lora0", "texts": ["x" * 10001]})),
    ("unknown_adapter", lambda t: json.dumps({"adapter": "nope", "texts": [t]})),
    ("broken_json", lambda t: '{"adapter": "lora0", "texts": ["' + t[:10]),
    ("texts_not_list", lambda t: json.dumps({"adapter": "lora0", "texts": t})),
    ("text_not_string", lambda t: json.dumps({"adapter": "lora1", "texts": [1, {"a": 2}]})),
    ("pairs_for_single", lambda t: json.dumps({"adapter": "ia3", "texts": [t], "text_pairs": [t]})),
    ("missing_adapter", lambda t: json.dumps({"texts": [t]})),
]


def build_plan(n: int, malformed_share: float, texts: list[str], seed: int = 0) -> list[tuple[str, str, bytes]]:
    """(category, kind, body) per request, in a fixed seeded order."""
    rng = random.Random(seed)
    plan = []
    n_bad = round(n * malformed_share)
    bad_at = set(rng.sample(range(n), n_bad))
    for i in range(n):
        if i in bad_at:
            kind, make = MALFORMED[i % len(MALFORMED)]
            plan.append(("malformed", kind, make(rng.choice(texts)).encode()))
            continue
        adapter = CHURN if rng.random() < 0.05 else rng.choice(STABLE)
        body = {"adapter": adapter, "texts": rng.sample(texts, rng.randint(1, 4))}
        plan.append(("valid_churn" if adapter == CHURN else "valid", adapter, json.dumps(body).encode()))
    return plan
