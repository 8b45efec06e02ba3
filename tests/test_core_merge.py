"""Merge, unmerge (bit for bit), refusal of non-finite merges with rollback, remove and merge-and-unload."""

from __future__ import annotations

import pytest
import torch

from core_models import (
    DTYPES,
    HOSTS,
    TOLERANCE,
    assert_unchanged,
    randomize_adapters,
    run,
    same_bits,
    snapshot,
)
from serial_lora_core import (
    SerialLoraAttention,
    SerialLoraConfig,
    SerialLoraError,
    delete_serial_lora_adapter,
    disable_serial_lora,
    enable_serial_lora,
    inject_serial_lora,
    is_merged,
    merge_and_unload_serial_lora,
    merge_serial_lora,
    remove_serial_lora,
    serial_lora_modules,
    set_serial_lora_scale,
    unmerge_serial_lora,
)

DTYPE_PARAMS = pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))


def adapted_model(case, dtype=torch.float32, freeze=True, **config):
    model = case.model(dtype)
    inject_serial_lora(model, SerialLoraConfig(**{"rank": 4, "alpha": 6.0, **config}), freeze=freeze)
    randomize_adapters(model, seed=8, std=0.25)
    return model


def projection_paths(model) -> list[str]:
    return [f"{name}.{path}" for name, module in serial_lora_modules(model)
            for spec in module.stream_specs.values() for path in spec.projections]


def count_adapter_calls(model) -> list[int]:
    calls = [0]
    for _, module in serial_lora_modules(model):
        for adapters in module.values():
            for adapter in adapters.values():
                adapter.down.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@DTYPE_PARAMS
def test_merged_output_equals_unmerged(case, dtype):
    model = adapted_model(case, dtype)
    inputs = case.inputs("BHWC", dtype)
    unmerged = run(model, inputs)
    calls = count_adapter_calls(model)
    merge_serial_lora(model)
    assert is_merged(model)
    merged = run(model, inputs)
    assert calls[0] == 0, "a merged model must not run the adapters again"
    tolerance = TOLERANCE[dtype]
    assert (merged.double() - unmerged.double()).abs().max() <= tolerance
    # Not vacuous: the merged weights differ from the base weights.
    base = case.model(dtype)
    changed = [p for p in projection_paths(model)
               if not torch.equal(model.get_submodule(p).weight, base.get_submodule(p).weight)]
    assert changed == projection_paths(model)


@DTYPE_PARAMS
def test_unmerge_restores_every_weight_bit_for_bit(case, dtype):
    model = adapted_model(case, dtype)
    inputs = case.inputs(dtype=dtype)
    before = snapshot(model)
    unmerged = run(model, inputs)
    for _ in range(2):  # merge/unmerge cycles do not drift
        merge_serial_lora(model, scale=0.75)
        assert any(not same_bits(model.get_submodule(p).weight, before["state"][f"{p}.weight"]) for p in projection_paths(model))
        unmerge_serial_lora(model)
        assert not is_merged(model)
        assert_unchanged(model, before)
    assert torch.equal(run(model, inputs), unmerged)


def test_merge_scale_equals_adapter_strength(case):
    model = adapted_model(case)
    inputs = case.inputs()
    set_serial_lora_scale(model, 0.4)
    weak = run(model, inputs)
    set_serial_lora_scale(model, 1.0)
    merge_serial_lora(model, scale=0.4)
    torch.testing.assert_close(run(model, inputs), weak, rtol=0, atol=1e-5)
    unmerge_serial_lora(model)
    # Strength set with set_serial_lora_scale is merged too (scale x strength).
    set_serial_lora_scale(model, 0.5)
    merge_serial_lora(model, scale=0.8)
    torch.testing.assert_close(run(model, inputs), weak, rtol=0, atol=1e-5)


def test_two_adapters_merge_to_their_sum():
    case = HOSTS["split"]
    model = case.model()
    inputs = case.inputs()
    inject_serial_lora(model, SerialLoraConfig(rank=2, alpha=3.0), "a")
    inject_serial_lora(model, SerialLoraConfig(rank=3, alpha=1.0, use_rslora=True), "b")
    randomize_adapters(model, seed=3)
    set_serial_lora_scale(model, -0.6, "b")
    unmerged = run(model, inputs)
    merge_serial_lora(model)
    torch.testing.assert_close(run(model, inputs), unmerged, rtol=0, atol=1e-5)


# (dtype, value written into the last attention's up weight): non-finite inputs, and a float16
# overflow that is finite in the float32 computation but not once cast back.
BAD_MERGES = {
    "inf_fp32": (torch.float32, float("inf"), None),
    "nan_bf16": (torch.bfloat16, float("nan"), None),
    "overflow_fp16": (torch.float16, 300.0, 300.0),
}


@pytest.mark.parametrize("bad", list(BAD_MERGES))
def test_merge_refuses_non_finite_results_and_rolls_back(case, bad):
    dtype, up_value, down_value = BAD_MERGES[bad]
    model = adapted_model(case, dtype)
    inputs = case.inputs(dtype=dtype)
    last_attention, last = list(serial_lora_modules(model))[-1]
    with torch.no_grad():
        adapter = next(iter(last["default"].values()))
        adapter.up.weight[0, 0] = up_value
        if down_value is not None:
            adapter.up.weight.fill_(up_value)
            adapter.down.weight.fill_(down_value)
    before = snapshot(model)
    with pytest.raises(SerialLoraError, match="non-finite") as error:
        merge_serial_lora(model)
    assert repr(next(iter(last.stream_specs.values())).projections[0]) in str(error.value)
    assert not is_merged(model)
    assert_unchanged(model, before)
    for path in projection_paths(model):
        assert torch.isfinite(model.get_submodule(path).weight).all()
    # The earlier attentions were merged and rolled back: the model still merges once fixed.
    randomize_adapters(model, seed=8, std=0.25)
    unmerged = run(model, inputs)
    merge_serial_lora(model)
    assert (run(model, inputs).double() - unmerged.double()).abs().max() <= TOLERANCE[dtype]


@pytest.mark.parametrize(
    "action",
    [
        lambda m: merge_serial_lora(m),
        lambda m: set_serial_lora_scale(m, 0.5),
        lambda m: enable_serial_lora(m),
        lambda m: disable_serial_lora(m),
        lambda m: delete_serial_lora_adapter(m, "default"),
        lambda m: inject_serial_lora(m, SerialLoraConfig(rank=2), "other"),
    ],
    ids=["merge_again", "set_scale", "enable", "disable", "delete", "inject"],
)
def test_changes_while_merged_are_refused_and_change_nothing(action):
    case = HOSTS["split"]
    model = adapted_model(case)
    merge_serial_lora(model)
    before = snapshot(model)
    with pytest.raises(SerialLoraError, match="unmerge_serial_lora"):
        action(model)
    assert_unchanged(model, before)


@DTYPE_PARAMS
def test_remove_restores_modules_keys_hooks_and_outputs(case, dtype):
    model = case.model(dtype)
    inputs = case.inputs("BHWC", dtype)
    pristine = snapshot(model)
    base = run(model, inputs)
    inject_serial_lora(model, SerialLoraConfig(rank=4), "a", freeze=False)
    inject_serial_lora(model, SerialLoraConfig(rank=2), "b", freeze=False)
    randomize_adapters(model)
    assert not torch.equal(run(model, inputs), base)
    merge_serial_lora(model)  # removing a merged model also unmerges it
    remove_serial_lora(model)
    assert not any(isinstance(m, SerialLoraAttention) for m in model.modules())
    assert_unchanged(model, pristine)
    assert torch.equal(run(model, inputs), base)


@DTYPE_PARAMS
def test_merge_and_unload_gives_a_plain_model_with_merged_outputs(case, dtype):
    model = adapted_model(case, dtype)
    inputs = case.inputs(dtype=dtype)
    pristine = snapshot(case.model(dtype))
    unmerged = run(model, inputs)
    merge_serial_lora(model)
    merged = run(model, inputs)
    merged_weights = {p: model.get_submodule(p).weight.detach().clone() for p in projection_paths(model)}
    plain = merge_and_unload_serial_lora(model)
    assert plain is model
    assert not any(isinstance(m, SerialLoraAttention) for m in model.modules())
    after = snapshot(model)
    assert list(after["state"]) == list(pristine["state"])
    assert [(n, t) for n, _, t, _ in after["modules"]] == [(n, t) for n, _, t, _ in pristine["modules"]]
    assert after["hooks"] == pristine["hooks"]  # no hook of ours is left
    for path, weight in merged_weights.items():
        assert same_bits(model.get_submodule(path).weight, weight)
    assert torch.equal(run(model, inputs), merged)
    assert (merged.double() - unmerged.double()).abs().max() <= TOLERANCE[dtype]


def test_merge_and_unload_merges_an_unmerged_model(case):
    model = adapted_model(case)
    inputs = case.inputs()
    unmerged = run(model, inputs)
    merge_and_unload_serial_lora(model, scale=1.0)
    assert not list(serial_lora_modules(model))
    torch.testing.assert_close(run(model, inputs), unmerged, rtol=0, atol=1e-5)


def test_delete_one_adapter_then_the_last(case):
    model = case.model()
    inputs = case.inputs()
    base = run(model, inputs)
    pristine_hooks = snapshot(model)["hooks"]
    inject_serial_lora(model, SerialLoraConfig(rank=2), "keep")
    randomize_adapters(model, seed=1, adapter_name="keep")
    only_keep = run(model, inputs)
    inject_serial_lora(model, SerialLoraConfig(rank=3), "drop")
    randomize_adapters(model, seed=2, adapter_name="drop")
    assert not torch.equal(run(model, inputs), only_keep)
    delete_serial_lora_adapter(model, "drop")
    assert not any(k.startswith("drop") or ".drop." in k for k in model.state_dict())
    assert torch.equal(run(model, inputs), only_keep)
    delete_serial_lora_adapter(model, "keep")
    assert not list(serial_lora_modules(model))
    assert snapshot(model)["hooks"] == pristine_hooks
    assert torch.equal(run(model, inputs), base)


# ------------------------------------------------------------------------------------- tied weights
def tie(model, path: str) -> None:
    """Make block 1's `path` layer use block 0's weight Parameter (weight tying across attentions)."""
    model.blocks[1].attn.get_submodule(path).weight = model.blocks[0].attn.get_submodule(path).weight


@pytest.mark.parametrize("host", ["fused", "split"])
def test_merge_refuses_weights_tied_across_attentions(host):
    case = HOSTS[host]
    model = adapted_model(case)
    tie(model, case.streams["input"][0][-1])
    inputs = case.inputs()
    unmerged = run(model, inputs)
    before = snapshot(model)
    with pytest.raises(SerialLoraError, match="tied weights") as error:
        merge_serial_lora(model)
    last = case.streams["input"][0][-1]
    assert f"'blocks.0.attn.{last}'" in str(error.value) and f"'blocks.1.attn.{last}'" in str(error.value)
    assert not is_merged(model)
    assert_unchanged(model, before)
    # Unmerged, each attention still runs its own adapter on the shared weight.
    assert torch.equal(run(model, inputs), unmerged)


@pytest.mark.parametrize(("other", "shares"), [("o_proj", "weight"), ("gate", "weight"), ("o_proj", "view")])
def test_merge_refuses_a_projection_weight_tied_to_a_layer_no_adapter_changes(other, shares):
    # Merging into q's weight would also change the output projection / gate reading the same
    # tensor, so merged outputs would silently differ from unmerged ones.
    case = HOSTS["split"]
    model = case.model()
    attn = model.blocks[0].attn
    if shares == "weight":
        setattr(getattr(attn, other), "weight", attn.q_proj.weight)
    else:  # a separate Parameter over the same memory
        getattr(attn, other).weight = torch.nn.Parameter(attn.q_proj.weight.data)
    inject_serial_lora(model, SerialLoraConfig(rank=4, alpha=6.0))
    randomize_adapters(model, seed=8, std=0.25)
    inputs = case.inputs()
    unmerged = run(model, inputs)
    before = snapshot(model)
    with pytest.raises(SerialLoraError, match="tied weights") as error:
        merge_serial_lora(model)
    assert "'blocks.0.attn.q_proj'" in str(error.value) and f"'blocks.0.attn.{other}.weight'" in str(error.value)
    assert not is_merged(model)
    assert_unchanged(model, before)
    assert torch.equal(run(model, inputs), unmerged)


def test_one_weight_under_two_projections_of_a_stream_merges_once_and_unmerges_bit_for_bit():
    case = HOSTS["split"]
    model = case.model()
    for block in model.blocks:
        block.attn.k_proj.weight = block.attn.q_proj.weight  # q and k tied within each attention
    inject_serial_lora(model, SerialLoraConfig(rank=4, alpha=6.0))
    randomize_adapters(model, seed=8, std=0.25)
    inputs = case.inputs()
    before = snapshot(model)
    unmerged = run(model, inputs)
    merge_serial_lora(model)
    torch.testing.assert_close(run(model, inputs), unmerged, rtol=0, atol=1e-5)
    unmerge_serial_lora(model)
    assert_unchanged(model, before)


def test_a_projection_layer_shared_by_two_attentions_is_refused_at_injection():
    case = HOSTS["fused"]
    model = case.model()
    model.blocks[1].attn.qkv = model.blocks[0].attn.qkv
    before = snapshot(model)
    with pytest.raises(SerialLoraError, match="same layer") as error:
        inject_serial_lora(model, SerialLoraConfig(rank=2))
    assert "'blocks.1.attn.qkv'" in str(error.value) and "'blocks.0.attn.qkv'" in str(error.value)
    assert_unchanged(model, before)


# ------------------------------------------------------------------------------------- all-or-nothing merge
def _fail_second_module_merge(monkeypatch):
    calls = []
    original = SerialLoraAttention.merge

    def merge(self, scale=1.0):
        calls.append(self)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return original(self, scale)

    monkeypatch.setattr(SerialLoraAttention, "merge", merge)


def _fail_second_weight_write(monkeypatch):
    original = torch.Tensor.copy_
    calls = [0]

    def copy_(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "copy_", copy_)


@pytest.mark.parametrize("fail", [_fail_second_module_merge, _fail_second_weight_write],
                         ids=["second_module", "second_weight_in_a_module"])
def test_merge_rolls_back_on_any_exception(fail, monkeypatch):
    case = HOSTS["split"]
    model = adapted_model(case)
    inputs = case.inputs()
    unmerged = run(model, inputs)
    before = snapshot(model)
    with monkeypatch.context() as patch:
        fail(patch)
        with pytest.raises(RuntimeError, match="out of memory"):
            merge_serial_lora(model)
    assert not is_merged(model)
    assert_unchanged(model, before)
    assert torch.equal(run(model, inputs), unmerged)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), 1e300], ids=["nan", "inf", "1e300"])
def test_merge_refuses_a_scale_beyond_float32(scale):
    model = adapted_model(HOSTS["fused"])
    before = snapshot(model)
    with pytest.raises(ValueError, match="scale="):
        merge_serial_lora(model, scale=scale)
    assert_unchanged(model, before)
