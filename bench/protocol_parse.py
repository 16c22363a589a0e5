"""Parsing time of adversarial model output (~100 KB): the parser must stay linear in the text's length.

Each input is one the earlier lazy-regex parser was quadratic on (many unclosed `<think>`s: ~10 s at 100 KB;
many `</search><information>` without a closer: ~3 s). Prints one JSON line: the slowest of each input's
parse/extract calls in milliseconds, at 25 KB and 100 KB (linear: the ratio stays near 4), and
``"ok": true`` when every 100 KB call took under 50 ms.

    python bench/protocol_parse.py
"""

from __future__ import annotations

import json
import time

from piplay_ray.method import protocol as P

INPUTS = {
    "unclosed_thinks": P.THINK_OPEN,
    "unclosed_information": P.SEARCH_CLOSE + P.INFO_OPEN,
    "closed_thinks": "<think>a</think>",
    "answers": "<answer>x</answer>",
}
CALLS = (P.parse_turn, P.extract_answer, P.extract_question, P.model_turns, P.think_share)


def slowest_ms(text: str) -> float:
    worst = 0.0
    for fn in CALLS:
        t = time.perf_counter()
        fn(text)
        worst = max(worst, time.perf_counter() - t)
    return round(worst * 1e3, 3)


def main() -> None:
    out = {"bench": "protocol_parse"}
    for name, unit in INPUTS.items():
        for kb in (25, 100):
            out[f"{name}_{kb}kb_ms"] = slowest_ms(unit * (kb * 1000 // len(unit)))
    out["ok"] = all(v < 50 for k, v in out.items() if k.endswith("_100kb_ms"))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
