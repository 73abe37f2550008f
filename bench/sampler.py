"""Sampler cost vs graph size: the same 64-seed, 2-hop sample on a 10k- and a 1M-customer graph.

    python -m bench.sampler [--sizes 10000,1000000] [--calls 50]

The claim under test: the cost follows the sampled subgraph, not the graph (binary searches over CSR
rows are O(log E); nothing scans a node or edge table).
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from bench.common import summary_ms, write
from service.data.synthetic import generate
from service.graph.sampler import sample
from service.graph.temporal import build_graph


def run(sizes: list[int], calls: int, batch: int, fanouts: tuple[int, ...]) -> dict[str, object]:
    torch.set_num_threads(1)  # as the server runs (ONEPASS_TORCH_THREADS=1)
    rows = []
    for n in sizes:
        t0 = time.perf_counter()
        db = generate(n, 0)
        t_gen = time.perf_counter() - t0
        graph = build_graph(db)
        t_build = time.perf_counter() - t0 - t_gen
        rng = np.random.default_rng(0)
        n_cust = graph.nodes["customers"].num_nodes
        seeds = [torch.from_numpy(np.unique(rng.choice(n_cust, batch, replace=False))) for _ in range(calls)]
        for s in seeds[:5]:
            sample(graph, s, graph.max_time, fanouts)  # warm-up
        times, nodes, edges = [], [], []
        for s in seeds:
            t = time.perf_counter()
            sub = sample(graph, s, graph.max_time, fanouts)
            times.append(time.perf_counter() - t)
            nodes.append(sub.num_nodes())
            edges.append(sub.num_edges())
        row = {
            "customers": n,
            "transactions": len(db.transactions),
            "graph_edges": sum(e.num_edges for e in graph.edges.values()),
            "graph_bytes": graph.num_bytes(),
            "generate_s": t_gen,
            "build_s": t_build,
            "sampled_nodes_mean": float(np.mean(nodes)),
            "sampled_edges_mean": float(np.mean(edges)),
            **summary_ms(times),
            "us_per_sampled_edge": float(np.mean(times) / np.mean(edges) * 1e6),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        print(row, flush=True)
        rows.append(row)
        del db, graph
    return {"batch": batch, "fanouts": list(fanouts), "calls": calls, "rows": rows}


def markdown(res: dict[str, object]) -> str:
    rows = res["rows"]
    assert isinstance(rows, list)
    lines = [
        "# Sampler: cost vs graph size",
        "",
        f"{res['batch']} seed customers, fan-outs {res['fanouts']}, {res['calls']} calls per size, one process.",
        "",
        "| customers | transactions | graph edges | sampled nodes | sampled edges | mean ms | p50 ms | p99 ms "
        "| µs / sampled edge |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['customers']:,} | {r['transactions']:,} | {r['graph_edges']:,} | {r['sampled_nodes_mean']:.0f} | "
            f"{r['sampled_edges_mean']:.0f} | {r['mean_ms']:.2f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{r['us_per_sampled_edge']:.2f} |"
        )
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        lines += ["", f"Graph {b['graph_edges'] / a['graph_edges']:.0f}x larger; median sample time ratio "
                      f"{b['p50_ms'] / a['p50_ms']:.2f}x for a subgraph ratio of "
                      f"{b['sampled_edges_mean'] / a['sampled_edges_mean']:.2f}x. The median is the figure to "
                      "compare: the machine is shared, and preempted calls inflate the mean and p99."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="10000,1000000")
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()
    res = run([int(x) for x in args.sizes.split(",")], args.calls, args.batch, (20, 10))
    write("sampler", res, markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
