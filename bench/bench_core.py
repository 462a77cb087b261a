"""Core benchmarks of the namespace backend, each against a baseline measured in the same run.

    python bench/bench_core.py [--runs N] [--concurrent 50] [--json out.json]

Prints medians and ratios:
  1. SDK create + first exec + destroy  vs  raw `bwrap ... python3 -S -c pass`  (goal <= 2x)
  2. warm exec round trip of `true`     vs  plain subprocess `true`            (goal < 2 ms)
  3. CLI `stockade run --rm -- true`    vs  plain `python3 -c pass`            (goal < 150 ms)
  4. idle memory per sandbox (PSS of its processes)
  5. N concurrent sandboxes alive at once (time to start all, total and per-sandbox PSS)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import anyio
from _common import RAW_BWRAP, median_ms, sdk_lifecycle, time_cmd, warm_exec

from stockade import AsyncSandbox


def pss_kib(pid: int) -> int:
    """PSS of a process and all its descendants (KiB)."""
    total = 0
    pids = [pid]
    while pids:
        p = pids.pop()
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
            pids += [int(c) for c in children]
        except OSError:
            continue
    return total


async def concurrent(project: Path, count: int) -> tuple[float, list[int]]:
    sandboxes: list[AsyncSandbox] = []
    t = time.perf_counter()
    try:
        async with anyio.create_task_group() as tg:

            async def one() -> None:
                sandboxes.append(
                    await AsyncSandbox.create(project_dir=project, backend="namespace")
                )

            for _ in range(count):
                tg.start_soon(one)
        elapsed = time.perf_counter() - t
        for sb in sandboxes:
            assert (await sb.commands.run(["true"])).exit_code == 0
        pss = [pss_kib(sb._launched.process.pid) for sb in sandboxes]  # type: ignore[union-attr]
        return elapsed, pss
    finally:
        with anyio.CancelScope(shield=True):
            for sb in sandboxes:
                await sb.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--concurrent", type=int, default=50)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="stockade-bench-"))
    os.environ.setdefault("STOCKADE_STATE_DIR", str(work / "state"))
    project = work / "project"
    project.mkdir()
    (project / "README.md").write_text("bench\n")

    rows: list[tuple[str, float, str, float, str]] = []
    runs = args.runs

    raw = time_cmd(RAW_BWRAP, runs)
    sdk = anyio.run(partial(sdk_lifecycle, project, runs, backend="namespace"))
    rows.append(
        ("SDK create+exec+destroy", median_ms(sdk), "raw bwrap python3 -S -c pass",
         median_ms(raw), "<= 2x")
    )  # fmt: skip

    plain_true = time_cmd(["true"], runs)
    warm = anyio.run(partial(warm_exec, project, runs * 3, backend="namespace"))
    rows.append(
        ("warm exec `true`", median_ms(warm), "subprocess `true`", median_ms(plain_true), "< 2 ms")
    )

    # An installed package has its bytecode compiled (pip does it); an editable checkout run
    # with PYTHONDONTWRITEBYTECODE would recompile every module on each CLI call instead.
    import compileall

    import stockade

    compileall.compile_dir(Path(stockade.__file__).parent, quiet=1)
    env = {**os.environ}
    stockade_bin = str(Path(sys.executable).with_name("stockade"))
    py_pass = time_cmd([sys.executable, "-c", "pass"], runs)
    cli = time_cmd([stockade_bin, "run", "--rm", "--backend", "namespace", "--", "true"], runs,
                   cwd=project, env=env)  # fmt: skip
    rows.append(("CLI run --rm -- true", median_ms(cli), "python3 -c pass", median_ms(py_pass),
                 "< 150 ms"))  # fmt: skip

    elapsed, pss = anyio.run(concurrent, project, args.concurrent)
    idle = statistics.median(pss) / 1024

    from rich.console import Console
    from rich.table import Table

    table = Table("measurement", "stockade (median)", "baseline", "baseline (median)", "ratio",
                  "goal", title=f"stockade core bench ({runs} runs each)")  # fmt: skip
    results = []
    for name, ours, base_name, base, goal in rows:
        ratio = ours / base if base else float("nan")
        table.add_row(name, f"{ours:.1f} ms", base_name, f"{base:.1f} ms", f"{ratio:.2f}x", goal)
        results.append({"name": name, "median_ms": ours, "baseline": base_name,
                        "baseline_ms": base, "ratio": ratio, "goal": goal})  # fmt: skip
    Console().print(table)
    print(
        f"{args.concurrent} concurrent sandboxes: all started in {elapsed:.2f} s; "
        f"idle PSS per sandbox median {idle:.1f} MiB (total {sum(pss) / 1024:.0f} MiB)"
    )
    if args.json:
        args.json.write_text(json.dumps({"rows": results, "concurrent": {
            "count": args.concurrent, "start_all_s": elapsed, "idle_pss_mib_median": idle}},
            indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
