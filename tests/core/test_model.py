"""Model shapes from the zoo's Hugging Face configs: KV bytes, parameter counts, MoE and window
layouts match docs/sources/hardware-sources.md; configs load by path; bad configs name the field."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from memorywall.core import builtin_models, load_model, model_from_config
from memorywall.errors import ConfigError, NotFoundError

ZOO = resources.files("memorywall.core") / "models"
MEASURED = resources.files("memorywall.core") / "calibration" / "h100-llama8b-measured.json"

MODELS = [
    "deepseek-v3",
    "gpt-oss-120b",
    "llama-3.1-405b",
    "llama-3.1-70b",
    "llama-3.1-8b",
    "llama-4-maverick",
    "qwen3-235b-a22b",
    "qwen3-32b",
]


def zoo_config(name: str) -> dict:
    return json.loads((ZOO / f"{name}.json").read_text())


def test_builtin_names():
    assert builtin_models() == MODELS


@pytest.mark.parametrize("name", MODELS)
def test_zoo_model_loads(name):
    m = load_model(name)
    assert m.name == name
    assert m.n_layers > 0 and m.hidden_size > 0 and m.vocab_size > 0
    assert m.n_heads % m.n_kv_heads == 0
    assert 0 <= m.n_moe_layers <= m.n_layers
    assert 0 <= m.n_window_layers <= m.n_layers
    assert m.active_params_per_token() <= m.total_params()
    assert m.eos_token_ids


@pytest.mark.parametrize(
    ("name", "kv_bytes_per_token"),
    [
        ("llama-3.1-8b", 131_072),  # 2 x 32 x 8 x 128 x 2
        ("llama-3.1-70b", 327_680),  # 2 x 80 x 8 x 128 x 2
        ("llama-3.1-405b", 516_096),  # 2 x 126 x 8 x 128 x 2
        ("llama-4-maverick", 196_608),  # 2 x 48 x 8 x 128 x 2
        ("qwen3-32b", 262_144),  # 2 x 64 x 8 x 128 x 2
        ("qwen3-235b-a22b", 192_512),  # 2 x 94 x 4 x 128 x 2
        ("gpt-oss-120b", 73_728),  # 2 x 36 x 8 x 64 x 2, all layers counted as full
        ("deepseek-v3", 70_272),  # 61 x (512 latent + 64 rope) x 2
    ],
)
def test_kv_bytes_per_token_bf16_matches_table(name, kv_bytes_per_token):
    m = load_model(name)
    assert m.n_layers * m.kv_values_per_token_per_layer() * 2 == kv_bytes_per_token


@pytest.mark.parametrize(
    ("name", "total_b", "active_b"),
    [
        ("llama-3.1-8b", 8.0, None),
        ("llama-3.1-70b", 70.6, None),
        ("llama-3.1-405b", 405.0, None),
        ("llama-4-maverick", 400.0, None),  # active checked separately below
        ("qwen3-32b", 32.8, None),
        ("qwen3-235b-a22b", 235.0, 22.0),
        ("gpt-oss-120b", 116.8, 5.1),
        ("deepseek-v3", 671.0, 37.0),
    ],
)
def test_params_within_two_percent_of_table(name, total_b, active_b):
    m = load_model(name)
    assert m.total_params() / 1e9 == pytest.approx(total_b, rel=0.02)
    if active_b is not None:
        assert m.active_params_per_token() / 1e9 == pytest.approx(active_b, rel=0.02)
    else:
        assert m.active_params_per_token() <= m.total_params()


def test_maverick_active_params():
    # "17B active" counts the embedding table; active_params_per_token() does not (a lookup, no
    # FLOPs): 16.15e9 + 202048 x 5120 (1.03e9) = 17.18e9.
    m = load_model("llama-4-maverick")
    embedding = m.vocab_size * m.hidden_size
    assert (m.active_params_per_token() + embedding) / 1e9 == pytest.approx(17.0, rel=0.02)
    assert m.active_params_per_token() / 1e9 == pytest.approx(16.15, rel=0.01)


def test_dense_active_equals_total_minus_embedding():
    m = load_model("llama-3.1-70b")
    assert m.total_params() - m.active_params_per_token() == m.vocab_size * m.hidden_size


def test_llama8b_always_read_bytes_match_measured_weight_bytes():
    # The measurement counts layer matrices plus LM head; always_read_params adds the 65 RMSNorm
    # vectors (2 per layer + final): 65 x 4096 = 266240 params = 532480 bytes, 0.0035%.
    measured = json.loads(MEASURED.read_text())
    weight_bytes = {r["weight_bytes"] for r in measured["decode"]}
    assert weight_bytes == {15_009_316_864}
    m = load_model("llama-3.1-8b")
    assert m.always_read_params() * 2 == pytest.approx(15_009_316_864, rel=1e-4)
    assert m.always_read_params() * 2 - 15_009_316_864 == 65 * 4096 * 2


def test_llama8b_exact_counts():
    # attention 4096*32*128*2 + 2*4096*8*128 = 41943040; norms 2*4096; MLP 3*4096*14336
    # always read = 32*(41943040 + 8192) + 32*176160768 + 128256*4096 (LM head) + 4096 (final norm)
    m = load_model("llama-3.1-8b")
    assert m.attention_params_per_layer() == 41_943_040
    assert m.always_read_params() == 32 * 41_951_232 + 32 * 176_160_768 + 525_336_576 + 4096
    assert m.attention_flops_per_pair() == 4 * 32 * 128


def test_moe_layer_counts():
    deepseek = load_model("deepseek-v3")
    assert (deepseek.n_moe_layers, deepseek.n_dense_layers) == (58, 3)  # first 3 dense of 61
    assert deepseek.moe.n_experts == 256 and deepseek.moe.experts_per_token == 8
    assert deepseek.moe.n_shared_experts == 1
    assert deepseek.mla is not None and deepseek.n_kv_heads == 1

    maverick = load_model("llama-4-maverick")
    assert maverick.n_moe_layers == 24  # every 2nd of 48
    assert maverick.moe.n_experts == 128 and maverick.moe.experts_per_token == 1
    assert maverick.moe.n_shared_experts == 1
    assert maverick.dense_intermediate == 16384 and maverick.moe.expert_intermediate == 8192

    qwen = load_model("qwen3-235b-a22b")
    assert qwen.n_moe_layers == 94 and qwen.n_dense_layers == 0
    assert (qwen.moe.n_experts, qwen.moe.experts_per_token) == (128, 8)

    gpt = load_model("gpt-oss-120b")
    assert gpt.n_moe_layers == 36 and (gpt.moe.n_experts, gpt.moe.experts_per_token) == (128, 4)

    for dense in ("llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b", "qwen3-32b"):
        m = load_model(dense)
        assert m.moe is None and m.n_moe_layers == 0 and m.expert_params() == 0


def test_window_layers():
    gpt = load_model("gpt-oss-120b")
    assert (gpt.n_window_layers, gpt.window_tokens, gpt.n_full_layers) == (18, 128, 18)
    for full in ("llama-3.1-8b", "deepseek-v3", "qwen3-32b"):
        m = load_model(full)
        assert (m.n_window_layers, m.window_tokens) == (0, None)


# --- loading by path ---------------------------------------------------------------------------


def test_load_config_by_file_and_by_folder(tmp_path):
    folder = tmp_path / "my-llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(zoo_config("llama-3.1-8b")))
    by_file = load_model(str(folder / "config.json"))
    by_folder = load_model(str(folder))
    builtin = load_model("llama-3.1-8b")
    assert by_file.name == by_folder.name == "my-llama"
    for m in (by_file, by_folder):
        assert m.total_params() == builtin.total_params()
        assert m.kv_values_per_token_per_layer() == builtin.kv_values_per_token_per_layer()


def test_text_config_nesting():
    inner = zoo_config("llama-3.1-8b")
    nested = {"model_type": "wrapper", "text_config": inner, "vision_config": {"hidden_size": 7}}
    a = model_from_config(nested, name="x")
    b = model_from_config(inner, name="x")
    assert a == b


def test_head_dim_defaults_to_hidden_over_heads():
    config = zoo_config("llama-3.1-8b")
    config.pop("head_dim", None)
    assert model_from_config(config, name="x").head_dim == 4096 // 32


# --- errors ------------------------------------------------------------------------------------


def test_missing_num_hidden_layers():
    config = zoo_config("llama-3.1-8b")
    del config["num_hidden_layers"]
    with pytest.raises(ConfigError, match="num_hidden_layers: missing"):
        model_from_config(config, name="x")


@pytest.mark.parametrize("bad", [-4096, 0, 4096.0, "4096", True])
def test_bad_hidden_size(bad):
    config = zoo_config("llama-3.1-8b")
    config["hidden_size"] = bad
    with pytest.raises(ConfigError, match="hidden_size: expected a positive integer"):
        model_from_config(config, name="x")


def test_kv_heads_must_divide_heads():
    config = zoo_config("llama-3.1-8b")
    config["num_key_value_heads"] = 5
    with pytest.raises(ConfigError, match="num_key_value_heads: 5 does not divide 32"):
        model_from_config(config, name="x")


def test_layer_types_length_must_match():
    config = zoo_config("gpt-oss-120b")
    config["num_hidden_layers"] = 40
    with pytest.raises(ConfigError, match="layer_types: 36 entries for 40 layers"):
        model_from_config(config, name="x")


def test_non_json_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{ not json")
    with pytest.raises(ConfigError, match="not a readable JSON file") as e:
        load_model(str(path))
    assert str(path) in str(e.value)


def test_json_that_is_not_an_object(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[1, 2, 3]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        load_model(str(path))


def test_error_names_the_file(tmp_path):
    config = zoo_config("llama-3.1-8b")
    config["vocab_size"] = -1
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"config\.json: vocab_size"):
        load_model(str(path))


def test_unknown_name_lists_valid_names():
    with pytest.raises(NotFoundError) as e:
        load_model("llama-9-giant")
    for name in MODELS:
        assert name in str(e.value)
