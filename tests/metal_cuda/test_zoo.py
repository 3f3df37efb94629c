"""CI: the zoo's coverage and its tables (zoo.py), from synthetic bench_peers rows: no GPU."""

from .zoo import ZOO, zoo_compare, zoo_rows, zoo_table


def _row(model, B, S, ours, mlx=None, ggml=None, splits=4):
    r = {"model": model, "B": B, "S": S, "dtype": "fp16", "options": [], "ours_us": ours, "splits": splits,
         "ours_dense_us": ours}
    peers = [p for p in (mlx, ggml) if p is not None]
    if mlx is not None:
        r["mlx_launch_us"] = r["mlx_best_us"] = mlx
    if ggml is not None:
        r["ggml_us"] = ggml
    if peers:
        r["x_best_peer"] = r["x_best_peer_dense"] = min(peers) / ours
    return r


def test_zoo_covers_the_gqa_factors_issue_19_names():
    factors = {H // Hkv for H, Hkv, _, _ in ZOO.values()}
    assert {1, 2, 3, 4, 5, 6, 7, 8, 12, 16} <= factors
    shapes = zoo_rows()
    assert len(shapes) == len(set(shapes))
    assert {S for _, _, S, _ in shapes} == {256, 1000, 4096, 32768, 131072}


def test_table_counts_losing_rows_and_rows_without_a_peer():
    rows = [_row("A", 1, 256, 10.0, mlx=8.0, ggml=20.0), _row("A", 8, 4096, 100.0, mlx=150.0),
            _row("B", 1, 256, 5.0)]
    text = zoo_table(rows)
    assert sum(line.startswith("| ") for line in text.splitlines()) == 4  # the header and 3 rows
    assert "x best peer: geometric mean 1.10, minimum 0.80, 1 of 2 rows >= 1.0" in text  # sqrt(0.8 x 1.5)
    assert "x llama.cpp: geometric mean 2.00, minimum 2.00, 1 of 1 rows >= 1.0" in text
    assert "| B | 1 | 256 | fp16 | 5.0 (4) | 5.0 | - | - | - | - | - | - | - |" in text


def test_compare_pairs_the_same_shapes_only():
    base = [_row("A", 1, 256, 10.0, mlx=9.0), _row("A", 8, 4096, 100.0, mlx=120.0), _row("C", 1, 256, 1.0)]
    other = [_row("A", 8, 4096, 80.0, mlx=120.0), _row("A", 1, 256, 12.5, mlx=9.0)]
    text = zoo_compare(base, other)
    assert "| A | 1 | 256 | fp16 | 10.0 (4) | 12.5 (4) | 1.250 | 0.90 | 0.72 |" in text
    assert "time other / base: geometric mean 1.000, 0.800-1.250 over 2 rows" in text
    assert "x best peer, other: geometric mean 1.04, minimum 0.72, 1 of 2 rows >= 1.0" in text  # sqrt(1.5 x 0.72)
    assert text.endswith("shapes in one run only: 1")
