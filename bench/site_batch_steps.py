"""Where ``site_batch``'s time goes: bench/deid.py's corpus through the whole flow on two local
Dask workers, the plain function behind each step timed, medians over rounds after a warm-up.

    .venv/bin/python bench/site_batch_steps.py [--rounds 3] [--out bench/out]

What the steps do not add up to is Prefect's per-task orchestration and the flow's wiring.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = {  # module: functions site_batch calls through it
    "flows.site_batch": ["work_units", "read_batch", "contact_sheet"],
    "tasks.qc": ["evaluate_qc"],
    "tasks.clinical": ["join_clinical"],
    "tasks.dedupe": ["find_duplicates"],
    "tasks.catalog": ["decide", "assemble_catalog"],
    "tasks.verify": ["scan_table", "scan_report"],
    "tasks.publish": ["publish_batch", "refresh_catalog_db"],
}


def time_steps(spent: dict[str, float]) -> None:
    """Wrap each step's function where site_batch looks it up, adding its seconds to ``spent``."""
    import importlib

    for module_name, names in STEPS.items():
        module = importlib.import_module(module_name)
        for name in names:
            function = getattr(module, name)

            @functools.wraps(function)
            def timed(*args, _function=function, _name=name, **kwargs):
                start = time.perf_counter()
                try:
                    return _function(*args, **kwargs)
                finally:
                    spent[_name] += time.perf_counter() - start

            setattr(module, name, timed)


def main() -> None:
    from bench.deid import build_corpus, time_site_batch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ["RADREPO_SECRET"] = "benchmark-secret-0001"
    corpus = build_corpus(args.out)
    from prefect.testing.utilities import prefect_test_harness

    from flows.cluster import local_cluster

    spent: dict[str, float] = defaultdict(float)
    time_steps(spent)
    rounds: list[dict[str, float]] = []
    from flows.site_batch import without_heartbeat

    with prefect_test_harness(server_startup_timeout=120), local_cluster(2) as cluster, \
            without_heartbeat():  # as the nightly flow runs site_batch
        for n in range(args.rounds + 1):
            spent.clear()
            total = time_site_batch(corpus, args.out / "scratch", cluster.scheduler_address)
            if n:  # the first round warms up
                rounds.append({**spent, "site_batch (whole flow)": total})
    lines = [f"site_batch on {len(list(corpus.glob('*.dcm')))} files, 2 workers, "
             f"{args.rounds} rounds, medians", "", "| step | median s |", "| --- | ---: |"]
    for name in rounds[0]:
        lines.append(f"| {name} | {statistics.median(r[name] for r in rounds):.2f} |")
    steps = statistics.median(sum(v for k, v in r.items() if k != "site_batch (whole flow)")
                             for r in rounds)
    lines.append(f"| steps together | {steps:.2f} |")
    text = "\n".join(lines)
    (args.out / "site-batch-steps.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
