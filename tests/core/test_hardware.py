"""Hardware profiles: built-ins load with sourced values, user profiles load by path, and every
malformed profile fails with a ConfigError/NotFoundError that names the field."""

from __future__ import annotations

import dataclasses
import re
from importlib import resources

import pytest

from memorywall.core import Precision, builtin_hardware, load_hardware
from memorywall.core.hardware import DeviceKind, Hardware
from memorywall.errors import ConfigError, NotFoundError

BUILTINS = [
    "b200",
    "gb200-nvl72",
    "groq-lpu",
    "h100-sxm",
    "h200",
    "maia-100",
    "mi300x",
    "mi355x",
    "tpu-v5e",
    "tpu-v6e",
    "tpu-v7",
    "what-if-sow-hbm",
    "what-if-wafer-optical",
    "what-if-wse-flat-sram",
    "wse-3",
]
GPUS = ["b200", "h100-sxm", "h200"]  # the HGX profiles the study was built on


def set_line(text: str, key: str, new_line: str) -> str:
    """Replace the first line that starts with `key` (a TOML key) by `new_line`."""
    out, n = re.subn(rf"(?m)^{re.escape(key)}\s*=.*$", new_line, text, count=1)
    assert n == 1, f"no line starting with {key!r}"
    return out


def expected_source_keys(hw: Hardware) -> set[str]:
    """Every quantity the dataclasses carry, as the dotted names the loader files sources under."""
    keys = set()
    for tier in (hw.resident, hw.stream):
        if tier is not None:
            keys |= {
                f"memory.{tier.name}.{f}"
                for f in ("capacity_bytes", "bandwidth_bytes_per_s", "energy_pj_per_bit")
            }
    keys |= {f"compute.{p.value}.peak_flops_per_s" for p in hw.peak_flops_per_s}
    for link in ("scale_up", "external_io"):
        keys |= {f"{link}.{f}" for f in ("bandwidth_bytes_per_s", "latency_s", "energy_pj_per_bit")}
    keys |= {"scale_up.domain_devices", "power.tdp_w", "power.static_w"}
    keys |= {f"efficiency.{f.name}" for f in dataclasses.fields(hw.efficiency)}
    keys |= {f"latency.{f.name}" for f in dataclasses.fields(hw.latency)}
    keys |= {f"kernels.{f.name}" for f in dataclasses.fields(hw.kernels)}
    if hw.parallelism is not None:
        keys |= {f"parallelism.{f.name}" for f in dataclasses.fields(hw.parallelism)}
    keys.add("execution.mode")  # every built-in says which stack it emulates
    return keys


# --- built-in profiles -------------------------------------------------------------------------


def test_builtin_names():
    assert builtin_hardware() == BUILTINS


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_loads_and_every_quantity_has_a_source(name):
    hw = load_hardware(name)
    assert hw.name == name
    assert set(hw.sources) == expected_source_keys(hw)
    assert all(s.strip() for s in hw.sources.values())
    assert Precision.BF16 in hw.peak_flops_per_s


@pytest.mark.parametrize(
    ("name", "capacity_bytes", "bandwidth_bytes_per_s", "peaks", "tdp_w"),
    [
        # hardware-sources.md rows: H100 80 GB 3.35 TB/s 989/1,979 TF 700 W
        ("h100-sxm", 80e9, 3.35e12, {Precision.BF16: 989e12, Precision.FP8: 1979e12}, 700.0),
        # H200 141 GB 4.8 TB/s 989/1,979 TF 700 W
        ("h200", 141e9, 4.8e12, {Precision.BF16: 989e12, Precision.FP8: 1979e12}, 700.0),
        # B200 180 GB usable 8 TB/s 2.25/4.5/9 PF 1,000 W
        (
            "b200",
            180e9,
            8e12,
            {Precision.BF16: 2.25e15, Precision.FP8: 4.5e15, Precision.FP4: 9e15},
            1000.0,
        ),
        # WSE-3 44 GB SRAM at 21 PB/s, dense ~16 PF (assumption), ~23 kW
        ("wse-3", 44e9, 21e15, {Precision.BF16: 16e15}, 23000.0),
    ],
)
def test_values_match_hardware_sources(name, capacity_bytes, bandwidth_bytes_per_s, peaks, tdp_w):
    hw = load_hardware(name)
    assert hw.resident.capacity_bytes == capacity_bytes
    assert hw.resident.bandwidth_bytes_per_s == bandwidth_bytes_per_s
    assert dict(hw.peak_flops_per_s) == peaks
    assert hw.tdp_w == tdp_w


def test_gpu_links_are_per_direction_halves_of_bidirectional_nvlink():
    # NVLink 4: 900 GB/s bidirectional -> 450e9 B/s; NVLink 5: 1.8 TB/s -> 900e9 B/s
    assert load_hardware("h100-sxm").scale_up.bandwidth_bytes_per_s == 450e9
    assert load_hardware("h200").scale_up.bandwidth_bytes_per_s == 450e9
    assert load_hardware("b200").scale_up.bandwidth_bytes_per_s == 900e9


def test_wse3_specifics():
    hw = load_hardware("wse-3")
    assert hw.kind is DeviceKind.WAFER
    assert hw.resident.name == "sram"
    # system I/O 1.2 Tb/s = 12 x 100 GbE = 150e9 B/s, for both external I/O and the stream tier
    assert hw.external_io.bandwidth_bytes_per_s == 150e9
    assert hw.stream is not None
    assert hw.stream.bandwidth_bytes_per_s == 150e9
    assert hw.scale_up_domain == 1
    assert hw.calibration == "wse-fit"


def test_gpus_share_the_gpu_fit_constants():
    gpus = [load_hardware(n) for n in GPUS]
    assert {g.calibration for g in gpus} == {"gpu-fit"}
    assert all(g.kind is DeviceKind.GPU and g.stream is None for g in gpus)
    assert all(g.scale_up_domain == 8 for g in gpus)
    assert len({g.efficiency for g in gpus}) == 1
    assert len({g.latency for g in gpus}) == 1


def test_compute_peak_falls_back_to_bf16():
    hw = load_hardware("h100-sxm")
    assert hw.compute_peak(Precision.FP8) == 1979e12
    assert hw.compute_peak(Precision.FP4) == 989e12  # no fp4 units: weight-only format


# --- user profiles by path ---------------------------------------------------------------------


def test_user_profile_by_path(h100_text, write_profile):
    text = set_line(
        h100_text,
        "bandwidth_bytes_per_s",
        'bandwidth_bytes_per_s = { value = 2e12, unit = "B/s", source = "my measurement" }',
    )
    assert 'calibration = "gpu-fit"' in text
    hw = load_hardware(write_profile(text))
    builtin = load_hardware("h100-sxm")
    assert hw.resident.bandwidth_bytes_per_s == 2e12
    assert hw.sources["memory.hbm.bandwidth_bytes_per_s"] == "my measurement"
    assert hw.efficiency == builtin.efficiency
    assert hw.latency == builtin.latency
    assert hw.resident.capacity_bytes == builtin.resident.capacity_bytes


def test_inline_override_of_one_efficiency_and_one_latency(h100_text, write_profile):
    text = h100_text + (
        '\n[efficiency]\noverlap = { value = 0.25, unit = "1", source = "inline test" }\n'
        '\n[latency]\nper_step_s = { value = 1e-5, unit = "s", source = "host overhead" }\n'
    )
    hw = load_hardware(write_profile(text))
    builtin = load_hardware("h100-sxm")
    assert hw.efficiency == dataclasses.replace(builtin.efficiency, overlap=0.25)
    assert hw.latency == dataclasses.replace(builtin.latency, per_step_s=1e-5)
    assert hw.sources["efficiency.overlap"] == "inline test"
    assert hw.sources["latency.per_step_s"] == "host overhead"
    assert hw.sources["efficiency.kv_read"] == builtin.sources["efficiency.kv_read"]


def test_local_calibration_file_next_to_profile(h100_text, write_profile, tmp_path):
    builtin_fit = (resources.files("memorywall.core") / "calibration" / "gpu-fit.toml").read_text()
    fitted = load_hardware("h100-sxm").efficiency.attention
    old = f"attention = {{ value = {fitted!r},"
    assert old in builtin_fit
    (tmp_path / "my-fit.toml").write_text(builtin_fit.replace(old, "attention = { value = 0.5,"))
    text = h100_text.replace('calibration = "gpu-fit"', 'calibration = "my-fit.toml"')
    hw = load_hardware(write_profile(text))
    assert hw.efficiency.attention == 0.5


# --- errors ------------------------------------------------------------------------------------


def test_unknown_name_lists_builtins():
    with pytest.raises(NotFoundError) as e:
        load_hardware("tpu-v9")
    for name in BUILTINS:
        assert name in str(e.value)


def test_missing_toml_path_is_not_found(tmp_path):
    with pytest.raises(NotFoundError, match="does not exist"):
        load_hardware(str(tmp_path / "nope.toml"))


CAPACITY = "capacity_bytes"
BAD_PROFILES = [
    # (id, edit of the h100 text, pattern the message must contain)
    (
        "missing source",
        lambda t: set_line(t, CAPACITY, 'capacity_bytes = { value = 80e9, unit = "B" }'),
        r"memory\.hbm\.capacity_bytes\.source",
    ),
    (
        "empty source",
        lambda t: set_line(
            t, CAPACITY, 'capacity_bytes = { value = 80e9, unit = "B", source = " " }'
        ),
        r"memory\.hbm\.capacity_bytes\.source",
    ),
    (
        "wrong unit",
        lambda t: set_line(
            t, CAPACITY, 'capacity_bytes = { value = 80, unit = "GB", source = "x" }'
        ),
        r"memory\.hbm\.capacity_bytes\.unit: expected 'B', got 'GB'",
    ),
    (
        "negative value",
        lambda t: set_line(t, "tdp_w", 'tdp_w = { value = -700, unit = "W", source = "x" }'),
        r"power\.tdp_w\.value: must be > 0, got -700",
    ),
    (
        "zero bandwidth",
        lambda t: set_line(
            t,
            "bandwidth_bytes_per_s",
            'bandwidth_bytes_per_s = { value = 0, unit = "B/s", source = "x" }',
        ),
        r"memory\.hbm\.bandwidth_bytes_per_s\.value: must be > 0",
    ),
    (
        "value not a number",
        lambda t: set_line(
            t, CAPACITY, 'capacity_bytes = { value = "80e9", unit = "B", source = "x" }'
        ),
        r"memory\.hbm\.capacity_bytes\.value: expected a number",
    ),
    (
        "value a bool",
        lambda t: set_line(t, "tdp_w", 'tdp_w = { value = true, unit = "W", source = "x" }'),
        r"power\.tdp_w\.value: expected a number",
    ),
    (
        "bare number instead of a quantity",
        lambda t: set_line(t, "tdp_w", "tdp_w = 700"),
        r"power\.tdp_w: expected \{ value",
    ),
    ("bad TOML syntax", lambda t: t + "\nname = = oops\n", r"not valid TOML"),
    (
        "missing [memory] table",
        lambda t: re.sub(r"(?s)\[memory\.hbm\].*?(?=\[compute\.bf16\])", "", t),
        r"\[memory\]: missing table",
    ),
    (
        "no resident tier",
        lambda t: t.replace('role = "resident"', 'role = "stream"'),
        r"\[memory\]: need exactly one tier with role 'resident'",
    ),
    (
        "bad tier role",
        lambda t: t.replace('role = "resident"', 'role = "cache"'),
        r"memory\.hbm\.role",
    ),
    ("unknown kind", lambda t: t.replace('kind = "gpu"', 'kind = "tpu"'), r"kind: .*'tpu'"),
    (
        "what_if not a bool",
        lambda t: t.replace('kind = "gpu"', 'kind = "gpu"\nwhat_if = "yes"'),
        r"what_if: expected true or false, got 'yes'",
    ),
    (
        "what-if profile without notes",
        lambda t: set_line(t, "name", 'name = "what-if-x"').replace(
            'kind = "gpu"', 'kind = "gpu"\nwhat_if = true'
        ),
        r"notes: a what-if profile must state its assumptions",
    ),
    (
        "what-if profile not named what-if-*",
        lambda t: t.replace('kind = "gpu"', 'kind = "gpu"\nwhat_if = true\nnotes = ["a"]'),
        r"name: a what-if profile's name starts with 'what-if-', got 'h100-sxm'",
    ),
    (
        "named what-if but not marked",
        lambda t: set_line(t, "name", 'name = "what-if-x"'),
        r"what_if: 'what-if-x' is named what-if but not marked so",
    ),
    (
        "notes not a list of strings",
        lambda t: t.replace('kind = "gpu"', 'kind = "gpu"\nnotes = ["ok", ""]'),
        r"notes: expected a list of non-empty strings",
    ),
    (
        "profile source not a string",
        lambda t: set_line(t, "source", "source = 3"),
        r": source: expected a string",
    ),
    (
        "unknown calibration",
        lambda t: t.replace('calibration = "gpu-fit"', 'calibration = "no-such-fit"'),
        r"calibration: unknown calibration 'no-such-fit'",
    ),
    (
        "missing calibration key",
        lambda t: t.replace('calibration = "gpu-fit"\n', ""),
        r"calibration: expected a non-empty string",
    ),
    ("missing name", lambda t: set_line(t, "name", ""), r": name: expected a non-empty string"),
    (
        "unknown precision",
        lambda t: t.replace("[compute.fp8]", "[compute.int3]"),
        r"\[compute\.int3\]: unknown precision 'int3'",
    ),
    (
        "no bf16 peak",
        lambda t: t.replace("[compute.bf16]", "[compute.fp4]"),
        r"\[compute\.bf16\]: missing",
    ),
    (
        "efficiency above 1",
        lambda t: t + '\n[efficiency]\ncompute = { value = 1.5, unit = "1", source = "x" }\n',
        r"efficiency\.compute\.value: must be > 0 and <= 1, got 1\.5",
    ),
    (
        "unknown execution mode",
        lambda t: t.replace('mode = "graphs"', 'mode = "turbo"'),
        r"execution\.mode: expected one of 'eager', 'decode-graphs', 'graphs', got 'turbo'",
    ),
    (
        "execution mode without a source",
        lambda t: re.sub(r"(?m)^source = .*$", "", t),
        r"execution\.source: the execution mode must cite a source",
    ),
    (
        "negative latency floor",
        lambda t: t + '\n[latency]\nper_layer_s = { value = -1e-6, unit = "s", source = "x" }\n',
        r"latency\.per_layer_s\.value: must be >= 0",
    ),
]


@pytest.mark.parametrize(
    ("edit", "pattern"), [p[1:] for p in BAD_PROFILES], ids=[p[0] for p in BAD_PROFILES]
)
def test_bad_profile_raises_config_error_naming_the_field(h100_text, write_profile, edit, pattern):
    path = write_profile(edit(h100_text))
    with pytest.raises(ConfigError, match=pattern) as e:
        load_hardware(path)
    message = str(e.value)
    assert path in message  # names the file
    assert "\n" not in message  # one line


def test_profile_without_execution_table_runs_the_default_stack(h100_text, write_profile):
    from memorywall.core.hardware import DEFAULT_EXECUTION, ExecutionMode

    text = re.sub(r"(?s)\n\[execution\].*", "\n", h100_text)
    hw = load_hardware(write_profile(text))
    assert hw.execution is DEFAULT_EXECUTION is ExecutionMode.GRAPHS
    assert "execution.mode" not in hw.sources
    eager = load_hardware(write_profile(h100_text.replace('mode = "graphs"', 'mode = "eager"')))
    assert eager.execution is ExecutionMode.EAGER


def test_nan_value_is_rejected(h100_text, write_profile):
    text = set_line(
        h100_text,
        "bandwidth_bytes_per_s",
        'bandwidth_bytes_per_s = { value = nan, unit = "B/s", source = "x" }',
    )
    with pytest.raises(ConfigError, match=r"memory\.hbm\.bandwidth_bytes_per_s\.value"):
        load_hardware(write_profile(text))


def test_scalar_compute_entry_is_a_config_error(h100_text, write_profile):
    text = re.sub(
        r"\[compute\.bf16\]\npeak_flops_per_s = [^\n]*", "[compute]\nbf16 = 989e12", h100_text
    )
    with pytest.raises(ConfigError, match=r"compute\.bf16"):
        load_hardware(write_profile(text))


def test_gpu_profiles_carry_sm_counts_and_the_wafer_none():
    assert {n: load_hardware(n).parallelism.units for n in GPUS} == {
        "b200": 148,
        "h100-sxm": 132,
        "h200": 132,
    }
    assert load_hardware("wse-3").parallelism is None


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('units = { value = 132.5, unit = "SMs", source = "x" }', "must be a whole number"),
        ('units = { value = 132, unit = "cores", source = "x" }', "expected 'SMs'"),
        ('units = { value = 0, unit = "SMs", source = "x" }', "must be > 0"),
    ],
)
def test_parallelism_errors_name_the_field(h100_text, write_profile, line, message):
    text = set_line(h100_text, "units", line)
    with pytest.raises(ConfigError, match=message) as e:
        load_hardware(write_profile(text))
    assert "parallelism.units" in str(e.value)
