"""benchmarks/roofline.py on a tiny layer: the launches it records and the bytes and FLOPs it gives them."""

import json

from benchmarks import roofline

T, K, N = 24, 16, 40  # tokens, in, out features


def test_records_switchback_launches_with_their_traffic():
    launches = roofline.record_layer(T, K, N, roofline.SwitchBackConfig())
    gemms = [op for op in launches if op["name"] == "int8_matmul_dequant"]
    # forward x @ w.T and grad_input g @ w, each 2 T K N int8 ops
    assert [op["flops"] for op in gemms] == [2 * T * K * N, 2 * T * N * K]
    assert all(op["kind"] == "int8" for op in gemms)
    # forward: int8 x and w, fp32 row and tensor scales, bf16 bias in; bf16 out
    assert gemms[0]["bytes"] == T * K + K * N + 4 * T + 4 + 2 * N + 2 * T * N
    # grad_weight stays a bf16 matmul
    assert [op["flops"] for op in launches if op["name"] == "mm"] == [2 * N * T * K]


def test_nn_linear_is_three_matmuls_and_a_bias_sum():
    names = sorted(op["name"] for op in roofline.record_layer(T, K, N, None))
    assert names == ["addmm", "mm", "mm", "sum"]


def test_optimizer_step_launches_do_not_depend_on_the_tensor_count():
    launches = roofline.record_optimizer_step(K, N)
    assert all(op["name"].startswith("_foreach_") or op["name"] in
               {"stack", "sqrt_", "div_", "clamp_min_", "reciprocal_", "mul_", "cat"} for op in launches)


def test_cli_json(capsys):
    roofline.main(["--tokens", str(T), "--dim", str(K), "--dim-out", str(N), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert set(result["cases"]) == {"switchback", "switchback_mem_efficient", "switchback_rowwise",
                                    "nn_linear", "stable_adamw_step", "stable_adamw_triton_step",
                                    "fused_adamw_step"}
    for case in result["cases"].values():
        assert set(case["predicted_s"]) == {"A100", "H100", "H200"}
        assert all(t > 0 for t in case["predicted_s"].values())


def test_grad_bias_is_folded_into_the_pass_over_g():
    """g is read by its quantization (which also sums its columns) and by grad_weight, nowhere else."""
    launches = roofline.record_layer(T, K, N, roofline.SwitchBackConfig())
    names = [op["name"] for op in launches]
    assert "quantize_rowwise_column_sums" in names
    g_bytes = 2 * T * N
    reads_of_g = [op for op in launches if op["name"] == "sum" and op["bytes"] >= g_bytes]
    assert reads_of_g == []


def test_byte_ratio_of_the_default_recipe_at_the_issue_shape():
    """Bytes touched by one bf16 fwd+bwd (2048 tokens, 256 -> 384) over the design's minimum."""
    cases = roofline.run(2048, 256, 384)["cases"]
    assert cases["switchback_rowwise"]["byte_ratio"] <= 1.05
    assert cases["switchback"]["byte_ratio"] <= 1.05  # the tensor-wise weight quantized once, both ways
    assert cases["nn_linear"]["byte_ratio"] < cases["switchback_rowwise"]["byte_ratio"]


def test_triton_optimizer_step_is_36_bytes_per_parameter_in_a_fixed_number_of_launches():
    from lowbit.kernels import stable_adamw

    small, large = roofline.triton_optimizer_step(16, 40), roofline.triton_optimizer_step(1024, 4096)
    assert len(small) == len(large)  # launches do not grow with the tensors
    n = 1024 * 4096 + 4096
    big = sum(op["bytes"] for op in large if op["name"] in ("_moments_kernel", "_update_kernel"))
    blocks = -(-1024 * 4096 // stable_adamw.BLOCK) + -(-4096 // stable_adamw.BLOCK)
    assert big == 36 * n + 4 * blocks  # g, v, u read, v, u written; p, v, u read, p written; block sums


def test_no_zero_fills_in_a_switchback_step():
    for config in (roofline.SwitchBackConfig(), roofline.SwitchBackConfig(weight_quant="row"),
                   roofline.SwitchBackConfig(mem_efficient=True)):
        names = [op["name"] for op in roofline.record_layer(T, K, N, config)]
        assert not {"zeros", "zeros_like", "fill_", "zero_"} & set(names), names


def test_launch_overhead_is_added_once_per_launch():
    """--launch-us 0 prices the launches alone (the design's ceiling); each microsecond adds one per launch."""
    free, priced = roofline.run(T, K, N, launch_s=0.0)["cases"], roofline.run(T, K, N, launch_s=5e-6)["cases"]
    for name, case in priced.items():
        extra = case["predicted_s"]["H100"] - free[name]["predicted_s"]["H100"]
        assert abs(extra - 5e-6 * len(case["launches"])) < 1e-12, name


def test_cli_refuses_a_negative_launch_overhead(capsys):
    import pytest

    with pytest.raises(SystemExit):
        roofline.main(["--launch-us", "-1"])
    assert "--launch-us must be >= 0" in capsys.readouterr().err
