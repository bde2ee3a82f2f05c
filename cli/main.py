"""The `driftsafe` command: one entry point, subcommands imported only when used.

Importing lazily keeps `driftsafe serve api` free of torch and every command quick to start.
"""

from __future__ import annotations

import argparse
import sys


def _lazy(module: str, name: str):
    """The command's function, imported only when that command runs."""
    return lambda a: getattr(__import__(module, fromlist=["x"]), name)(a)


def _world(sub) -> None:
    p = sub.add_parser("world", help="the synthetic fact world and the built-in model")
    wsub = p.add_subparsers(dest="world_cmd", required=True)
    b = wsub.add_parser("build", help="build (or reuse) a world: model/, train.jsonl, ...")
    b.add_argument("--seed", type=int, default=None, help="default: the built-in world")
    b.add_argument("--out", required=True, help="directory to lay the world out in")
    b.set_defaults(func=_lazy("trainer.cli", "world_build"))


def _train(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a model with the trainer alone (no service)")
    p.add_argument("--config", help="JSON file with a TrainSpec and the paths below")
    p.add_argument("--model", help="model directory (default: the built-in model)")
    p.add_argument("--training-file",
                   help="JSONL training file (default: the built-in train.jsonl)")
    p.add_argument("--known-facts", help="QA JSONL of facts the base knows (default: built-in)")
    p.add_argument("--out", required=True, help="output directory (checkpoints, final adapter)")
    p.add_argument("--method", default="self_distillation",
                   choices=["supervised", "self_distillation", "frozen_groups"])
    p.add_argument("--adapter", default="lora", choices=["lora", "full"])
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--distill-weight", type=float)
    p.add_argument("--distill-temperature", type=float)
    p.add_argument("--teacher", choices=["base", "format_warmup"])
    p.add_argument("--trainable", help="frozen_groups: comma-separated groups, e.g. attention")
    p.add_argument("--max-forgetting", type=float)
    p.add_argument("--seed", type=int)
    p.set_defaults(func=_lazy("trainer.cli", "train_command"))


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks that print their figures")
    bsub = p.add_subparsers(dest="bench_cmd", required=True)
    paper = bsub.add_parser("paper", help="the paper's table on the fact world")
    paper.add_argument("--seed", type=int, default=0)
    paper.add_argument("--json", help="write the rows here too")
    paper.add_argument("--lora", action="store_true", help="add LoRA rows")
    paper.add_argument("--only", help="comma-separated rows to run (default: every row)")
    paper.set_defaults(func=_lazy("bench.paper", "main"))
    speed = bsub.add_parser("speed", help="our loop vs HF Trainer and TRL, SD cost, scoring speed")
    speed.add_argument("--json", help="write the figures here too")
    speed.add_argument("--steps", type=int, default=60)
    speed.set_defaults(func=_lazy("bench.speed", "main"))
    frontier = bsub.add_parser("frontier", help="new-fact accuracy against forgetting, every "
                               "checkpoint of every configuration (LoRA)")
    frontier.add_argument("--seed", type=int, default=0)
    frontier.add_argument("--epochs", type=int, default=20)
    frontier.add_argument("--only", help="comma-separated configurations (sft and sd_lambda_1 "
                          "always run: the floor and the L2 strength come from them)")
    frontier.add_argument("--json", help="write the figures here too")
    frontier.add_argument("--plot", help="write the curves to this PNG")
    frontier.set_defaults(func=_lazy("bench.frontier", "main"))
    interference = bsub.add_parser("interference", help="forgetting and drift against the "
                                   "number of new facts, name-like vs UUID keys (SFT)")
    interference.add_argument("--seed", type=int, default=0)
    interference.add_argument("--json", help="write the figures here too")
    interference.set_defaults(func=_lazy("bench.interference", "main"))
    api = bsub.add_parser("api", help="the API under load (wrk) beside a bare FastAPI app")
    api.add_argument("--json", help="write the figures here too")
    api.add_argument("--workers", type=_at_least_one, default=1,
                     help="uvicorn processes, both apps")
    api.add_argument("--connections", type=int, default=32)
    api.add_argument("--seconds", type=int, default=10, help="measured seconds per phase")
    api.add_argument("--warmup", type=int, default=2, help="warm-up seconds before each phase")
    api.add_argument("--rounds", type=_at_least_one, default=2,
                     help="rounds of every phase, the bare app's beside driftsafe's")
    api.add_argument("--wrk-threads", type=int, default=2)
    api.add_argument("--timeout", type=int, default=30,
                     help="seconds before wrk counts a request as timed out")
    api.add_argument("--upload-mb", type=float, default=200.0,
                     help="size of the JSONL file uploaded again and again during one read phase")
    api.add_argument("--driftsafe-root",
                     help="serve this driftsafe checkout instead (before/after comparisons)")
    api.add_argument("--bare-style", choices=["sync", "async"], default="sync",
                     help="the bare app's routes: sync def (default) or async def (needs greenlet)")
    api.add_argument("--bare-threads", type=int, default=None,
                     help="the bare app's request threads (default: the stack's, anyio's 40)")
    api.add_argument("--redis-db", type=int, default=12,
                     help="a Redis database of the bench's own (flushed before and after)")
    api.add_argument("--logs", help="keep the servers' logs in this directory")
    api.set_defaults(func=_lazy("bench.api", "main"))
    gpu = bsub.add_parser("gpu", help="a Qwen2 0.5B-shape model on one CUDA GPU: our loop vs HF "
                          "Trainer, SD cost, scoring speed (refuses without a GPU)")
    gpu.add_argument("--json", help="write the figures here too")
    gpu.add_argument("--steps", type=int, default=30, help="optimizer steps per timed run")
    gpu.add_argument("--examples", type=int, default=3000, help="QA facts in the training set")
    gpu.set_defaults(func=_lazy("bench.gpu", "main"))


def _service(sub) -> None:
    serve = sub.add_parser("serve", help="run a server process")
    ssub = serve.add_subparsers(dest="serve_cmd", required=True)
    api = ssub.add_parser("api", help="the HTTP API (uvicorn); runs migrations first")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--log-level", default="info")
    api.add_argument("--workers", type=_at_least_one, default=1,
                     help="uvicorn processes (default 1)")
    api.set_defaults(func=_lazy("api.cli", "serve_api"))
    worker = ssub.add_parser("worker", help="a Celery worker: one job at a time")
    worker.add_argument("--name", default=None, help="worker node name")
    worker.set_defaults(func=_lazy("worker.cli", "serve_worker"))

    up = sub.add_parser("up", help="API and worker together, no servers needed (embedded mode)")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--workers", type=_at_least_one, default=1, help="worker processes")
    up.set_defaults(func=_lazy("worker.embedded", "up"))

    demo = sub.add_parser("demo", help="the main job: three methods side by side, end to end")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8765)
    # 0 workers would run no job: the demo waited for its jobs forever
    demo.add_argument("--workers", type=_at_least_one, default=1, help="worker processes")
    demo.add_argument("--epochs", type=int, default=40)
    demo.add_argument("--out", default="driftsafe-demo", help="adapters and logs go here")
    demo.set_defaults(func=_lazy("cli.demo", "main"))

    tenants = sub.add_parser("tenants", help="manage tenants")
    tsub = tenants.add_subparsers(dest="tenants_cmd", required=True)
    tc = tsub.add_parser("create", help="create a tenant; prints its first API key once, last")
    tc.add_argument("name")
    tc.set_defaults(func=_lazy("api.cli", "tenants_create"))

    keys = sub.add_parser("keys", help="manage API keys")
    ksub = keys.add_subparsers(dest="keys_cmd", required=True)
    kc = ksub.add_parser("create", help="a new key for a tenant, printed once, last")
    kc.add_argument("--tenant", required=True)
    kc.set_defaults(func=_lazy("api.cli", "keys_create"))
    kr = ksub.add_parser("revoke", help="revoke a key by its id (key_...)")
    kr.add_argument("key_id")
    kr.set_defaults(func=_lazy("api.cli", "keys_revoke"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="driftsafe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_world, _train, _bench, _service):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
