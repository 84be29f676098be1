"""Connected components of the duplicate-link graph, sharded by node: no process holds the graph.

The links (kept key, duplicate key) of the bucket shards form an undirected graph whose components
are the duplicate clusters; each cluster keeps its smallest key. A union-find over all links needs
the whole graph in one memory; here the graph is split into ``parts`` partitions by a hash of the
node, partition p holding both directions (u, v) and (v, u) of every edge whose u it owns, and the
components come from alternating two local rewrites of the edges (Kiveris et al., "Connected
Components in MapReduce and Beyond", SoCC 2014), each a task per partition whose output edges are
sent on to the partitions that own them:

- large star: a node u links every larger neighbour v to m(u) = min(u, its neighbours);
- small star: a node u links each smaller neighbour v, and itself, to m(u) = its smallest neighbour.

Both keep the components and only ever move edges towards smaller keys; after O(log^2 n) rounds
every component is a star around its smallest key. A partition sees that locally: none of its nodes
has a smaller neighbour and another neighbour too. Then the star leaves are the keys to remove, and a
centre's degree + 1 its cluster's size.

The rounds run through ``submit(fn, num_returns, *args)`` / ``fetch(values)``: Ray tasks in the data
pipeline (``ray_runner``), plain calls in ``components_in_process``.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

NO_EDGES = np.zeros((0, 2), np.int64)
MAX_ROUNDS = 200  # O(log^2 n) are needed: 200 is far beyond any real corpus


def partition_of(keys: np.ndarray, parts: int) -> np.ndarray:
    """The partition owning each key: a multiplicative hash, so runs of nearby keys spread out."""
    mixed = np.ascontiguousarray(keys, dtype=np.int64).view(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return ((mixed >> np.uint64(32)) % np.uint64(parts)).astype(np.int64)


def split_edges(edges: np.ndarray, parts: int) -> list[np.ndarray]:
    """Both directions of each undirected edge (self-loops dropped), row (u, v) to u's partition."""
    edges = edges[edges[:, 0] != edges[:, 1]]
    both = np.concatenate([edges, edges[:, ::-1]])
    owner = partition_of(both[:, 0], parts)
    return [both[owner == p] for p in range(parts)]


def split_links(links: dict[str, np.ndarray], parts: int) -> list:
    """One bucket shard's links -> its edges for each partition, then its counts. Within a shard the
    exact links hang each copy on the group's first key, and an exact hash lives in one shard only,
    so the exact links count the exact duplicates removed."""
    counts = {"exact_links": len(links["exact"]), "near_links": len(links["near"]),
              "exact_removed": len(np.unique(links["exact"][:, 1]))}
    return split_edges(np.concatenate([links["exact"], links["near"]]), parts) + [counts]


def _gather(incoming: tuple[np.ndarray, ...]) -> np.ndarray:
    edges = [e for e in incoming if len(e)]
    return np.unique(np.concatenate(edges), axis=0) if edges else NO_EDGES  # sorted by (u, v)


def _is_star_forest(edges: np.ndarray) -> bool:
    """No node of the partition has both a smaller neighbour and a second neighbour."""
    if not len(edges):
        return True
    nodes, degree = np.unique(edges[:, 0], return_counts=True)
    has_smaller = np.isin(nodes, edges[edges[:, 1] < edges[:, 0], 0])
    return not np.any(has_smaller & (degree > 1))


def _large_star(edges: np.ndarray) -> np.ndarray:
    u, v = edges[:, 0], edges[:, 1]
    nodes, first, inverse = np.unique(u, return_index=True, return_inverse=True)
    smallest = np.minimum(nodes, v[first])[inverse]  # rows are sorted by (u, v): v[first] is the min
    larger = v > u
    return np.stack([v[larger], smallest[larger]], axis=1)


def _small_star(edges: np.ndarray) -> np.ndarray:
    edges = edges[edges[:, 1] < edges[:, 0]]
    if not len(edges):
        return NO_EDGES
    u, v = edges[:, 0], edges[:, 1]
    nodes, first, inverse = np.unique(u, return_index=True, return_inverse=True)
    smallest = v[first]
    moved = np.stack([v, smallest[inverse]], axis=1)
    return np.concatenate([moved[moved[:, 0] != moved[:, 1]], np.stack([nodes, smallest], axis=1)])


def star_round(rewrite: str, parts: int, *incoming: np.ndarray) -> list:
    """One partition's round: [is its input already a star forest, then its edges for each partition]."""
    edges = _gather(incoming)
    out = _large_star(edges) if rewrite == "large" else _small_star(edges)
    return [_is_star_forest(edges)] + split_edges(out, parts)


def star_leaves(*incoming: np.ndarray) -> tuple[np.ndarray, Counter]:
    """On the converged graph: (the partition's leaves, sorted; cluster sizes of its centres)."""
    edges = _gather(incoming)
    leaves = np.unique(edges[edges[:, 1] < edges[:, 0], 0])
    centre_edges = edges[edges[:, 1] > edges[:, 0], 0]
    _, degree = np.unique(centre_edges, return_counts=True)
    return leaves, Counter((degree + 1).tolist())


def duplicate_clusters(link_parts: list, parts: int, submit, fetch) -> tuple[np.ndarray, dict]:
    """(sorted keys to remove, stats) from the bucket shards' links (values or references)."""
    split = [submit(split_links, parts + 1, links, parts) for links in link_parts]
    counts = fetch([s[parts] for s in split])
    inbox = [[s[p] for s in split] for p in range(parts)]  # inbox[p]: partition p's incoming edges
    for round_index in range(MAX_ROUNDS):
        rewrite = "large" if round_index % 2 == 0 else "small"
        results = [submit(star_round, parts + 1, rewrite, parts, *inbox[p]) for p in range(parts)]
        if all(fetch([r[0] for r in results])):  # this round's input was already converged
            break
        inbox = [[r[1 + p] for r in results] for p in range(parts)]
    else:
        raise RuntimeError(f"duplicate clusters: not converged after {MAX_ROUNDS} rounds")
    finished = fetch([submit(star_leaves, 1, *inbox[p]) for p in range(parts)])
    removed = np.sort(np.concatenate([leaves for leaves, _ in finished] + [np.zeros(0, np.int64)]))
    sizes: Counter = Counter()
    for _, part_sizes in finished:
        sizes.update(part_sizes)
    exact_removed = sum(c["exact_removed"] for c in counts)
    stats = {
        "exact_duplicates_removed": exact_removed,
        "near_duplicates_removed": len(removed) - exact_removed,
        "clusters": sum(sizes.values()),
        "cluster_sizes": {str(size): n for size, n in sorted(sizes.items())},
        "largest_cluster": max(sizes, default=0),
        "candidate_links": {"exact": sum(c["exact_links"] for c in counts),
                            "near": sum(c["near_links"] for c in counts)},
        "component_rounds": round_index,
    }
    return removed, stats


def components_in_process(link_parts: list[dict], parts: int) -> tuple[np.ndarray, dict]:
    """The same rounds as plain calls: for tests and small inputs."""
    return duplicate_clusters(link_parts, parts, submit=lambda fn, _n, *args: fn(*args), fetch=list)


def ray_runner(**options):
    """``submit`` / ``fetch`` over Ray tasks (``options``: e.g. placement resources)."""
    import ray

    tasks: dict = {}

    def submit(fn, num_returns, *args):
        if fn not in tasks:
            tasks[fn] = ray.remote(fn)
        return tasks[fn].options(num_returns=num_returns, **options).remote(*args)

    def fetch(refs):
        return ray.get(list(refs), timeout=3600)

    return submit, fetch
