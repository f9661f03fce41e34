"""`inhouse bench` merging its rounds (the benchmark itself never runs in the test suite)."""


def test_bench_keeps_each_configurations_best_run():
    from inhouse.bench import best_of

    runs = [{"name": "x", "decode_tok_s": 80.0, "prefill_tok_s": 300.0, "ttft_s": 2.0, "peak_rss_mb": 600.0},
            {"name": "x", "error": "crashed"},
            {"name": "x", "decode_tok_s": 95.0, "prefill_tok_s": 280.0, "ttft_s": 2.5, "peak_rss_mb": 610.0}]
    best = best_of(runs)
    assert (best["decode_tok_s"], best["prefill_tok_s"], best["ttft_s"], best["peak_rss_mb"]) == (95.0, 300.0, 2.0, 610.0)
    assert best["runs"] == 2 and "error" not in best
    assert best_of([{"name": "x", "error": "crashed"}])["error"] == "crashed"
