"""`specedge`: run a generation in one process (and, as the project grows, the demo,
the benchmarks and a bootstrap peer)."""

from __future__ import annotations

import argparse
import json
import sys

from specedge.treeshape import DEFAULT_TREE, TreeShape

DTYPES = ("float32", "bfloat16", "float16")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--draft-model", default="tiny-test-draft",
                   help="draft model: preset, HF id, folder or .gguf (default: %(default)s)")
    p.add_argument("--target-model", default="tiny-test",
                   help="target model: preset, HF id, folder or .gguf (default: %(default)s)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="weights and compute dtype (default: %(default)s; float32 is bit-exact)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt as one user turn in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64, help="default: %(default)s")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 is greedy (default); above 0 samples with --seed")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--tree", type=tree_shape, default=TreeShape.parse(DEFAULT_TREE),
                   metavar="SHAPE", help="draft shape: chain:N, tree:BUDGET,DEPTH,WIDTH or "
                   f"dynamic:BUDGET[,WIDTH] (default: {DEFAULT_TREE})")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (text, token_ids, stats) instead of streaming")


def tree_shape(text: str) -> TreeShape:
    try:
        return TreeShape.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def cmd_generate(args: argparse.Namespace) -> int:
    from specedge.engine import speculative_generate
    from specedge.models import check_pair, load_model
    from specedge.sampling import SamplingParams
    from specedge.text import StreamDecoder, encode_prompt, eos_ids

    dtype = torch_dtype(args.dtype)
    draft, draft_tok = load_model(args.draft_model, dtype, args.device)
    target, tok = load_model(args.target_model, dtype, args.device)
    check_pair(draft_tok, tok, args.draft_model, args.target_model)
    params = SamplingParams(args.temperature, args.top_p, args.top_k, args.seed)
    params.check()
    prompt = encode_prompt(tok, args.prompt, args.chat)
    stream = StreamDecoder(tok)

    def show(new: list[int]) -> None:
        sys.stdout.write(stream.push(new))
        sys.stdout.flush()

    gen = speculative_generate(
        draft, target, prompt, args.max_new_tokens, params, args.tree,
        proactive=not args.no_proactive, eos_ids=eos_ids(tok, target.generation_config),
        on_tokens=None if args.json else show,
    )
    if args.json:
        text = tok.decode(gen.token_ids, skip_special_tokens=True)
        print(json.dumps({"text": text, "token_ids": gen.token_ids, "stats": gen.stats.as_dict()}))
    else:
        sys.stdout.write(stream.flush() + "\n")
        s = gen.stats
        print(f"[{s.generated} tokens, {s.rounds} rounds, acceptance {s.acceptance:.1%}, "
              f"{s.mean_accepted_length:.2f} accepted/round, proactive hits "
              f"{s.proactive_hits}/{s.proactive_bets}, {s.wall_s:.2f} s]", file=sys.stderr)
    return 0


def cmd_bootstrap(args: argparse.Namespace) -> int:
    """A DHT-only peer that helps nodes and verifiers find each other (with --monitor, it
    also serves the network monitor)."""
    from specedge.monitor.cli import bootstrap_service
    from specedge.protocol.hosts import cmd_bootstrap as run_bootstrap

    return run_bootstrap(args, service=bootstrap_service(args))


def cmd_monitor(args: argparse.Namespace) -> int:
    from specedge.monitor.cli import cmd_monitor as run_monitor

    return run_monitor(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from specedge.demo import run_demo

    return run_demo(tiny=args.tiny, max_tokens=args.max_new_tokens, dtype=args.dtype,
                    timeout=args.timeout, engine=args.engine)


def cmd_bench(argv: list[str]) -> int:
    """The benchmarks live in the source checkout's bench/ folder, beside this package."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if not (root / "bench" / "run.py").is_file():
        raise ValueError("specedge bench needs a source checkout (bench/ beside specedge/): "
                         "git clone the project and run `make demo` or `pip install -e .`")
    sys.path.insert(0, str(root))
    from bench.run import main as bench_main

    return bench_main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specedge",
        description="SpecEdge: speculative decoding split between edge drafters and "
        "batched verifiers. This command runs things in one process.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="draft and verify in one process (the reference "
                         "the network must match)")
    add_model_args(gen)
    add_sampling_args(gen)
    gen.add_argument("--no-proactive", action="store_true",
                     help="do not draft the next tree while a verification is pending")
    gen.set_defaults(func=cmd_generate)
    from specedge.monitor.cli import add_bootstrap_monitor_args, add_monitor_args
    from specedge.protocol.netargs import add_bootstrap_args

    boot = sub.add_parser("bootstrap", help="run a DHT-only peer that nodes and verifiers "
                          "bootstrap from (what a network operator runs on a public address)")
    add_bootstrap_args(boot)
    add_bootstrap_monitor_args(boot)
    boot.set_defaults(func=cmd_bootstrap)

    mon = sub.add_parser("monitor", help="crawl the network and serve a web page and JSON "
                         "API of its verifiers, models, load and (with --ledger) leaderboard",
                         description="Crawl the DHT from the bootstrap peers, ask every peer "
                         "for its advertisement, and serve a self-refreshing web page and "
                         "/api/state: models, verifiers (reachability, load, uptime, last "
                         "seen), misbehaving peers, totals, throughput, and with --ledger a "
                         "leaderboard and the cost per token.")
    add_monitor_args(mon)
    mon.set_defaults(func=cmd_monitor)

    demo = sub.add_parser("demo", help="start a verifier and two nodes on loopback and stream "
                          "a few generations (the demo pair; --tiny for the test pair)")
    demo.add_argument("--tiny", action="store_true",
                      help="use the tiny-test pair (no model preparation; seconds, not minutes)")
    demo.add_argument("--max-new-tokens", type=int, default=96, help="default: %(default)s")
    demo.add_argument("--dtype", choices=DTYPES, default=None,
                      help="default: bfloat16 for the demo pair, float32 for --tiny")
    demo.add_argument("--timeout", type=float, default=900.0,
                      help="seconds to wait for processes and generations (default: 900)")
    demo.add_argument("--engine", choices=("auto", "torch", "llama.cpp"), default="auto",
                      help="auto: each process measures the engines it can run and keeps the "
                      "fastest here (default: %(default)s)")
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", add_help=False,
                           help="autoregressive vs server-only speculative vs SpecEdge, "
                           "measured in one run (`specedge bench --help` for options)")
    bench.set_defaults(func=None)  # main() hands everything after "bench" to bench.run
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from specedge.errors import ModelError

    try:
        if argv[:1] == ["bench"]:
            return cmd_bench(argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except (ModelError, ValueError) as exc:
        print(f"specedge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
