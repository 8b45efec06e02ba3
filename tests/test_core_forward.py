"""Serial LoRA's forward pass on every host layout: identity at init, x -> W(I + s·B·A)x by hand,
once per stream per forward, and nothing but q/k/v sees the adapted x."""

from __future__ import annotations

import copy
import inspect
import math
import re

import pytest
import torch
import torch.nn.functional as F

from core_models import (
    DTYPES,
    HOSTS,
    TOLERANCE,
    JointModel,
    attend,
    hand_merged_reference,
    host_registered,
    randomize_adapters,
    run,
)
from serial_lora_core import (
    SerialLoraConfig,
    SerialLoraError,
    StreamAdapter,
    disable_serial_lora,
    enable_serial_lora,
    inject_serial_lora,
    serial_lora_modules,
    set_serial_lora_scale,
    set_serial_lora_scales,
)

SHAPES = ["BNC", "BHWC"]


def as_double(inputs: tuple) -> tuple:
    return tuple(t.double() for t in inputs)


def assert_close_to_reference(out: torch.Tensor, reference: torch.Tensor, base: torch.Tensor, dtype: torch.dtype) -> None:
    tolerance = TOLERANCE[dtype]
    error = (out.double() - reference).abs().max().item()
    effect = (out.double() - base.double()).abs().max().item()
    assert error <= tolerance, f"output differs from W(I + sBA)x by {error} (tolerance {tolerance})"
    # The comparison would be vacuous if the adapter barely changed the output.
    assert effect > 2 * tolerance, f"the adapter changed the output by only {effect}"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_zero_init_adapter_is_the_base_model(case, dtype, shape):
    model = case.model(dtype)
    inputs = case.inputs(shape, dtype)
    base = run(model, inputs)
    wrapped = inject_serial_lora(model, SerialLoraConfig(rank=4, alpha=7.0))
    assert sorted(wrapped) == ["blocks.0.attn", "blocks.1.attn"]
    for module in wrapped.values():
        for adapter in module["default"].values():
            assert torch.count_nonzero(adapter.up.weight) == 0
            assert torch.count_nonzero(adapter.down.weight) > 0
    assert torch.equal(run(model, inputs), base)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_output_is_w_times_identity_plus_sba_by_hand(case, dtype, shape):
    model = case.model(dtype)
    inputs = case.inputs(shape, dtype)
    base = run(model, inputs)
    inject_serial_lora(model, SerialLoraConfig(rank=4, alpha=6.0))
    randomize_adapters(model, seed=3)
    reference = hand_merged_reference(case.model(dtype), model, {"default": 6.0 / 4})
    assert_close_to_reference(run(model, inputs), run(reference, as_double(inputs)), base, dtype)


# name -> ([(adapter name, config, strength set with set_serial_lora_scale or None)], hand-computed s·w per adapter)
CONFIGS = {
    "alpha_equals_rank": ([("default", SerialLoraConfig(rank=4), None)], {"default": 1.0}),
    "alpha_not_rank": ([("default", SerialLoraConfig(rank=4, alpha=10.0), None)], {"default": 2.5}),
    "rslora": ([("default", SerialLoraConfig(rank=4, alpha=3.0, use_rslora=True), None)], {"default": 3.0 / 2.0}),
    "gaussian_init_rank1": ([("default", SerialLoraConfig(rank=1, alpha=0.5, init="gaussian"), None)], {"default": 0.5}),
    "two_adapters_weighted_sum": (
        [("a", SerialLoraConfig(rank=2, alpha=3.0), 0.7), ("b", SerialLoraConfig(rank=4, alpha=8.0, use_rslora=True), -1.3)],
        {"a": 0.7 * 3.0 / 2, "b": -1.3 * 8.0 / math.sqrt(4)},
    ),
}


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_output_matches_hand_formula_for_configs(case, config_name):
    adapters, strengths = CONFIGS[config_name]
    model = case.model()
    inputs = case.inputs()
    base = run(model, inputs)
    for adapter_name, config, strength in adapters:
        inject_serial_lora(model, config, adapter_name)
        if strength is not None:
            set_serial_lora_scale(model, strength, adapter_name)
    randomize_adapters(model, seed=5)
    reference = hand_merged_reference(case.model(), model, strengths)
    assert_close_to_reference(run(model, inputs), run(reference, as_double(inputs)), base, torch.float32)


def test_adapter_dtype_may_differ_from_the_model(case):
    model = case.model(torch.bfloat16)
    inputs = case.inputs(dtype=torch.bfloat16)
    base = run(model, inputs)
    inject_serial_lora(model, SerialLoraConfig(rank=3, alpha=4.5, dtype="float32"))
    for _, module in serial_lora_modules(model):
        for adapter in module["default"].values():
            assert adapter.down.weight.dtype == adapter.up.weight.dtype == torch.float32
    randomize_adapters(model, seed=9)
    out = run(model, inputs)
    assert out.dtype == torch.bfloat16
    reference = hand_merged_reference(case.model(torch.bfloat16), model, {"default": 1.5})
    assert_close_to_reference(out, run(reference, as_double(inputs)), base, torch.bfloat16)


def _bind(module, args, kwargs) -> dict:
    return inspect.signature(module.forward).bind(*args, **kwargs).arguments


def _capture(model, case):
    """Hooks (registered before injection, so they run first) recording each attention's original
    stream inputs and every projection's input and output."""
    seen = {"inputs": {}, "calls": {}}
    for name, module in model.named_modules():
        if name.endswith("attn"):
            def pre(module, args, kwargs, name=name):
                seen["inputs"][name] = {k: v.detach().clone() for k, v in _bind(module, args, kwargs).items()}
            module.register_forward_pre_hook(pre, with_kwargs=True)
            for path in [p for projections, _ in case.streams.values() for p in projections] + list(case.output_projections):
                def post(layer, args, output, key=f"{name}.{path}"):
                    seen["calls"][key] = (args[0].detach().clone(), output.detach().clone())
                module.get_submodule(path).register_forward_hook(post)
    return seen


PER_PROJECTION_HOSTS = ["fused", "split", "joint"]  # the functional host never calls its projection


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("host", PER_PROJECTION_HOSTS)
def test_each_projection_gets_w_times_identity_plus_sba(host, dtype, shape):
    case = HOSTS[host]
    model = case.model(dtype)
    inputs = case.inputs(shape, dtype)
    seen = _capture(model, case)
    inject_serial_lora(model, SerialLoraConfig(rank=4, alpha=2.0, use_rslora=True))
    randomize_adapters(model, seed=11)
    run(model, inputs)
    s = 2.0 / math.sqrt(4)
    checked = 0
    for attention, module in serial_lora_modules(model):
        originals = list(seen["inputs"][attention].values())
        for (stream, (projections, features)), x in zip(case.streams.items(), originals):
            adapter = module["default"][stream]
            x64 = x.double()
            adapted = x64 + s * (x64 @ adapter.down.weight.double().T) @ adapter.up.weight.double().T
            assert x.shape[-1] == features
            for path in projections:
                layer = module.attention.get_submodule(path)
                got_input, got_output = seen["calls"][f"{attention}.{path}"]
                bias = None if layer.bias is None else layer.bias.double()
                expected = F.linear(adapted, layer.weight.double(), bias)
                tolerance = TOLERANCE[dtype] * max(1.0, expected.abs().max().item())
                assert (got_output.double() - expected).abs().max() <= tolerance, f"{attention}.{path}"
                assert (got_input.double() - adapted).abs().max() <= tolerance, f"{attention}.{path} input"
                checked += 1
    assert checked == 2 * sum(len(p) for p, _ in case.streams.values())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("host", PER_PROJECTION_HOSTS)
def test_output_projection_gate_and_residual_see_the_original_x(host, shape):
    case = HOSTS[host]
    model = case.model()
    inputs = case.inputs(shape)
    seen = _capture(model, case)
    outputs = {}
    for name, module in model.named_modules():
        if name.endswith("attn"):
            module.register_forward_hook(lambda m, a, out, name=name: outputs.__setitem__(name, out))
    inject_serial_lora(model, SerialLoraConfig(rank=4))
    randomize_adapters(model, seed=2)
    run(model, inputs)
    for attention, module in serial_lora_modules(model):
        assert not module.attention.get_submodule(case.output_projections[0])._forward_pre_hooks
        x = seen["inputs"][attention]
        calls = {path: seen["calls"][f"{attention}.{path}"] for path in [p for ps, _ in case.streams.values() for p in ps] + list(case.output_projections)}
        if host == "joint":
            image = x["hidden_states"]
            tokens = lambda t: t.reshape(t.shape[0], -1, t.shape[-1])  # noqa: E731
            q, k, v = (torch.cat([tokens(calls[a][1]), tokens(calls[b][1])], dim=1) for a, b in
                       (("to_q", "add_q_proj"), ("to_k", "add_k_proj"), ("to_v", "add_v_proj")))
            expected_attention = attend(q, k, v, 2)
            n = math.prod(image.shape[1:-1])
            torch.testing.assert_close(calls["to_out.0"][0], expected_attention[:, :n].reshape(image.shape), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(calls["to_add_out"][0], expected_attention[:, n:], rtol=1e-5, atol=1e-6)
            assert not torch.equal(calls["to_q"][0], image)
            continue
        x = x["x"]
        if host == "fused":
            q, k, v = calls["qkv"][1].reshape(x.shape[0], -1, 3 * x.shape[-1]).chunk(3, dim=-1)
            out_path = "proj"
        else:
            q, k, v = (calls[p][1].reshape(x.shape[0], -1, x.shape[-1]) for p in ("q_proj", "k_proj", "v_proj"))
            out_path = "o_proj"
            # The gate reads the untouched x, bit for bit, and the residual adds the untouched x.
            assert torch.equal(calls["gate"][0], x)
            assert torch.equal(outputs[attention], calls["o_proj"][1] + calls["gate"][1] + x)
            assert not torch.equal(calls["q_proj"][0], x)
        torch.testing.assert_close(calls[out_path][0], attend(q, k, v, 2).reshape(x.shape), rtol=1e-5, atol=1e-6)


def _count_down_calls(model, monkeypatch) -> dict:
    """Calls of each adapter's low-rank path (its `_add_to`), by (attention, adapter, stream)."""
    counts, keys = {}, {}
    for attention, module in serial_lora_modules(model):
        for adapter_name, adapters in module.items():
            for stream, adapter in adapters.items():
                keys[id(adapter)] = (attention, adapter_name, stream)
                counts[keys[id(adapter)]] = 0
    original = StreamAdapter._add_to

    def counting(self, base, x, dtype):
        counts[keys[id(self)]] += 1
        return original(self, base, x, dtype)

    monkeypatch.setattr(StreamAdapter, "_add_to", counting)
    return counts


def test_adapter_runs_once_per_stream_per_forward(case, monkeypatch):
    model = case.model()
    inputs = case.inputs("BHWC")
    inject_serial_lora(model, SerialLoraConfig(rank=2), "first")
    inject_serial_lora(model, SerialLoraConfig(rank=3), "second")
    randomize_adapters(model)
    counts = _count_down_calls(model, monkeypatch)
    add_to_calls = []
    original_add_to = StreamAdapter.add_to
    monkeypatch.setattr(StreamAdapter, "add_to", lambda self, base, x: add_to_calls.append(self) or original_add_to(self, base, x))
    expected_keys = {(f"blocks.{i}.attn", a, s) for i in range(2) for a in ("first", "second") for s in case.streams}
    assert set(counts) == expected_keys
    first = run(model, inputs)
    assert set(counts.values()) == {1}
    assert len(add_to_calls) == len(expected_keys)
    # A second forward recomputes (no stale cache) and gives the same result.
    second = run(model, inputs)
    assert set(counts.values()) == {2}
    assert torch.equal(first, second)
    # Another input through the same model is not served from the previous forward's cache.
    other = case.inputs("BHWC", seed=7)
    monkeypatch.setattr(StreamAdapter, "add_to", original_add_to)
    reference = hand_merged_reference(case.model(), model, {"first": 1.0, "second": 1.0})
    torch.testing.assert_close(run(model, other).double(), run(reference, as_double(other)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("host", list(HOSTS))
def test_dropout_only_in_train_mode_and_only_on_the_adapter_input(host):
    case = HOSTS[host]
    with host_registered(case):
        model = case.model()
        inputs = case.inputs()
        inject_serial_lora(model, SerialLoraConfig(rank=4, dropout=0.5))
        randomize_adapters(model, seed=4)
        dropped = {}
        for attention, module in serial_lora_modules(model):
            for stream, adapter in module["default"].items():
                assert isinstance(adapter.dropout, torch.nn.Dropout) and adapter.dropout.p == 0.5
                adapter.dropout.register_forward_hook(
                    lambda m, args, out, key=(attention, stream): dropped.__setitem__(key, (args[0].clone(), out.clone())))
        projection_inputs = {}
        for attention, module in serial_lora_modules(model):
            first_projection = module.attention.get_submodule(case.streams[next(iter(case.streams))][0][0])
            first_projection.register_forward_hook(
                lambda m, args, out, key=attention: projection_inputs.__setitem__(key, args[0].clone()))

        eval_out = run(model, inputs)
        for x, h in dropped.values():
            assert torch.equal(x, h)  # eval: dropout is the identity
        assert torch.equal(run(model, inputs), eval_out)
        reference = hand_merged_reference(case.model(), model, {"default": 1.0})
        torch.testing.assert_close(eval_out.double(), run(reference, as_double(inputs)), rtol=0, atol=1e-5)

        model.train()
        torch.manual_seed(0)
        train_out = run(model, inputs)
        assert not torch.equal(train_out, eval_out)
        for (attention, stream), (x, h) in dropped.items():
            kept = h != 0
            # Inverted dropout: each element is dropped or scaled by 1/(1-p); some of each.
            assert 0 < kept.sum() < h.numel()
            torch.testing.assert_close(h[kept], x[kept] * 2.0)
            if host in ("fused", "split") and stream == "input":
                # The projection sees x + s·B·A·dropout(x): the skip path keeps the undropped x.
                adapter = model.get_submodule(attention).serial_lora["default"][stream]
                expected = x + (h @ adapter.down.weight.T) @ adapter.up.weight.T
                torch.testing.assert_close(projection_inputs[attention], expected, rtol=1e-5, atol=1e-5)
        model.eval()
        assert torch.equal(run(model, inputs), eval_out)


def test_cross_attention_is_never_adapted():
    torch.manual_seed(0)
    model = JointModel(cross_attention=True)
    wrapped = inject_serial_lora(model, SerialLoraConfig(rank=2))
    assert sorted(wrapped) == ["blocks.0.attn", "blocks.1.attn"]
    assert not hasattr(model.cross, "serial_lora")


@pytest.mark.parametrize(
    "config, expected",
    [
        (SerialLoraConfig(rank=2, target_modules=r"blocks\.1\."), {"blocks.1.attn": {"image", "text"}}),
        (SerialLoraConfig(rank=2, streams="text"), {"blocks.0.attn": {"text"}, "blocks.1.attn": {"text"}}),
        (SerialLoraConfig(rank=2, target_modules=["blocks.0", "nothing"], streams=("image",)), {"blocks.0.attn": {"image"}}),
    ],
    ids=["target_modules", "streams", "both"],
)
def test_target_modules_and_streams_select_what_is_adapted(config, expected):
    case = HOSTS["joint"]
    model = case.model()
    inputs = case.inputs()
    wrapped = inject_serial_lora(model, config)
    assert {name: set(m["default"]) for name, m in wrapped.items()} == expected
    randomize_adapters(model, seed=1)
    reference = hand_merged_reference(case.model(), model, {"default": 1.0})
    torch.testing.assert_close(run(model, inputs).double(), run(reference, as_double(inputs)), rtol=0, atol=1e-5)


def test_module_tree_and_state_dict_keys_are_kept(case):
    model = case.model()
    before_keys = list(model.state_dict())
    before_modules = {name: type(m) for name, m in model.named_modules()}
    inject_serial_lora(model, SerialLoraConfig(rank=2), "style")
    after = model.state_dict()
    new_keys = [k for k in after if k not in before_keys]
    assert [k for k in after if k in before_keys] == before_keys
    assert sorted(new_keys) == sorted(
        f"blocks.{i}.attn.serial_lora.style.{s}.{part}.weight" for i in range(2) for s in case.streams for part in ("down", "up"))
    for name, kind in before_modules.items():
        assert type(model.get_submodule(name)) is kind if name else True


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_scale_zero_and_disable_give_the_base_model(case, dtype):
    model = case.model(dtype)
    inputs = case.inputs(dtype=dtype)
    base = run(model, inputs)
    inject_serial_lora(model, SerialLoraConfig(rank=4))
    randomize_adapters(model, seed=6)
    adapted = run(model, inputs)
    assert not torch.equal(adapted, base)

    disable_serial_lora(model)
    assert torch.equal(run(model, inputs), base)
    enable_serial_lora(model)
    assert torch.equal(run(model, inputs), adapted)

    set_serial_lora_scale(model, 0.0)
    assert torch.equal(run(model, inputs), base)
    set_serial_lora_scale(model, 1)
    assert torch.equal(run(model, inputs), adapted)
    if dtype == torch.float32:
        set_serial_lora_scale(model, -2.5)
        reference = hand_merged_reference(case.model(dtype), model, {"default": -2.5})
        torch.testing.assert_close(run(model, inputs).double(), run(reference, as_double(inputs)), rtol=0, atol=1e-5)


def test_scale_of_one_adapter_leaves_the_other():
    case = HOSTS["split"]
    model = case.model()
    inputs = case.inputs()
    inject_serial_lora(model, SerialLoraConfig(rank=2), "a")
    randomize_adapters(model, seed=1, adapter_name="a")
    only_a = run(model, inputs)
    inject_serial_lora(model, SerialLoraConfig(rank=2), "b")
    randomize_adapters(model, seed=2, adapter_name="b")
    assert not torch.equal(run(model, inputs), only_a)
    set_serial_lora_scale(model, 0.0, "b")
    assert torch.equal(run(model, inputs), only_a)


@pytest.mark.parametrize(("scales", "words"), [
    ({"a": 0.25, "b": 1e38}, "1e+38 times the adapter's scaling 10"),  # b's alpha/r = 10 overflows only times it
    ({"a": 0.25, "b": float("nan")}, "scale=nan"),
    ({"a": 0.25, "missing": 1.0}, "'missing'"),
])
def test_set_scales_checks_every_adapter_before_changing_any(scales, words):
    case = HOSTS["split"]
    model = case.model()
    inject_serial_lora(model, SerialLoraConfig(rank=2, alpha=2.0), "a")
    inject_serial_lora(model, SerialLoraConfig(rank=2, alpha=20.0), "b")
    randomize_adapters(model, seed=3)
    inputs = case.inputs()
    before = run(model, inputs)
    with pytest.raises((ValueError, SerialLoraError), match=re.escape(words)):
        set_serial_lora_scales(model, scales)
    assert {a.scale for _, m in serial_lora_modules(model) for ad in m.values() for a in ad.values()} == {1.0}
    assert torch.equal(run(model, inputs), before)
    set_serial_lora_scales(model, {"a": 0.0, "b": 0.5})
    assert {(n, a.scale) for _, m in serial_lora_modules(model) for n, ad in m.items() for a in ad.values()} == {
        ("a", 0.0), ("b", 0.5)}


def test_deepcopy_of_an_adapted_model_is_independent(case):
    model = case.model()
    inputs = case.inputs()
    inject_serial_lora(model, SerialLoraConfig(rank=2))
    randomize_adapters(model, seed=1)
    original = run(model, inputs)
    clone = copy.deepcopy(model)
    assert torch.equal(run(clone, inputs), original)
    randomize_adapters(clone, seed=2)
    disable_serial_lora(model)
    # The clone's hooks drive the clone's adapters, not the original's.
    reference = hand_merged_reference(case.model(), clone, {"default": 1.0})
    torch.testing.assert_close(run(clone, inputs).double(), run(reference, as_double(inputs)), rtol=0, atol=1e-5)
    enable_serial_lora(model)
    assert torch.equal(run(model, inputs), original)


def test_argument_host_adapts_a_keyword_argument_too():
    case = HOSTS["functional"]
    with host_registered(case):
        model = case.model()
        inject_serial_lora(model, SerialLoraConfig(rank=2))
        randomize_adapters(model, seed=3)
        attention = model.blocks[0].attn
        (x,) = case.inputs()
        with torch.no_grad():
            positional, keyword = attention(x), attention(x=x)
            disable_serial_lora(model)
            base = attention(x)
        assert torch.equal(positional, keyword)
        assert not torch.equal(positional, base)


@pytest.mark.parametrize(
    "x_dtype, adapter_dtype, autocast",
    [
        (torch.float32, torch.float32, True),  # float32 activations under bf16 autocast: the cast copies
        (torch.bfloat16, torch.float32, False),  # bf16 model, float32 adapter: the cast copies
        (torch.float32, torch.float32, False),  # no cast, so nothing may be written in place
    ],
)
def test_no_grad_path_equals_the_autograd_path_and_leaves_x_alone(x_dtype, adapter_dtype, autocast):
    torch.manual_seed(0)
    adapter = StreamAdapter(features=16, rank=4, scaling=0.5, dtype=adapter_dtype)
    torch.nn.init.normal_(adapter.up.weight)
    x = torch.randn(3, 5, 16, dtype=x_dtype)
    snapshot = x.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with torch.no_grad():
            inference = adapter(x)
        training = adapter(x)
    assert training.requires_grad and not inference.requires_grad
    assert torch.equal(x, snapshot)
    torch.testing.assert_close(inference, training.detach(), rtol=0, atol=0)
    exact = x.double() + 0.5 * (x.double() @ adapter.down.weight.double().t()) @ adapter.up.weight.double().t()
    tolerance = 2e-2 if torch.bfloat16 in (x_dtype, inference.dtype) else 1e-5
    torch.testing.assert_close(inference.double(), exact, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize(
    ("alpha", "scale", "error", "words"),
    [
        (4.0, 1e300, ValueError, "scale=1e+300"),
        (40.0, 1e38, ValueError, "1e+38 times the adapter's scaling 10"),  # finite alone, not times alpha/r
        (4.0, float("nan"), ValueError, "scale=nan"),
        (4.0, "0.5", TypeError, "real number"),
        (4.0, True, TypeError, "real number"),
    ],
    ids=["1e300", "overflow_with_scaling", "nan", "string", "bool"],
)
def test_set_scale_refuses_values_beyond_float32_up_front(alpha, scale, error, words):
    case = HOSTS["fused"]
    model = case.model()
    inject_serial_lora(model, SerialLoraConfig(rank=4, alpha=alpha))
    randomize_adapters(model, seed=1)
    set_serial_lora_scale(model, 0.5)
    inputs = case.inputs()
    before = run(model, inputs)
    with pytest.raises(error, match=re.escape(words)):
        set_serial_lora_scale(model, scale)
    assert {a.scale for _, m in serial_lora_modules(model) for a in m["default"].values()} == {0.5}
    assert torch.equal(run(model, inputs), before)


def test_scaling_is_alpha_over_r_and_scale_is_the_user_knob():
    model = HOSTS["fused"].model()
    inject_serial_lora(model, SerialLoraConfig(rank=4, alpha=6.0))
    set_serial_lora_scale(model, 0.25)
    adapter = model.blocks[0].attn.serial_lora["default"]["input"]
    assert (adapter.scaling, adapter.scale, adapter.factor) == (1.5, 0.25, 0.375)
    assert "scaling=1.5, scale=0.25" in repr(adapter)
    randomize_adapters(model, seed=2)
    weight = model.blocks[0].attn.qkv.weight
    expected = 0.375 * (weight.double() @ adapter.up.weight.double()) @ adapter.down.weight.double()
    torch.testing.assert_close(adapter.projection_delta(weight).double(), expected, rtol=1e-5, atol=1e-6)


def test_adapted_input_formula_equals_the_fused_adapter_forward():
    """formula.adapted_input (the plain-tensor form used by fx tracing and ComfyUI's bypass) gives what the
    fused addmm forward gives, with base = x and with another base (stacked adapters)."""
    from serial_lora_core.formula import adapted_input

    torch.manual_seed(3)
    adapter = StreamAdapter(features=16, rank=4, scaling=0.5, dtype=torch.float64)
    adapter.scale = 0.75
    torch.nn.init.normal_(adapter.up.weight)
    x, base = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 5, 16, dtype=torch.float64)
    down, up = adapter.down.weight.detach(), adapter.up.weight.detach()
    by_hand = 0.375 * (x @ down.t()) @ up.t()
    with torch.no_grad():
        torch.testing.assert_close(adapted_input(x, down, up, adapter.factor), x + by_hand, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(adapted_input(x, down, up, adapter.factor), adapter(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(adapter.traceable_add_to(base, x), adapter.add_to(base, x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(adapter.traceable_add_to(base, x), base + by_hand, rtol=1e-12, atol=1e-12)
    assert by_hand.abs().max() > 1e-3  # the comparison would be vacuous for an identity adapter
