"""What the simulation knows about the hardware and the models: forward-pass times,
acceptance, round trips and prices, read from the JSON that `specedge bench --json` writes.

`Calibration.default()` gives plausible CPU figures so the simulation runs before any
bench exists; every number the simulation uses comes from one `Calibration`.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any


class CalibrationError(ValueError):
    """A bench JSON that cannot calibrate the simulation (missing or malformed field)."""


@dataclass(frozen=True)
class Curve:
    """A time (ms) as a function of a size (batch tokens, batch streams).

    Inside the measured range: piecewise-linear through the samples, so the simulation
    reproduces exactly what was measured. Beyond it: a straight line from the last sample
    with the least-squares slope of all samples, because one noisy end point should not
    decide the cost of a batch ten times larger than any measured. Below it: the first
    sample (a forward pass never gets cheaper than the smallest one measured).
    """

    xs: tuple[float, ...]
    ys: tuple[float, ...]

    @classmethod
    def from_samples(cls, xs: list[float], ys: list[float], name: str) -> Curve:
        if len(xs) != len(ys) or not xs:
            raise CalibrationError(f"{name}: needs equally many sizes and times, at least one")
        pairs = sorted(zip((float(x) for x in xs), (float(y) for y in ys), strict=True))
        if any(y <= 0 or x <= 0 for x, y in pairs):
            raise CalibrationError(f"{name}: sizes and times must be positive")
        merged: dict[float, list[float]] = {}
        for x, y in pairs:
            merged.setdefault(x, []).append(y)
        xs_u = tuple(merged)
        ys_u = tuple(sum(v) / len(v) for v in merged.values())
        return cls(xs_u, ys_u)

    @property
    def slope(self) -> float:
        """Least-squares ms per unit size (0 with a single sample, never negative)."""
        n = len(self.xs)
        if n < 2:
            return 0.0
        mx = sum(self.xs) / n
        my = sum(self.ys) / n
        sxx = sum((x - mx) ** 2 for x in self.xs)
        sxy = sum((x - mx) * (y - my) for x, y in zip(self.xs, self.ys, strict=True))
        return max(0.0, sxy / sxx)

    def __call__(self, x: float) -> float:
        xs, ys = self.xs, self.ys
        if x <= xs[0]:
            return ys[0]
        if x >= xs[-1]:
            return ys[-1] + self.slope * (x - xs[-1])
        i = bisect.bisect_right(xs, x)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def tree_shape(tree: str) -> tuple[int, int] | None:
    """(draft tokens, longest path) of a tree spec: 'chain:N' -> (N, N),
    'tree:BUDGET,DEPTH,WIDTH' -> (BUDGET, DEPTH), 'dynamic:BUDGET[,WIDTH]' -> (BUDGET, at
    most 12); None when it cannot be read."""
    kind, _, rest = tree.partition(":")
    try:
        if kind == "chain":
            return int(rest), int(rest)
        if kind == "tree":
            budget, depth, _width = (int(x) for x in rest.split(","))
            return budget, depth
        if kind == "dynamic":  # a ceiling: the bench's calibration says what was drafted
            budget = int(rest.split(",")[0])
            return budget, min(budget, 12)
    except ValueError:
        pass
    return None


@dataclass(frozen=True)
class Calibration:
    """Measured (or assumed) figures, all times in milliseconds."""

    draft_forward_ms: float  # one draft forward (one chain step) on an edge node
    draft_tree_ms: float  # drafting one whole tree on an edge node
    server_draft_tree_ms: float  # drafting one tree on the server (server-only mode)
    verify: Curve  # target forward time vs total tokens in the batch
    ar_step: Curve  # batched one-token decode time vs streams in the batch
    rtt_ms: float  # node <-> verifier round trip beyond compute
    accepted_hist: tuple[float, ...]  # rounds with 0, 1, 2, ... accepted draft tokens
    proactive_hit_rate: float  # bets that came true, over all bets
    tree_tokens: int  # draft tokens per tree
    depth: int  # draft tokens on the longest path (a hit needs the whole path accepted)
    prefill_ms_per_token: float  # target prefill cost per prompt token
    draft_prefill_ms_per_token: float  # draft prefill cost per prompt token on a node
    price_server_usd_h: float = 5.05
    price_edge_usd_h: float = 0.35
    server_draft: Curve | None = None  # server drafting time vs streams, when measured
    # Every forward pass of the target, whatever its rows are (verify trees, decode steps,
    # prefill chunks, or a mix packed into one pass): the bench's verify_ms and ar_step_ms
    # samples together, both keyed by the pass's rows (`PassResult.tokens`).
    target: Curve | None = None
    # One batched draft-model pass on the server (server-only), ms at one row; None: derived
    # from server_draft_tree_ms by `sims.network.server_draft_pass_ms`.
    server_draft_pass: float | None = None
    # The baselines' target pass by rows, when their server runs the target differently
    # from the verifier (the SpecEdge reference runs server-only eagerly, its verifier in
    # CUDA graphs); None: the same passes as the verifier (`target`).
    baseline: Curve | None = None
    bench_streams: tuple[int, ...] = (1,)  # the K values the bench ran
    prompt_tokens: int = 64  # mean prompt length of the workload
    max_new_tokens: int = 64  # tokens generated per request
    prompts: int = 8  # requests in the bench workload
    source: str = "default"
    notes: tuple[str, ...] = field(default_factory=tuple)

    # -- what the model asks ----------------------------------------------------------

    def verify_ms(self, tokens: int) -> float:
        return self.verify(tokens) if tokens > 0 else 0.0

    def pass_ms(self, rows: int) -> float:
        """One target forward pass of `rows` rows (prefill and verify rows alike)."""
        if rows <= 0:
            return 0.0
        return (self.target or self.verify)(rows)

    def baseline_pass_ms(self, rows: int) -> float:
        """One target pass of a baseline server (autoregressive, server-only)."""
        if rows <= 0:
            return 0.0
        return (self.baseline or self.target or self.verify)(rows)

    def pass_shape(self, rows: int) -> float:
        """How much a pass of `rows` rows costs relative to a one-row pass, from the target's
        curve; used for the draft model too (same engine, same hardware: an assumption)."""
        return max(1.0, self.pass_ms(rows) / self.pass_ms(1)) if rows > 0 else 0.0

    def draft_step_ms(self) -> float:
        """One draft forward on a node. `draft_tree_ms` is the bench's mean per tree
        (receipts' draft_micros over rounds): a fresh tree is `depth` forwards, an adopted
        bet `depth + 1` (the bet forwards the leaf once more), so per forward it is the
        tree time over depth + hit rate."""
        return self.draft_tree_ms / (self.depth + self.proactive_hit_rate)

    def draft_prefill_ms(self, prompt_rows: int) -> float:
        """A node's first draft forward over the whole prompt."""
        return self.draft_step_ms() * self.pass_shape(prompt_rows)

    def ar_step_ms(self, streams: int) -> float:
        return self.ar_step(streams) if streams > 0 else 0.0

    def server_draft_ms(self, streams: int) -> float:
        """Drafting one tree for each of `streams` streams in one batch on the server.

        Measured when the bench gives samples; otherwise the server's one-tree time scaled
        by how much a batch of that many streams costs the target in a decode step (the
        same batching efficiency for both models: an assumption, stated in the report).
        """
        if streams <= 0:
            return 0.0
        if self.server_draft is not None:
            return self.server_draft(streams)
        return self.server_draft_tree_ms * self.ar_step(streams) / self.ar_step(1)

    def accepted_pmf(self) -> list[float]:
        total = sum(self.accepted_hist)
        return [h / total for h in self.accepted_hist]

    def mean_accepted(self) -> float:
        return sum(k * p for k, p in enumerate(self.accepted_pmf()))

    def acceptance(self) -> float:
        """Accepted over drafted tokens (the tree's draft tokens per round)."""
        return self.mean_accepted() / self.tree_tokens

    def hit_given_full(self) -> float:
        """P(bet comes true | whole path accepted): a bet names the deepest path and the
        bonus token after it, so it can only come true when the whole path is accepted.
        Kept fixed when acceptance is scaled: it is the draft's guess of the bonus token."""
        pmf = self.accepted_pmf()
        full = pmf[self.depth] if self.depth < len(pmf) else 0.0
        if full <= 0.0:
            return 0.0
        return min(1.0, self.proactive_hit_rate / full)

    # -- variants ---------------------------------------------------------------------

    def with_acceptance_scale(self, scale: float) -> Calibration:
        """The histogram with every 'one more token accepted' probability times `scale`
        (capped at 1). Scale 1 is the measured histogram; the hit rate follows, since a
        hit needs a fully accepted path."""
        if scale == 1.0:
            return self
        pmf = self.accepted_pmf()
        n = len(pmf) - 1
        reach = 1.0  # P(L >= k)
        new: list[float] = []
        for k in range(n):
            at_least = sum(pmf[k:])
            cont = (sum(pmf[k + 1:]) / at_least) if at_least > 0 else 0.0
            cont = min(1.0, max(0.0, cont * scale))
            new.append(reach * (1.0 - cont))
            reach *= cont
        new.append(reach)
        q = self.hit_given_full()
        full = new[self.depth] if self.depth < len(new) else 0.0
        return replace(self, accepted_hist=tuple(new), proactive_hit_rate=q * full)

    def with_rtt(self, rtt_ms: float) -> Calibration:
        return replace(self, rtt_ms=rtt_ms)

    # -- sources ----------------------------------------------------------------------

    @classmethod
    def default(cls) -> Calibration:
        """Plausible figures for the demo pair (Qwen2.5-Coder 1.5B target, 0.5B draft, bf16)
        on a few CPU cores: NOT measured. A 1.5B forward reads ~3 GB of weights (~260 ms
        at ~12 GB/s) plus ~8 ms of compute per extra token; the 0.5B draft takes ~85 ms a
        forward, 4 of them per chain:4 tree; per-token acceptance ~0.7; loopback RTT 2 ms.
        Replace with `--calibration bench.json` once `specedge bench` has run."""
        return cls(
            draft_forward_ms=85.0,
            draft_tree_ms=340.0,
            server_draft_tree_ms=340.0,
            verify=Curve.from_samples([5, 10, 20, 40], [300.0, 340.0, 420.0, 580.0], "verify"),
            ar_step=Curve.from_samples([1, 2, 4, 8], [260.0, 269.0, 287.0, 323.0], "ar_step"),
            target=Curve.from_samples([1, 2, 4, 5, 8, 10, 20, 40],
                                      [260.0, 269.0, 287.0, 300.0, 323.0, 340.0, 420.0, 580.0],
                                      "target"),
            rtt_ms=2.0,
            # chain:4 with per-token acceptance 0.7: P(L=k) = 0.7^k * 0.3, P(L=4) = 0.7^4
            accepted_hist=(300.0, 210.0, 147.0, 103.0, 240.0),
            proactive_hit_rate=0.15,
            tree_tokens=4,
            depth=4,
            prefill_ms_per_token=10.0,
            draft_prefill_ms_per_token=10.0 * 85.0 / 260.0,
            prompt_tokens=64,
            max_new_tokens=64,
            prompts=8,
            source="default (plausible CPU figures, not measured)",
        )

    @classmethod
    def from_bench_json(cls, path: str | Path) -> Calibration:
        """Read `specedge bench --json` output. Required: calibration.draft_tree_ms,
        verify_ms, ar_step_ms, accepted_length_hist. Everything else has a stated default
        (listed in `notes`)."""
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise CalibrationError(f"{path}: no such bench JSON") from None
        except json.JSONDecodeError as e:
            raise CalibrationError(f"{path}: not JSON ({e})") from None
        return cls.from_bench(doc, source=str(path))

    @classmethod
    def from_bench(cls, doc: dict[str, Any], source: str = "bench") -> Calibration:
        if not isinstance(doc, dict) or not isinstance(doc.get("calibration"), dict):
            raise CalibrationError(f"{source}: missing required object 'calibration'")
        cal = doc["calibration"]
        config = doc.get("config") if isinstance(doc.get("config"), dict) else {}
        notes: list[str] = []

        def need(key: str, what: str) -> Any:
            if key not in cal or cal[key] is None:
                raise CalibrationError(f"{source}: missing required calibration.{key} ({what})")
            return cal[key]

        def number(key: str, value: Any) -> float:
            try:
                out = float(value)
            except (TypeError, ValueError):
                raise CalibrationError(f"{source}: calibration.{key} must be a number") from None
            if not math.isfinite(out) or out < 0:
                raise CalibrationError(f"{source}: calibration.{key} must be finite and >= 0")
            return out

        def optional(key: str, default: float, why: str) -> float:
            if cal.get(key) is None:
                notes.append(f"calibration.{key} missing: {why} ({default:g})")
                return default
            return number(key, cal[key])

        def curve(key: str, size_key: str, what: str) -> Curve:
            obj = need(key, what)
            if not isinstance(obj, dict) or size_key not in obj or "ms" not in obj:
                raise CalibrationError(
                    f"{source}: calibration.{key} must be {{'{size_key}': [...], 'ms': [...]}}")
            try:
                return Curve.from_samples(list(obj[size_key]), list(obj["ms"]),
                                          f"{source}: calibration.{key}")
            except TypeError:
                raise CalibrationError(f"{source}: calibration.{key} samples must be lists") \
                    from None

        draft_tree_ms = number("draft_tree_ms", need("draft_tree_ms", "drafting one tree"))
        verify = curve("verify_ms", "batch_tokens", "target forward time vs batch tokens")
        ar_step = curve("ar_step_ms", "batch", "decode step time vs batch size")
        hist_raw = need("accepted_length_hist", "rounds per accepted length")
        try:
            hist = tuple(float(h) for h in hist_raw)
        except (TypeError, ValueError):
            raise CalibrationError(
                f"{source}: calibration.accepted_length_hist must be a list of counts") from None
        if not hist or sum(hist) <= 0 or any(h < 0 for h in hist):
            raise CalibrationError(
                f"{source}: calibration.accepted_length_hist needs non-negative counts, not all 0")

        shape = tree_shape(str(config.get("tree", "")))
        if shape is None:
            notes.append("config.tree missing or unreadable: a chain as long as the histogram")
            shape = (max(1, len(hist) - 1), max(1, len(hist) - 1))
        tree_tokens = int(optional("tree_tokens", shape[0], "from config.tree"))
        if tree_tokens < 1:
            raise CalibrationError(f"{source}: calibration.tree_tokens must be >= 1")
        depth = min(shape[1], tree_tokens)
        if len(hist) > depth + 1:
            raise CalibrationError(
                f"{source}: accepted_length_hist has lengths beyond the tree depth {depth}")
        hist = hist + (0.0,) * (depth + 1 - len(hist))

        draft_forward_ms = optional("draft_forward_ms", draft_tree_ms / max(depth, 1),
                                    "draft tree time over depth")
        modes = doc.get("modes") if isinstance(doc.get("modes"), dict) else {}
        hit_default = 0.0
        spec = modes.get("specedge") if isinstance(modes.get("specedge"), dict) else {}
        for row in spec.values():
            if isinstance(row, dict) and row.get("proactive_hit_rate") is not None:
                hit_default = float(row["proactive_hit_rate"])
                break
        hit = optional("proactive_hit_rate", hit_default, "from modes.specedge, else none")
        if hit > 1:
            raise CalibrationError(f"{source}: calibration.proactive_hit_rate must be <= 1")
        prefill = optional("prefill_ms_per_token", max(verify.slope, 0.1),
                           "the verify curve's ms per token")
        server_draft = None
        if isinstance(cal.get("server_draft_tree_ms_batch"), dict):
            server_draft = curve("server_draft_tree_ms_batch", "batch", "server drafting")
        prices = cal.get("prices_usd_per_hour") or {}
        if not prices:
            notes.append("calibration.prices_usd_per_hour missing: server 5.05, edge 0.35")
        prompt_tokens = cal.get("prompt_tokens", config.get("prompt_tokens"))
        if prompt_tokens is None:
            notes.append("prompt length missing (calibration.prompt_tokens): 64")
        ar1 = ar_step(1)
        vs, av = cal["verify_ms"], cal["ar_step_ms"]
        target = Curve.from_samples(list(vs["batch_tokens"]) + list(av["batch"]),
                                    list(vs["ms"]) + list(av["ms"]), f"{source}: target passes")
        try:
            streams = tuple(sorted(int(k) for k in config.get("streams") or ()))
        except (TypeError, ValueError):
            streams = ()
        draft_pass = cal.get("server_draft_pass_ms")  # not emitted by the bench yet
        return cls(
            draft_forward_ms=draft_forward_ms,
            draft_tree_ms=draft_tree_ms,
            server_draft_tree_ms=optional("server_draft_tree_ms", draft_tree_ms,
                                          "the node's draft_tree_ms"),
            verify=verify,
            ar_step=ar_step,
            rtt_ms=optional("rtt_ms", 1.0, "loopback"),
            accepted_hist=hist,
            proactive_hit_rate=hit,
            tree_tokens=tree_tokens,
            depth=depth,
            prefill_ms_per_token=prefill,
            draft_prefill_ms_per_token=optional(
                "draft_prefill_ms_per_token", prefill * draft_forward_ms / ar1,
                "target prefill scaled by draft/target forward time"),
            price_server_usd_h=float(prices.get("server", 5.05)),
            price_edge_usd_h=float(prices.get("edge", 0.35)),
            server_draft=server_draft,
            target=target,
            server_draft_pass=None if draft_pass is None else number("server_draft_pass_ms",
                                                                      draft_pass),
            bench_streams=streams or (1,),
            prompt_tokens=int(prompt_tokens if prompt_tokens is not None else 64),
            max_new_tokens=int(config.get("max_new_tokens", 64)),
            prompts=int(config.get("prompts", 8)),
            source=source,
            notes=tuple(notes),
        )

    def summary(self) -> dict[str, Any]:
        """The figures a report should show next to simulated results."""
        return {
            "source": self.source,
            "draft_tree_ms": self.draft_tree_ms,
            "server_draft_tree_ms": self.server_draft_tree_ms,
            "verify_ms": {"batch_tokens": list(self.verify.xs), "ms": list(self.verify.ys)},
            "ar_step_ms": {"batch": list(self.ar_step.xs), "ms": list(self.ar_step.ys)},
            "rtt_ms": self.rtt_ms,
            "acceptance": round(self.acceptance(), 4),
            "mean_accepted_length": round(self.mean_accepted(), 4),
            "proactive_hit_rate": round(self.proactive_hit_rate, 4),
            "tree_tokens": self.tree_tokens,
            "prefill_ms_per_token": self.prefill_ms_per_token,
            "prices_usd_per_hour": {"server": self.price_server_usd_h,
                                    "edge": self.price_edge_usd_h},
            "notes": list(self.notes),
        }
