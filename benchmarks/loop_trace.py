"""Does the training loop keep the device fed? A profiler trace of `train.py` says.

    python benchmarks/loop_trace.py [--steps=60 --profile_steps=20]

Runs the tiny config on this host's CPU with `--config.train.profile_steps` from its first
step, then reads the trace that `jax.profiler` wrote into the run's TensorBoard logdir (its
Profile tab shows the same): for each traced step, when the host dispatched it (the loop's
`train` step annotation) and when XLA executed it (the runtime's `wait for completion` span
of each execution, in dispatch order). A step dispatched before the previous one has
finished is queued ahead: the device does not wait for the host to dispatch it. Also
reported: the host time per step (dispatch and the next batch placed on the devices)
against the step time, the device's idle time between executions, and the run's own
`host_busy_fraction` (summary.json). Results: benchmarks/results/loop_trace.md.
"""

import argparse
import glob
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_trace(logdir: str) -> list[dict]:
    paths = sorted(glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.trace.json.gz")))
    if not paths:
        raise SystemExit(f"no profiler trace under {logdir}/plugins/profile")
    with gzip.open(paths[-1]) as f:
        return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


def analyse(events: list[dict]) -> dict:
    """Dispatches matched to executions in order; times in milliseconds."""
    steps = sorted((e for e in events if e["name"] == "train"), key=lambda e: e["ts"])
    # Each step's annotation opens with its dispatch (nested PjitFunction events of one
    # call would count it twice).
    dispatches = [e["ts"] for e in steps]
    runs = sorted(
        (e["ts"], e["ts"] + e["dur"])
        for e in events
        if e["name"].startswith("ThunkExecutor::Execute (wait for completion)")
    )
    runs = [r for r in runs if r[0] >= dispatches[0]]
    n = min(len(dispatches), len(runs))
    rows = []
    for i in range(n):
        start, end = runs[i]
        previous_end = runs[i - 1][1] if i else None
        rows.append(
            {
                "dispatched": dispatches[i] / 1e3,
                "started": start / 1e3,
                "ended": end / 1e3,
                # Queued ahead: dispatched while the previous execution was still running.
                "queued_ahead": previous_end is not None and dispatches[i] < previous_end,
                "idle_before": None if previous_end is None else (start - previous_end) / 1e3,
            }
        )
    host = [e["dur"] / 1e3 for e in steps]
    period = (runs[n - 1][1] - runs[0][0]) / 1e3 / n
    busy = sum(r[1] - r[0] for r in runs[:n]) / 1e3
    return {
        "rows": rows,
        "host_ms_per_step": statistics.median(host),
        "step_ms": period,
        "device_busy_fraction": busy / (period * n),
        "idle_ms_between": statistics.median(r["idle_before"] for r in rows[1:]),
        "queued_ahead": sum(r["queued_ahead"] for r in rows[1:]),
        "steps": n,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--profile_steps", type=int, default=20)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        command = [
            sys.executable,
            os.path.join(ROOT, "train.py"),
            f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}",
            f"--workdir={workdir}",
            f"--config.train.num_steps={args.steps}",
            "--config.optim.warmup_steps=10",
            f"--config.train.profile_steps={args.profile_steps}",
            # From the first step: every execution in the trace is then a traced step's
            # (the runtime's spans name no step), matched to the dispatches in order.
            "--config.train.profile_start=0",
            f"--config.train.eval_every={args.steps}",
            f"--config.train.checkpoint_every={args.steps}",
        ]
        subprocess.run(command, check=True, capture_output=True)
        result = analyse(read_trace(os.path.join(workdir, "tensorboard")))
        with open(os.path.join(workdir, "summary.json")) as f:
            summary = json.load(f)
    lines = [
        f"Tiny config, batch 32 x 128, {result['steps']} traced steps of a {args.steps}-step "
        f"`train.py` run on this host's CPU (`python benchmarks/loop_trace.py`).",
        "",
        "| step | dispatched (ms) | executed (ms) | queued ahead | device idle before (ms) |",
        "|---|---|---|---|---|",
    ]
    t0 = result["rows"][0]["dispatched"]
    for i, r in enumerate(result["rows"]):
        idle = "-" if r["idle_before"] is None else f"{r['idle_before']:.1f}"
        lines.append(
            f"| {i + 1} | {r['dispatched'] - t0:.1f} | {r['started'] - t0:.1f} - "
            f"{r['ended'] - t0:.1f} | {'yes' if r['queued_ahead'] else 'no'} | {idle} |"
        )
    lines += [
        "",
        f"- steps dispatched while the previous one was executing: {result['queued_ahead']} "
        f"of {result['steps'] - 1}",
        f"- host time per step (dispatch, next batch placed): "
        f"{result['host_ms_per_step']:.1f} ms of a {result['step_ms']:.1f} ms step "
        f"({result['host_ms_per_step'] / result['step_ms']:.1%})",
        f"- device busy {result['device_busy_fraction']:.1%} of the traced window; median "
        f"idle between executions {result['idle_ms_between']:.1f} ms",
        f"- the run's summary.json: host_busy_fraction {summary['host_busy_fraction']:.3f}, "
        f"seconds_per_step {summary['seconds_per_step']:.3f}",
    ]
    text = "\n".join(lines)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "loop_trace.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
