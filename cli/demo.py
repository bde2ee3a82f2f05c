"""`driftsafe demo`: the main job, end to end on embedded defaults.

Builds (or reuses) the built-in model and data, starts the embedded service (API + worker, no
servers), submits a plain SFT, a self-distillation and a frozen-groups job and one with the
`drift_safe` preset through the HTTP API, shows their progress, prints the side-by-side table,
saves the four adapters and, for each job, says whether a checkpoint stayed within the budget.
"""

from __future__ import annotations

import secrets
import sys
import time
from pathlib import Path

import httpx

METHODS = {
    "supervised": {"type": "supervised"},
    "self_distillation": {"type": "self_distillation", "self_distillation": {"hyperparameters": {
        "distill_weight": 1.0, "distill_temperature": 0.5}}},
    "frozen_groups": {"type": "frozen_groups", "frozen_groups": {"hyperparameters": {
        "trainable": ["attention"]}}},
}
HYPER = {"n_epochs": 40, "batch_size": 32, "learning_rate": 1e-3}
PRESET_JOB = "drift_safe_preset"  # the method and its pull come from the preset


def _recipe(name: str, epochs: int) -> dict:
    if name == PRESET_JOB:
        return {"preset": "drift_safe", "method": {"type": "self_distillation",
                "self_distillation": {"hyperparameters": {**HYPER, "n_epochs": epochs}}}}
    return {"method": _method(name, epochs)}


def _method(name: str, epochs: int) -> dict:
    m = {k: (dict(v) if isinstance(v, dict) else v) for k, v in METHODS[name].items()}
    block = m.setdefault(name, {})
    block["hyperparameters"] = {**HYPER, "n_epochs": epochs, **block.get("hyperparameters", {})}
    return m


def _bar(done: int, total: int, width: int = 28) -> str:
    filled = int(width * done / total) if total else 0
    return "█" * filled + "·" * (width - filled)


_last_logged: dict[str, tuple] = {}


def _draw(jobs: dict[str, dict], first: bool) -> None:
    """Bars redrawn in place on a terminal; in a log, one line per job per tenth of progress."""
    tty = sys.stdout.isatty()
    if tty and not first:
        sys.stdout.write(f"\x1b[{len(jobs)}F")
    for name, job in jobs.items():
        p = job.get("progress") or {}
        step, total = p.get("step", 0), p.get("total_steps", 0)
        if job["status"] == "succeeded":
            step = total = 1
        left = p.get("seconds_remaining")
        eta = f"~{left:.0f}s left" if left is not None and job["status"] == "running" else ""
        line = (f"{name:<18} {_bar(step, total)} {job['status']:<10} "
                f"{(str(step) + '/' + str(total)) if p else '':<10} {eta}")
        if tty:
            sys.stdout.write(f"\x1b[2K{line}\n")
        elif _last_logged.get(name) != (job["status"], 10 * step // max(total, 1)):
            _last_logged[name] = (job["status"], 10 * step // max(total, 1))
            sys.stdout.write(line.rstrip() + "\n")
    sys.stdout.flush()


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def main(args) -> int:
    from store.db import migrate, session_scope
    from store.keys import create_key, create_tenant
    from store.settings import get_settings
    from trainer.builtin import default_world_dir
    from worker.embedded import embedded_service

    started = time.monotonic()
    print("1/4 built-in model and data (built once per machine, then reused)", flush=True)
    world = default_world_dir(log=lambda m: print("    " + m, flush=True))
    settings = get_settings()
    migrate(settings)
    with session_scope(settings) as s:
        tenant = create_tenant(s, f"demo-{secrets.token_hex(4)}")
        _, key = create_key(s, settings.hmac_key(), tenant)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"2/4 starting the embedded service (data in {settings.data_dir})", flush=True)
    with embedded_service(args.host, args.port, log_dir=out, workers=args.workers) as url:
        http = httpx.Client(base_url=url + "/v1", headers={"Authorization": f"Bearer {key}"},
                            timeout=60)

        def upload(path: Path) -> str:
            with open(path, "rb") as fh:
                r = http.post("/files", files={"file": (path.name, fh)},
                              data={"purpose": "fine-tune"})
            r.raise_for_status()
            return r.json()["id"]

        train_id = upload(world / "train.jsonl")
        known_id = upload(world / "heldout_known.jsonl")
        print("3/4 four jobs through the HTTP API: same data, same LoRA adapter, "
              f"{args.epochs} epochs (the preset may stop early)", flush=True)
        ids = {}
        for name in [*METHODS, PRESET_JOB]:
            r = http.post("/fine_tuning/jobs", json={
                "model": "driftsafe-factlm-tiny", "training_file": train_id, "seed": 0,
                **_recipe(name, args.epochs), "suffix": f"demo-{name.replace('_preset', '')}",
                "evaluation": {"known_facts_file": known_id, "max_forgetting": 0.05}})
            r.raise_for_status()
            ids[name] = r.json()["id"]
        jobs = {n: http.get(f"/fine_tuning/jobs/{i}").json() for n, i in ids.items()}
        print(f"    watch them in the dashboard: {url}/ui (API key {key})", flush=True)
        _draw(jobs, first=True)
        while any(j["status"] in ("queued", "running", "validating_files") for j in jobs.values()):
            time.sleep(1)
            jobs = {n: http.get(f"/fine_tuning/jobs/{i}").json() for n, i in ids.items()}
            _draw(jobs, first=False)
        print("4/4 results on 1,000 held-out facts the base model knew", flush=True)
        print("\n| job | status | new-fact acc | held-out known | forgetting | hallucination "
              "| drift-safe |\n|---|---|---|---|---|---|---|")
        for name, job in jobs.items():
            ev = job.get("evaluation") or {}
            forget = ev.get("forgetting")
            print(f"| {name} | {job['status']} | {_pct(ev.get('new_fact_accuracy'))} | "
                  f"{_pct(ev.get('heldout_known_accuracy'))} | "
                  f"{'—' if forget is None else f'{100 * forget:.1f} pts'} | "
                  f"{_pct(ev.get('hallucination_rate'))} | {ev.get('drift_safe')} |")
        print()
        for name, job in jobs.items():
            if job["status"] != "succeeded":
                print(f"{name}: {job['status']} {job.get('error') or ''}")
                continue
            r = http.get(f"/fine_tuning/jobs/{ids[name]}/adapter")
            r.raise_for_status()
            (out / f"{name}-adapter.zip").write_bytes(r.content)
            safe = http.get(f"/fine_tuning/jobs/{ids[name]}/adapter",
                            params={"select": "drift_safe"})
            if safe.status_code == 200:
                (out / f"{name}-drift-safe-adapter.zip").write_bytes(safe.content)
            print(f"saved {out / (name + '-adapter.zip')}; drift-safe checkpoint: "
                  + (f"saved as {name}-drift-safe-adapter.zip" if safe.status_code == 200
                     else "none within the 5-point budget"))
        from cli.compare import save_comparison
        chart = save_comparison(http, list(ids.values()), out / "compare.png")
        print(f"saved {chart} (new-fact accuracy against forgetting, every job); the dashboard "
              f"compares them too: {url}/ui, while the service runs (driftsafe up)")
    print(f"done in {time.monotonic() - started:.0f}s")
    failed = [n for n, j in jobs.items() if j["status"] != "succeeded"]
    return 1 if failed else 0
