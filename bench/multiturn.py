"""`specedge bench --multi-turn`: conversations that don't start over, with and without
prefix KV reuse, in one run.

C conversations share one system prompt; each has TURNS turns, every turn adding a user
message and up to --max-new-tokens generated tokens (greedy), sent through a real
`specedge-node join` to a real `specedge-verifier` as the whole conversation so far (the
OpenAI API is stateless). The conversations run side by side, turn by turn (a barrier
between turns), once with reuse on both sides and once with `--no-prefix-cache` on both.
Per turn: time to first token (median over conversations), prompt tokens the verifier
prefilled, its prefix-cache hit rate and its busy seconds; and the KV bytes per live
session (sessions held per GiB) at the end of the last turn.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import httpx

SYSTEM = (
    "You are a senior Python engineer reviewing code for a small open-source project. "
    "Answer precisely and briefly. Prefer the standard library. When you show code, show "
    "only the lines that change, with a one-line reason for each change. Point out bugs "
    "before style. If a question is ambiguous, say what you assumed. Never invent APIs: "
    "if you are not sure a function exists, say so. Use type hints, docstrings that say "
    "why, and functions short enough to read at a glance. Tests use pytest, never "
    "time-based assertions, and each one must be able to fail."
)
USERS = [
    ["How do I read a large CSV file line by line without loading it all?",
     "Now skip rows whose second column is empty.",
     "Make it a generator that yields dicts.",
     "Add a type hint for the return value.",
     "Write one pytest test for it."],
    ["What is the difference between a list and a tuple?",
     "When would you pick a tuple for performance?",
     "Show a namedtuple for a 2D point.",
     "Now the same with a dataclass.",
     "Which one would you use in an API, and why?"],
    ["How do I time a function in Python?",
     "Make it a decorator.",
     "Let it log with the logging module instead of print.",
     "Make the log level a parameter.",
     "Show how to use it on an async function."],
    ["What does `with open(...)` do for me?",
     "Write a context manager that changes the working directory.",
     "Make it restore the directory even on an exception.",
     "Now as a class instead of contextlib.",
     "Which form is easier to test?"],
]
TURNS = 5


def run_multiturn(args: argparse.Namespace, network_cls: type, work: Path) -> dict:
    """Both configurations, one after the other on the same machine; the report."""
    out: dict = {"conversations": min(args.conversations, len(USERS)), "turns": TURNS,
                 "max_new_tokens": args.max_new_tokens, "configs": {}}
    for name, reuse in (("reuse", True), ("no_reuse", False)):
        print(f"multi-turn ({name}) ...", flush=True)
        folder = work / name
        folder.mkdir()
        with network_cls(args, folder, reuse=reuse) as net:
            out["configs"][name] = _conversations(net, args, out["conversations"])
    out["summary"] = summarise(out["configs"])
    return out


class _Sampler:
    """Samples the verifier's live sessions and the KV they hold while turns run."""

    def __init__(self, net: object) -> None:
        self.net = net
        self.samples: list[tuple[float, float]] = []  # (sessions open, session KV bytes)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.25):
            try:
                m = self.net.metrics()  # type: ignore[attr-defined]
            except httpx.HTTPError:
                continue
            self.samples.append((m.get("specedge_sessions_open", 0.0),
                                 m.get("specedge_kv_session_bytes", 0.0)))

    def __enter__(self) -> _Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def bytes_per_session(self) -> float | None:
        """At the busiest moments seen: KV held (shared blocks once) per live session."""
        if not self.samples:
            return None
        most = max(n for n, _ in self.samples)
        held = max(b for n, b in self.samples if n == most)
        return round(held / most) if most else None


def _conversations(net: object, args: argparse.Namespace, count: int) -> dict:
    url = f"http://127.0.0.1:{net.api_port}/v1/chat/completions"  # type: ignore[attr-defined]
    _chat(url, args, [{"role": "user", "content": "Say hi."}])  # warm-up, not counted
    with _Sampler(net) as sampler:
        turns = _turns(net, url, args, count)
    return {"turns": turns, "kv_bytes_per_session": sampler.bytes_per_session()}


def _turns(net: object, url: str, args: argparse.Namespace, count: int) -> list[dict]:
    histories = [[{"role": "system", "content": SYSTEM}] for _ in range(count)]
    turns = []
    for turn in range(TURNS):
        before = net.metrics()  # type: ignore[attr-defined]
        results: list[dict] = [{} for _ in range(count)]

        def one(i: int, turn: int = turn, results: list[dict] = results) -> None:
            histories[i].append({"role": "user", "content": USERS[i][turn]})
            body = _chat(url, args, histories[i])
            results[i] = body["specedge"]
            histories[i].append({"role": "assistant",
                                 "content": body["choices"][0]["message"]["content"]})

        threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        after = net.metrics()  # type: ignore[attr-defined]
        turns.append(_turn_row(turn + 1, results, before, after))
    return turns


def _chat(url: str, args: argparse.Namespace, messages: list[dict]) -> dict:
    body = {"model": args.target_model, "messages": messages,
            "max_tokens": args.max_new_tokens, "temperature": 0}
    for _ in range(3):
        r = httpx.post(url, json=body, timeout=args.timeout)
        if r.status_code == 200:
            return r.json()
        if r.status_code != 503:
            break
        time.sleep(float(r.headers.get("retry-after", "1")))
    raise RuntimeError(f"chat failed: {r.status_code} {r.text[:300]}")


def _delta(before: dict, after: dict, name: str) -> float:
    def total(m: dict) -> float:
        return sum(v for k, v in m.items() if k.split("|")[0] == name)
    return total(after) - total(before)


def _turn_row(turn: int, results: list[dict], before: dict, after: dict) -> dict:
    queries = _delta(before, after, "specedge_prefix_cache_queries_total")
    hits = _delta(before, after, "specedge_prefix_cache_hits_total")
    ttft = [r["time_to_first_token_ms"] for r in results if r.get("time_to_first_token_ms")]
    return {
        "turn": turn,
        "ttft_ms_p50": round(statistics.median(ttft), 1) if ttft else None,
        "prefill_tokens": int(_delta(before, after, "specedge_prefill_tokens_total")),
        "prefix_hit_rate": round(hits / queries, 4) if queries else 0.0,
        "verifier_busy_s": round(_delta(before, after, "specedge_engine_busy_seconds_total"), 3),
        "draft_prefix_reused": sum(r.get("draft_prefix_reused", 0) for r in results),
    }


def summarise(configs: dict) -> dict:
    """The issue's goals: turn-5 TTFT and whole-conversation busy time, reuse vs not."""
    reuse, plain = configs["reuse"]["turns"], configs["no_reuse"]["turns"]
    last_r, last_p = reuse[-1], plain[-1]
    busy_r = sum(t["verifier_busy_s"] for t in reuse)
    busy_p = sum(t["verifier_busy_s"] for t in plain)
    per_r = configs["reuse"]["kv_bytes_per_session"]
    per_p = configs["no_reuse"]["kv_bytes_per_session"]
    return {
        "turn5_ttft_ratio": round(last_p["ttft_ms_p50"] / last_r["ttft_ms_p50"], 2)
        if last_r["ttft_ms_p50"] and last_p["ttft_ms_p50"] else None,
        "busy_ratio": round(busy_p / busy_r, 2) if busy_r else None,
        "prefill_tokens": {"reuse": sum(t["prefill_tokens"] for t in reuse),
                           "no_reuse": sum(t["prefill_tokens"] for t in plain)},
        "sessions_per_gib": {"reuse": round(2**30 / per_r, 1) if per_r else None,
                             "no_reuse": round(2**30 / per_p, 1) if per_p else None},
    }


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="multi-turn: prefix KV reuse against none")
    for col in ("config", "turn", "TTFT p50 ms", "prefill tokens", "hit rate", "busy s",
                "draft reused"):
        table.add_column(col, justify="right")
    for name, cfg in report["configs"].items():
        for t in cfg["turns"]:
            table.add_row(name, str(t["turn"]), str(t["ttft_ms_p50"]), str(t["prefill_tokens"]),
                          f"{t['prefix_hit_rate']:.2%}", f"{t['verifier_busy_s']:.2f}",
                          str(t["draft_prefix_reused"]))
    console = Console(width=120)
    console.print(table)
    console.print(json.dumps(report["summary"]))
