"""The benchmark: analytic counts by hand, KV bytes against the formula, report contents."""

import json

import pytest
import torch

import ivcp
from ivcp import analytic, bench
from ivcp.cli import main

from conftest import get_model

TOY = analytic.TextArch(hidden=4, intermediate=8, layers=2, heads=2, kv_heads=1, head_dim=2, vocab=10)


def test_llm_prefill_flops_by_hand():
    # per token: 2 * (4*2*2 [q] + 2*4*1*2 [k, v] + 2*2*4 [o] + 3*4*8 [mlp]) = 2 * (16 + 16 + 16 + 96) = 288
    assert TOY.linear_per_token == 288
    # layer 0, 3 tokens: 3*288 + 4*2*2 * (3*4/2) = 864 + 96 = 960
    # layer 1, 2 tokens: 2*288 + 16 * (2*3/2) = 576 + 48 = 624;  LM head on one token: 2*4*10 = 80
    assert analytic.llm_prefill_flops(TOY, [3, 2]) == 960 + 624 + 80
    # decoding with caches of 4 and 3 entries: 288 + 16*4 + 288 + 16*3 + 80
    assert analytic.llm_decode_flops(TOY, [4, 3]) == 288 + 64 + 288 + 48 + 80


def test_kv_and_decode_bytes_by_hand():
    # 2 (K, V) * 1 head * 2 dims * 2 bytes * (5 + 3) tokens = 64
    assert analytic.kv_bytes(TOY, [5, 3], 2) == 64
    # weights: 2 layers * 144 + 4 * 10 = 328 values
    assert TOY.weight_count == 328
    assert analytic.decode_bytes(TOY, [5, 3], 2) == 328 * 2 + 64


def test_vision_flops_by_hand():
    toy = analytic.VisionArch(depth=2, dim=2, intermediate=3, gated=True, full_attention_blocks=(1,),
                              window_merged=1, merge=2, out_dim=5)
    # one image of 4 x 4 patches (16 patches, 4 merged tokens); windows of 1 merged token = 4 patches
    assert analytic.window_spans(4, 4, 1, 2) == [4, 4, 4, 4]
    linear = 2 * 16 * 4 * 2 * 2  # qkv + proj: 2 * P * 4 * D^2 = 512
    mlp = 3 * 2 * 16 * 2 * 3  # gated: 576
    window_attention = 4 * 2 * (4 * 4 ** 2)  # block 0: 4 windows of 4 patches = 512
    full_attention = 4 * 2 * 16 ** 2  # block 1: one frame of 16 patches = 2048
    merger = 2 * 4 * (8 * 8 + 8 * 5)  # 4 merged tokens: 4D x 4D then 4D x out = 832
    assert analytic.vision_flops(toy, [(1, 4, 4)]) == 2 * (linear + mlp) + window_attention + full_attention + merger


def test_smart_resize_matches_the_rule():
    assert bench.smart_resize(336, 448) == (336, 448)
    assert bench.smart_resize(300, 400) == (308, 392)  # rounded to multiples of 28
    h, w = bench.smart_resize(20000, 20000)
    assert h * w <= 16384 * 28 * 28 and h % 28 == 0 and w % 28 == 0


@pytest.fixture(scope="module")
def tiny_report():
    model, _ = get_model("qwen2_5_vl")
    cases = bench.plan(["vanilla", "fastv", "ivc_prune", "pdrop", "vscan"], [0.25, 0.5], [(168, 224)])
    cases = bench.run(model, cases, repeats=2, warmup=1, new_tokens=4, log=lambda *_: None)
    return model, bench.summarise(model, cases)


def test_kv_bytes_equal_the_formula_for_every_policy(tiny_report):
    model, rows = tiny_report
    text = model.config.text_config
    per_token = 2 * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads) * 4  # float32
    by_label = {r["label"]: r for r in rows}
    n = by_label["vanilla"]["seq_len"]
    assert by_label["vanilla"]["kv_bytes"] == 4 * n * per_token
    # FastV at K = 2 keeps 12 of 48 (0.25): layers 0-1 full, 2-3 cut
    assert by_label["fastv(keep_ratio=0.25)"]["kv_bytes"] == (2 * n + 2 * (n - 36)) * per_token
    # IVC-Prune cuts every layer: 24 of 48 kept (0.5)
    assert by_label["ivc_prune(keep_ratio=0.5)"]["kv_bytes"] == 4 * (n - 24) * per_token
    for row in rows:
        assert row["kv_bytes"] == row["kv_bytes_analytic"] == sum(row["kv_bytes_per_layer"])


def test_report_lists_every_case_with_medians_of_the_repeats(tiny_report, tmp_path):
    model, rows = tiny_report
    assert [r["label"] for r in rows] == ["vanilla", "fastv(keep_ratio=0.25)", "fastv(keep_ratio=0.5)",
                                          "ivc_prune(keep_ratio=0.25)", "ivc_prune(keep_ratio=0.5)", "pdrop", "vscan"]
    for row in rows:
        for key in ("prefill_ms", "decode_ms_per_token", "total_ms", "selection_ms"):
            samples = row[key]["samples"]
            assert len(samples) == 2
            assert row[key]["median"] == pytest.approx(sum(samples) / 2)  # the median of two
            assert row[key]["min"] == min(samples) and row[key]["max"] == max(samples)
        assert row["ideal_prefill_speedup"] >= 1.0 or row["method"] == "vanilla"
    assert rows[0]["ideal_prefill_speedup"] == 1.0
    report = bench.report_for("tiny", model, rows, {"repeats": 2, "warmup": 1, "new_tokens": 4, "prompt_tokens": 32},
                              "test")
    paths = bench.write(report, tmp_path)
    table = paths["markdown"].read_text()
    assert all(f"| {r['label']} |" in table for r in rows)
    assert json.loads(paths["json"].read_text())["rows"][0]["label"] == "vanilla"


def test_cli_bench_runs_and_rejects_bad_input(tmp_path, capsys):
    assert main(["bench", "--model", "tiny", "--methods", "vanilla,ivc_prune", "--repeats", "1", "--warmup", "0",
                 "--new-tokens", "2", "--image-sizes", "224x168", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "bench.md").is_file() and (tmp_path / "bench.json").is_file()
    assert main(["bench", "--model", "tiny", "--methods", "vanilla,nope", "--out", str(tmp_path)]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main(["bench", "--model", "llama_70b", "--out", str(tmp_path)]) == 2
    assert "unknown model 'llama_70b'" in capsys.readouterr().err


@pytest.mark.parametrize("name,low,high,layers", [
    ("qwen2_5_vl_7b", 8.0e9, 8.6e9, 28),  # Qwen2.5-VL-7B has about 8.3 B parameters
    ("llava_1_5_7b", 6.9e9, 7.2e9, 32),  # LLaVA-1.5-7B: 7.06 B
    ("qwen3_vl_8b", 8.7e9, 8.85e9, 36),  # Qwen3-VL-8B: 8.77 B
    ("qwen3_vl_30b_a3b", 30.9e9, 31.2e9, 48),  # Qwen3-VL-30B-A3B: 31.07 B in all
    ("internvl2_5_8b", 8.0e9, 8.2e9, 32),  # InternVL2.5-8B: 8.08 B
])
def test_bundled_architectures_build_on_meta(name, low, high, layers):
    # the layouts build without memory on the meta device, with the public sizes
    model = bench.random_model(name, device="meta", dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    assert low < params < high
    assert model.config.text_config.num_hidden_layers == layers


def test_vit_flops_by_hand():
    # 3 tokens of width 2, MLP 4, one block: 2*3*4*2*2 (qkv + out) + 2*3*2*2*4 (MLP) + 4*2*3*3 (attention)
    assert analytic.vit_flops(3, 2, 4, 1) == 96 + 96 + 72


def test_llava_synthetic_inputs_and_bench_rows():
    model, _ = get_model("llava")
    inputs = bench.synthetic_inputs(model, (999, 999), prompt_tokens=5, system_tokens=3)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 64  # the tower's fixed 8 x 8 grid
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 112, 112)
    cases = bench.run(model, bench.plan(["vanilla", "fastv"], None, [(112, 112)]), repeats=1, warmup=0, new_tokens=2,
                      log=lambda *_: None)
    rows = bench.summarise(model, cases)
    assert [r["n_visual_kept"] for r in rows] == [64, 16]  # FastV keeps 25 % on LLaVA
    assert all(r["kv_bytes"] == r["kv_bytes_analytic"] for r in rows)
    v = model.config.vision_config  # 65 tokens (CLS included), width 32, MLP 64, 3 blocks; projector 64 tokens
    assert rows[0]["flops_vision"] == analytic.vit_flops(65, 32, 64, 3) + 2 * 64 * (v.hidden_size * 64 + 64 * 64)


def test_moe_counts_its_active_experts():
    model = bench.random_model("qwen3_vl_30b_a3b", device="meta")
    arch = analytic.TextArch.from_config(model.config)
    assert arch.intermediate == 8 * 768  # top-8 experts of width 768 run per token
    # attention (q 2048x4096, k and v 2048x512 each, o 4096x2048) + 3 matrices of the active experts, per layer,
    # 48 layers, + the LM head: about 3.3 B weights read per token ("A3B")
    assert 3.0e9 < arch.weight_count < 3.6e9


def test_qwen3_synthetic_inputs_and_vision_flops():
    model, _ = get_model("qwen3_vl")
    inputs = bench.synthetic_inputs(model, (160, 224), prompt_tokens=4, system_tokens=3)
    assert inputs["image_grid_thw"].tolist() == [[1, 10, 14]] and int(inputs["mm_token_type_ids"].sum()) == 35
    v = model.config.vision_config  # 140 patches of width 32, MLP 64, 3 blocks of full attention, 1 + 3 mergers
    per_block = 2 * 140 * 4 * 32 * 32 + 2 * 2 * 140 * 32 * 64 + 4 * 32 * 140 ** 2
    merger = 2 * 35 * (128 * 128 + 128 * v.out_hidden_size)
    assert ivcp.adapters.adapter_for(model).vision_flops(inputs) == 3 * per_block + 4 * merger


def test_internvl_synthetic_inputs_tile_like_the_processor():
    model, _ = get_model("internvl")
    inputs = bench.synthetic_inputs(model, (90, 200), prompt_tokens=4, system_tokens=3)
    assert tuple(inputs["pixel_values"].shape) == (3, 3, 64, 64)  # 2 x 1 tiles + the thumbnail
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 48
    segments = ivcp.adapters.adapter_for(model).segments(inputs["input_ids"][0], image_sizes=inputs["image_sizes"])
    assert [s.layout for s in segments] == [(1, 2)] * 3
    # 3 tiles of 64 patches + CLS, width 32, MLP 64, 3 blocks; projector 16 tokens
    expected = 3 * (analytic.vit_flops(65, 32, 64, 3) + 2 * 16 * (4 * 32 * 64 + 64 * 64))
    assert ivcp.adapters.adapter_for(model).vision_flops(inputs) == expected


def test_synthetic_batches_have_rows_of_one_length():
    model, _ = get_model("qwen2_5_vl")
    batch = bench.synthetic_batch(model, (168, 224), 3, prompt_tokens=7)
    assert batch["input_ids"].shape[0] == 3 and bool(batch["attention_mask"].all())
    assert batch["image_grid_thw"].tolist() == [[1, 12, 16]] * 3
    assert not torch.equal(batch["input_ids"][0], batch["input_ids"][1])  # each row its own text


@pytest.fixture(scope="module")
def batch_report():
    model, _ = get_model("qwen2_5_vl")
    cases = bench.plan(["vanilla", "ivc_prune", "fastv"], None, [(168, 224)], batch_sizes=[1, 3])
    cases = bench.run(model, cases, repeats=2, warmup=0, new_tokens=3, log=lambda *_: None)
    return model, bench.summarise(model, cases)


def test_throughput_rows_per_batch_size(batch_report):
    model, rows = batch_report
    by = {(r["label"], r["batch"]): r for r in rows}
    assert set(by) == {(m, b) for m in ("vanilla", "ivc_prune", "fastv") for b in (1, 3)}
    text = model.config.text_config
    per_token = 2 * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads) * 4  # float32
    n = by[("vanilla", 1)]["seq_len"]
    for label in ("vanilla", "ivc_prune", "fastv"):
        single, triple = by[(label, 1)], by[(label, 3)]
        assert triple["kv_bytes"] == 3 * single["kv_bytes"] == triple["kv_bytes_analytic"]  # rows of one length
        for r in (single, triple):
            samples = r["tokens_per_s"]["samples"]
            assert r["tokens_per_s"]["median"] == pytest.approx(sum(samples) / 2)
            totals = r["total_ms"]["samples"]
            assert sorted(samples) == pytest.approx(sorted(r["batch"] * 3 / (t / 1e3) for t in totals))
    # IVC-Prune keeps 24 of 48 in every layer: each sequence ends with (n − 24 + 3) entries per layer
    assert by[("ivc_prune", 3)]["kv_bytes_per_sequence_final"] == 4 * (n - 24 + 3) * per_token
    assert by[("vanilla", 3)]["kv_bytes_per_sequence_final"] == 4 * (n + 3) * per_token
    # the ideal ratio is the FLOPs ratio of whole generate() runs, batch-independent for rows alike
    arch = analytic.TextArch.from_config(model.config)
    def generate_flops(cached, processed):  # one sequence: vision + prefill + 2 decoding steps
        return analytic.llm_prefill_flops(arch, processed) + sum(
            analytic.llm_decode_flops(arch, [c + 1 + t for c in cached]) for t in range(2))
    vision = by[("vanilla", 1)]["flops_vision"]
    ivc = generate_flops([n - 24] * 4, [n, n, n - 24, n - 24])
    assert by[("ivc_prune", 3)]["flops_generate"] == 3 * (vision + ivc)
    assert by[("ivc_prune", 3)]["ideal_throughput_ratio"] == pytest.approx(
        (vision + generate_flops([n] * 4, [n] * 4)) / (vision + ivc))
    assert by[("vanilla", 3)]["measured_throughput_ratio"] == 1.0


def test_capacity_analytic_and_fitted():
    rows = [dict(label="vanilla", method="vanilla", image_size=[1, 1], batch=b, kv_bytes_per_sequence_final=10,
                 peak_memory_bytes=6 + 4 * b) for b in (1, 2, 4)]
    rows += [dict(label="ivc_prune", method="ivc_prune", image_size=[1, 1], batch=b, kv_bytes_per_sequence_final=4,
                  peak_memory_bytes=6 + 2 * b) for b in (1, 2, 4)]
    out = {c["label"]: c for c in bench.capacity(rows, weights=6, memory_budget_bytes=50)}
    assert out["vanilla"]["max_batch_analytic"] == 4 and out["ivc_prune"]["max_batch_analytic"] == 11  # 44 // 10, 44 // 4
    assert out["vanilla"]["max_batch_measured"] == 11 and out["ivc_prune"]["max_batch_measured"] == 22  # (50 − 6) / slope
    assert out["ivc_prune"]["analytic_vs_vanilla"] == pytest.approx(11 / 4)
    assert out["ivc_prune"]["measured_vs_vanilla"] == pytest.approx(2.0)
    cpu = [dict(r, peak_memory_bytes=None) for r in rows]
    assert all(c["max_batch_measured"] is None for c in bench.capacity(cpu, 6, 50))


def test_cli_bench_batch_sizes(tmp_path):
    assert main(["bench", "--model", "tiny", "--methods", "vanilla,ivc_prune", "--repeats", "1", "--warmup", "0",
                 "--new-tokens", "2", "--image-sizes", "224x168", "--batch-sizes", "1,2", "--memory-budget-gb", "1",
                 "--out", str(tmp_path)]) == 0
    table = (tmp_path / "bench.md").read_text()
    assert "## Throughput by batch size" in table and "## Sequences that fit in 1 GiB" in table
    assert (tmp_path / "bench.png").stat().st_size > 0  # throughput against the batch size
    report = json.loads((tmp_path / "bench.json").read_text())
    assert sorted({r["batch"] for r in report["rows"]}) == [1, 2]
    assert [c["label"] for c in report["capacity"]] == ["vanilla", "ivc_prune"]
    for bad in ("0,2", "2,2", "x"):
        with pytest.raises(SystemExit) as exit_info:
            main(["bench", "--model", "tiny", "--batch-sizes", bad, "--out", str(tmp_path)])
        assert exit_info.value.code == 2
