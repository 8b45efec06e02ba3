"""Configuration and argument validation, host registration, and the core's import isolation."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from core_models import FUNCTIONAL_HOST, HOSTS, NoAttention, assert_unchanged, host_registered, randomize_adapters, run, snapshot
from serial_lora_core import (
    AttentionHost,
    SerialLoraConfig,
    SerialLoraError,
    StreamSpec,
    adapter_config,
    inject_serial_lora,
    load_serial_lora,
    register_host,
    registered_hosts,
    save_serial_lora,
    serial_lora_modules,
    set_serial_lora_scale,
)
from serial_lora_core.attention import check_adapter_name
from serial_lora_core.config import check_scale
from serial_lora_core.hosts import registered, unregister_host

# (keyword arguments, error type, text the message must contain)
BAD_CONFIGS = {
    "rank_zero": ({"rank": 0}, ValueError, "rank"),
    "rank_negative": ({"rank": -3}, ValueError, "rank"),
    "rank_float": ({"rank": 4.0}, TypeError, "rank"),
    "rank_bool": ({"rank": True}, TypeError, "rank"),
    "rank_string": ({"rank": "8"}, TypeError, "rank"),
    "alpha_string": ({"alpha": "16"}, TypeError, "alpha"),
    "alpha_bool": ({"alpha": True}, TypeError, "alpha"),
    "alpha_inf": ({"alpha": math.inf}, ValueError, "alpha"),
    "alpha_nan": ({"alpha": math.nan}, ValueError, "alpha"),
    "dropout_one": ({"dropout": 1.0}, ValueError, "dropout"),
    "dropout_negative": ({"dropout": -0.1}, ValueError, "dropout"),
    "dropout_string": ({"dropout": "0.1"}, ValueError, "dropout"),
    "init_unknown": ({"init": "xavier"}, ValueError, "init"),
    "dtype_name": ({"dtype": "int8"}, ValueError, "dtype"),
    "dtype_integer_torch": ({"dtype": torch.int32}, TypeError, "dtype"),
    "target_modules_regex": ({"target_modules": "blocks.(0"}, ValueError, "target_modules"),
    "streams_empty": ({"streams": ()}, ValueError, "streams"),
}


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_bad_config_values_name_the_argument(name):
    kwargs, error, argument = BAD_CONFIGS[name]
    with pytest.raises(error, match=argument):
        SerialLoraConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, scale",
    [({"rank": 8}, 1.0), ({"rank": 8, "alpha": 16}, 2.0), ({"rank": 16, "alpha": 8, "use_rslora": True}, 2.0),
     ({"rank": 4, "alpha": 0.5}, 0.125)],
)
def test_config_scale_and_defaults(kwargs, scale):
    config = SerialLoraConfig(**kwargs)
    assert config.scaling == scale
    assert config.alpha == float(kwargs.get("alpha", kwargs["rank"]))
    round_trip = json.loads(json.dumps(config.to_dict()))
    assert round_trip["rank"] == kwargs["rank"] and round_trip["alpha"] == config.alpha


def test_config_normalises_strings_and_dtypes():
    config = SerialLoraConfig(rank=2, target_modules=r"attn$", streams="image", dtype="torch.bfloat16")
    assert config.target_modules == (r"attn$",)
    assert config.streams == ("image",)
    assert config.dtype is torch.bfloat16
    assert config.targets("blocks.0.attn") and not config.targets("blocks.0.attn.proj")
    assert config.to_dict()["dtype"] == "bfloat16"


def test_model_without_attention_is_a_clear_error():
    model = NoAttention()
    before = snapshot(model)
    with pytest.raises(SerialLoraError) as error:
        inject_serial_lora(model, SerialLoraConfig(rank=2))
    message = str(error.value)
    assert "no attention module of NoAttention matched" in message
    assert "register_host" in message and "fused_qkv" in message
    assert_unchanged(model, before)


def test_target_modules_matching_nothing_is_a_clear_error():
    model = HOSTS["fused"].model()
    before = snapshot(model)
    with pytest.raises(SerialLoraError, match=r"target_modules=\('decoder',\)"):
        inject_serial_lora(model, SerialLoraConfig(rank=2, target_modules="decoder"))
    with pytest.raises(SerialLoraError, match=r"streams=\('text',\)"):
        inject_serial_lora(model, SerialLoraConfig(rank=2, streams="text"))
    assert_unchanged(model, before)


@pytest.mark.parametrize("adapter_name", ["", "has space", "1st", "a.b", None])
def test_bad_adapter_names(adapter_name):
    model = HOSTS["fused"].model()
    with pytest.raises(SerialLoraError, match="adapter_name"):
        inject_serial_lora(model, SerialLoraConfig(rank=2), adapter_name)


@pytest.mark.parametrize("adapter_name", ["forward", "training", "items", "host", "enabled", "merged", "_cache", "__class__"])
@pytest.mark.parametrize("call", ["inject", "load"])
def test_adapter_names_that_are_attributes_of_the_adapters_module_are_refused(adapter_name, call, tmp_path):
    # Such a name used to fail halfway with a bare KeyError ("attribute 'forward' already exists"),
    # after hooks had been attached.
    case = HOSTS["fused"]
    source = case.model()
    inject_serial_lora(source, SerialLoraConfig(rank=2))
    path = save_serial_lora(source, tmp_path / "adapter.safetensors")
    model = case.model()
    before = snapshot(model)
    with pytest.raises(SerialLoraError, match=f"adapter_name {adapter_name!r} is the name of an attribute"):
        if call == "inject":
            inject_serial_lora(model, SerialLoraConfig(rank=2), adapter_name)
        else:
            load_serial_lora(model, path, adapter_name=adapter_name)
    assert_unchanged(model, before)


def test_every_attribute_of_the_adapters_module_is_a_refused_adapter_name():
    # Kept in sync with SerialLoraAttention: a new attribute must not become a usable adapter name.
    model = HOSTS["fused"].model()
    inject_serial_lora(model, SerialLoraConfig(rank=2))
    (_, module), = list(serial_lora_modules(model))[:1]
    names = (set(vars(module)) | set(dir(type(module)))) - set(module.keys())
    accepted = []
    for name in sorted(n for n in names if n.isidentifier()):
        try:
            check_adapter_name(name)
            accepted.append(name)
        except SerialLoraError:
            pass
    assert accepted == []
    assert check_adapter_name("style") == "style"


def test_bad_arguments_to_inject_and_scale():
    model = HOSTS["fused"].model()
    with pytest.raises(TypeError, match="config"):
        inject_serial_lora(model, {"rank": 4})
    inject_serial_lora(model)  # default config: rank 8
    assert adapter_config(model).rank == 8
    before = snapshot(model)
    with pytest.raises(SerialLoraError, match="'default' already exists"):
        inject_serial_lora(model, SerialLoraConfig(rank=2))
    with pytest.raises(TypeError, match="scale"):
        set_serial_lora_scale(model, "0.5")
    with pytest.raises(SerialLoraError, match="'missing'"):
        set_serial_lora_scale(model, 0.5, "missing")
    assert_unchanged(model, before)


def test_bad_host_declarations():
    with pytest.raises(TypeError, match="AttentionHost"):
        register_host({"name": "x"})
    with pytest.raises(SerialLoraError, match="projections"):
        StreamSpec(projections=())


def test_register_host_is_tried_first_and_restored_by_the_fixture():
    before = registered_hosts()
    case = HOSTS["functional"]
    with host_registered(case):
        assert registered_hosts()[0] is FUNCTIONAL_HOST
        model = case.model()
        inputs = case.inputs()
        base = run(model, inputs)
        wrapped = inject_serial_lora(model, SerialLoraConfig(rank=2))
        assert {m.host.name for m in wrapped.values()} == {"functional_qkv"}
        randomize_adapters(model)
        assert not torch.equal(run(model, inputs), base)
        # Registering again under the same name replaces, it does not duplicate.
        register_host(FUNCTIONAL_HOST)
        assert [h.name for h in registered_hosts()].count("functional_qkv") == 1
    assert registered_hosts() == before


def test_a_host_with_class_names_matches_only_those_classes():
    host = AttentionHost(name="only_split", class_names=("SplitQKVAttention",),
                         streams={"input": StreamSpec(projections=("q_proj", "k_proj"))})
    before = registered_hosts()
    with host_registered(HOSTS["split"]):  # restores the registry afterwards
        register_host(host)
        split = inject_serial_lora(HOSTS["split"].model(), SerialLoraConfig(rank=2))
        assert {m.host.name for m in split.values()} == {"only_split"}
        assert {tuple(m.stream_specs["input"].projections) for m in split.values()} == {("q_proj", "k_proj")}
        fused = inject_serial_lora(HOSTS["fused"].model(), SerialLoraConfig(rank=2))
        assert {m.host.name for m in fused.values()} == {"fused_qkv"}
    assert registered_hosts() == before


def test_importing_the_core_imports_no_host_library():
    forbidden = ["timm", "diffusers", "transformers", "comfy", "comfy_api", "peft", "huggingface_hub", "accelerate", "triton"]
    script = (
        "import sys, json, serial_lora_core\n"
        "roots = {m.split('.')[0] for m in sys.modules}\n"
        f"print(json.dumps([sorted(roots & set({forbidden!r})), 'torch' in roots, 'safetensors' in roots]))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    imported, torch_seen, safetensors_seen = json.loads(result.stdout)
    assert imported == []
    assert torch_seen and safetensors_seen  # the probe does see what the core really imports


# ------------------------------------------------------------------------------------ check_scale
@pytest.mark.parametrize(
    "value, error",
    [(math.nan, ValueError), (math.inf, ValueError), (-math.inf, ValueError), (1e300, ValueError), (-3.5e38, ValueError),
     (10 ** 400, ValueError), (True, TypeError), ("1", TypeError), (None, TypeError), (torch.tensor(1.0), TypeError)],
    ids=["nan", "inf", "-inf", "1e300", "-3.5e38", "huge_int", "bool", "str", "none", "tensor"],
)
def test_check_scale_refuses_what_float32_cannot_hold(value, error):
    with pytest.raises(error, match="my_argument"):
        check_scale(value, "my_argument")


@pytest.mark.parametrize("value", [0, 1, -2.5, 3.4e38, 1e-45])
def test_check_scale_returns_a_float(value):
    result = check_scale(value, "scale")
    assert type(result) is float and result == float(value)


def test_alpha_whose_scaling_overflows_float32_is_refused():
    with pytest.raises(ValueError, match=r"alpha=1e\+300 gives a scaling alpha/r of 2.5e\+299, beyond float32"):
        SerialLoraConfig(rank=4, alpha=1e300)
    assert SerialLoraConfig(rank=4, alpha=4e38).scaling == 1e38


# ------------------------------------------------------------------------------------ registry
def test_registered_is_scoped_and_restores_a_replaced_host():
    before = registered_hosts()
    replacement = AttentionHost(name="fused_qkv", streams={"input": StreamSpec(projections=("qkv",))}, class_names=("X",))
    with pytest.raises(RuntimeError, match="inside"):
        with registered(FUNCTIONAL_HOST, replacement) as hosts:
            assert hosts == (FUNCTIONAL_HOST, replacement)
            assert registered_hosts()[:2] == (replacement, FUNCTIONAL_HOST)
            assert [h.name for h in registered_hosts()].count("fused_qkv") == 1
            raise RuntimeError("inside")
    assert registered_hosts() == before


def test_unregister_host():
    with registered(FUNCTIONAL_HOST):
        assert unregister_host("functional_qkv") is FUNCTIONAL_HOST
        assert "functional_qkv" not in [h.name for h in registered_hosts()]
        with pytest.raises(SerialLoraError, match=r"no attention host named 'nope'.*fused_qkv"):
            unregister_host("nope")


class WqkvAttention(torch.nn.Module):
    """An attention only a custom host recognises (q/k/v called wq/wk/wv)."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.wq, self.wk, self.wv = (torch.nn.Linear(dim, dim) for _ in range(3))

    def forward(self, x):
        return self.wq(x) + self.wk(x) + self.wv(x)


def test_file_validity_does_not_depend_on_which_hosts_are_registered(tmp_path):
    """Saved while a host for an extra (unadapted) attention was registered, loaded without it: the
    file's `model_attention_modules` counts by the file's own streams, so it still loads."""
    from serial_lora_core import load_serial_lora, save_serial_lora

    def build():
        model = HOSTS["fused"].model()
        model.extra = WqkvAttention()
        return model

    host = AttentionHost(name="wqkv", streams={"input": StreamSpec(projections=("wq", "wk", "wv"))})
    source = build()
    with registered(host):
        inject_serial_lora(source, SerialLoraConfig(rank=2, target_modules=r"^blocks\."))
        randomize_adapters(source)
        path = save_serial_lora(source, tmp_path / "a.safetensors")
    target = build()
    load_serial_lora(target, path)  # no "wqkv" host now
    inputs = HOSTS["fused"].inputs()
    assert torch.equal(run(target, inputs), run(source, inputs))
