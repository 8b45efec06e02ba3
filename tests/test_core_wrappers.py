"""Serial LoRA under the wrappers, replicas, tracers and exporters users put around a model.

compile/DataParallel/DDP/FSDP wrappers are unwrapped on save and load; nn.DataParallel replicas run
their own adapters; torch.jit.script is refused with the deployment path named; torch.fx,
torch.export and ONNX (through torch.export) of an UNMERGED model work and match eager.
"""

from __future__ import annotations

import concurrent.futures
import copy
import importlib

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn

from core_models import HOSTS, assert_unchanged, host_registered, randomize_adapters, run, snapshot
from serial_lora_core import (
    SerialLoraConfig,
    SerialLoraError,
    disable_serial_lora,
    enable_serial_lora,
    inject_serial_lora,
    load_serial_lora,
    merge_and_unload_serial_lora,
    merge_serial_lora,
    save_serial_lora,
    serial_lora_modules,
    unmerge_serial_lora,
    unwrap_model,
)
from serial_lora_core.adapter import StreamAdapter


def adapted(case, model_dtype=torch.float32, seed=0, **config):
    model = case.model(model_dtype, seed=seed)
    inject_serial_lora(model, SerialLoraConfig(**{"rank": 3, "alpha": 4.5, **config}))
    randomize_adapters(model, seed=seed + 1, std=0.3)
    return model


def base_output(model, inputs):
    disable_serial_lora(model)
    try:
        return run(model, inputs)
    finally:
        enable_serial_lora(model)


# ------------------------------------------------------------------------------------- wrappers
@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    """A one-process gloo group on the CPU, for DistributedDataParallel and FSDP."""
    store = tmp_path_factory.mktemp("dist") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _fsdp(model):
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)


WRAPPERS = {
    "compile": (torch.compile, False),
    "data_parallel": (nn.DataParallel, False),
    "ddp": (nn.parallel.DistributedDataParallel, True),
    "fsdp": (_fsdp, True),
    "compile_of_ddp": (lambda m: torch.compile(nn.parallel.DistributedDataParallel(m)), True),
}


@pytest.fixture(params=list(WRAPPERS))
def wrap(request):
    function, distributed = WRAPPERS[request.param]
    if distributed:
        request.getfixturevalue("process_group")
    return function


def file_keys(path) -> list[str]:
    with safe_open(str(path), "pt") as handle:
        return sorted(handle.keys())


def test_unwrap_model_finds_the_plain_model(wrap):
    model = adapted(HOSTS["fused"])
    assert unwrap_model(model) is model
    assert unwrap_model(wrap(model)) is model


def test_save_through_a_wrapper_writes_the_plain_model(wrap, tmp_path):
    case = HOSTS["split"]
    model = adapted(case)
    expected = run(model, case.inputs())
    save_serial_lora(model, tmp_path / "plain.safetensors")
    save_serial_lora(wrap(model), tmp_path / "wrapped.safetensors")
    assert file_keys(tmp_path / "wrapped.safetensors") == file_keys(tmp_path / "plain.safetensors")
    assert all(k.startswith("blocks.") for k in file_keys(tmp_path / "wrapped.safetensors"))
    with safe_open(str(tmp_path / "wrapped.safetensors"), "pt") as handle:
        assert handle.metadata()["architecture"] == "TinyViT"
    # The plain model and a wrapped fresh model both load it.
    for target in (case.model(), wrap(case.model())):
        load_serial_lora(target, tmp_path / "wrapped.safetensors")
        torch.testing.assert_close(run(unwrap_model(target), case.inputs()), expected, rtol=0, atol=0)


def _wrap_blocks(model, kind):
    if kind == "fsdp_auto_wrap":  # as accelerate's FSDP with a transformer-layer wrap policy does
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        return FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True,
                                        auto_wrap_policy=ModuleWrapPolicy({type(model.blocks[0])}))
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    wrap = torch.compile if kind == "compiled_blocks" else checkpoint_wrapper
    for index, block in enumerate(model.blocks):
        model.blocks[index] = wrap(block)
    return model


@pytest.mark.parametrize("kind", ["compiled_blocks", "checkpointed_blocks", "fsdp_auto_wrap"])
def test_wrappers_inside_the_model_are_left_out_of_file_keys(kind, request, tmp_path):
    # Their segments (`_orig_mod`, `_checkpoint_wrapped_module`, `_fsdp_wrapped_module`) sit inside
    # module paths; keys carrying them were refused by the plain model.
    if kind == "fsdp_auto_wrap":
        request.getfixturevalue("process_group")
    case = HOSTS["fused"]
    model = adapted(case)
    expected = run(model, case.inputs())
    wrapped = _wrap_blocks(model, kind)
    save_serial_lora(wrapped, tmp_path / "adapter.safetensors")
    assert file_keys(tmp_path / "adapter.safetensors") == sorted(
        f"blocks.{n}.attn.serial_lora.input.{part}.weight" for n in range(2) for part in ("down", "up"))
    for target in (case.model(), _wrap_blocks(case.model(), kind)):
        load_serial_lora(target, tmp_path / "adapter.safetensors")
        torch.testing.assert_close(run(unwrap_model(target), case.inputs()), expected, rtol=1e-6, atol=1e-6)


def test_a_compiled_model_merged_after_running_stays_exact():
    # The graph compiled before the merge ran the adapters on top of the merged weights (twice).
    case = HOSTS["split"]
    model = adapted(case)
    inputs = case.inputs()
    expected = run(model, inputs)
    compiled = torch.compile(model)
    torch.testing.assert_close(run(compiled, inputs), expected, rtol=1e-5, atol=1e-5)
    merge_serial_lora(compiled)
    torch.testing.assert_close(run(compiled, inputs), expected, rtol=1e-5, atol=1e-5)
    unmerge_serial_lora(compiled)
    torch.testing.assert_close(run(compiled, inputs), expected, rtol=1e-5, atol=1e-5)
    merge_and_unload_serial_lora(model)
    torch.testing.assert_close(run(compiled, inputs), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("wrapper", ["data_parallel", "ddp", "fsdp"])
def test_wrapped_model_runs_the_adapters(wrapper, request):
    function, distributed = WRAPPERS[wrapper]
    if distributed:
        request.getfixturevalue("process_group")
    case = HOSTS["joint"]
    model = adapted(case)
    inputs = case.inputs()
    expected = run(model, inputs)
    assert not torch.allclose(base_output(model, inputs), expected)
    torch.testing.assert_close(run(function(model), inputs), expected, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------- replicas
@pytest.fixture
def cpu_replicate(monkeypatch):
    """torch.nn.parallel.replicate on the CPU: its own module wiring, with the GPU broadcast replaced
    by a copy per replica (what nn.DataParallel does on GPUs)."""
    replicate_module = importlib.import_module("torch.nn.parallel.replicate")
    monkeypatch.setattr(replicate_module, "_get_device_index", lambda device, optional=False: device)
    monkeypatch.setattr(replicate_module, "_broadcast_coalesced_reshape",
                        lambda tensors, devices, detach=False: [[t.detach().clone() for t in tensors] for _ in devices])
    return replicate_module.replicate


def test_each_replica_runs_its_own_adapters(case, cpu_replicate):
    model = adapted(case)
    inputs = case.inputs()
    original = run(model, inputs)
    replicas = cpu_replicate(model, [0, 1])
    expected = copy.deepcopy(model)
    with torch.no_grad():
        for changed in (replicas[1], expected):
            for module in changed.modules():
                if isinstance(module, StreamAdapter):
                    module.up.weight.mul_(-2.0)
    changed_output = run(expected, inputs)
    assert not torch.allclose(changed_output, original)
    assert torch.equal(run(replicas[0], inputs), original)
    assert torch.equal(run(replicas[1], inputs), changed_output)
    assert torch.equal(run(model, inputs), original)  # the original still runs its own adapters
    # As nn.DataParallel runs them: concurrently, in threads (each replica has its own per-call cache).
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for _ in range(5):
            first, second = pool.map(lambda replica: run(replica, inputs), replicas)
            assert torch.equal(first, original) and torch.equal(second, changed_output)


# ------------------------------------------------------------------------------------- tracers and exporters
def test_torch_jit_script_is_refused_naming_the_deployment_path(case):
    model = adapted(case)
    with pytest.raises(SerialLoraError, match="merge_and_unload_serial_lora"):
        torch.jit.script(model)


TRACEABLE = ["fused", "split", "functional"]  # the joint test model itself unpacks a tuple, which fx cannot


@pytest.mark.parametrize("host", TRACEABLE)
def test_torch_fx_symbolic_trace_matches_eager(host):
    with host_registered(HOSTS[host]) as case:
        model = adapted(case)
        inputs = case.inputs()
        eager = run(model, inputs)
        traced = torch.fx.symbolic_trace(model)
        torch.testing.assert_close(run(traced, inputs), eager, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(base_output(model, inputs), eager)


# (model dtype, adapter dtype): float32, and a bfloat16 model with float32 adapters whose
# inference path writes into the cast input in place.
EXPORT_DTYPES = {"fp32": (torch.float32, None), "bf16_model_fp32_adapter": (torch.bfloat16, "float32")}


@pytest.mark.parametrize("dtypes", list(EXPORT_DTYPES))
@pytest.mark.parametrize("host", TRACEABLE)
def test_torch_export_of_the_unmerged_model_matches_eager(host, dtypes):
    dtype, adapter_dtype = EXPORT_DTYPES[dtypes]
    with host_registered(HOSTS[host]) as case:
        model = adapted(case, dtype, dtype=adapter_dtype)
        model.requires_grad_(False)
        inputs = case.inputs(dtype=dtype)
        eager = run(model, inputs)
        program = torch.export.export(model, inputs)
        torch.testing.assert_close(run(program.module(), inputs), eager, rtol=0, atol=0)
        assert not torch.allclose(base_output(model, inputs), eager)


def test_onnx_export_through_torch_export_matches_eager():
    import onnx
    from onnx.reference import ReferenceEvaluator
    with host_registered(HOSTS["functional"]) as case:
        model = adapted(case)
        inputs = case.inputs()
        eager = run(model, inputs)
        proto = torch.onnx.export(model, inputs, dynamo=True, verbose=False).model_proto
        onnx.checker.check_model(proto)
        (output,) = ReferenceEvaluator(proto).run(None, {proto.graph.input[0].name: inputs[0].numpy()})
        torch.testing.assert_close(torch.from_numpy(output), eager, rtol=1e-5, atol=1e-5)


def test_peft_wrapped_projections_are_refused_naming_them(case):
    from peft import LoraConfig, get_peft_model

    first = case.streams[next(iter(case.streams))][0][0]
    peft_model = get_peft_model(case.model(), LoraConfig(r=2, target_modules=rf".*blocks\.0\.attn\.{first}"))
    before = snapshot(peft_model)
    with pytest.raises(SerialLoraError, match="merge_and_unload") as error:
        inject_serial_lora(peft_model, SerialLoraConfig(rank=2))
    assert f"blocks.0.attn.{first}" in str(error.value)
    assert_unchanged(peft_model, before)
    plain = peft_model.merge_and_unload()
    assert sorted(inject_serial_lora(plain, SerialLoraConfig(rank=2))) == ["blocks.0.attn", "blocks.1.attn"]
    assert len(list(serial_lora_modules(plain))) == 2


def test_compile_and_export_leave_the_triton_kernel_to_eager(monkeypatch):
    """Where the kernel would run (device check and size threshold patched to say so), tracers take the
    PyTorch path: a kernel launch cannot be traced."""
    from serial_lora_core import adapter as adapter_module

    calls = []
    monkeypatch.setattr(adapter_module, "TRITON_MIN_ELEMENTS", 0)
    monkeypatch.setattr(adapter_module, "triton_device", lambda device: True)
    monkeypatch.setattr(adapter_module, "load_triton_kernel",
                        lambda: type("Kernel", (), {"adapted_input": staticmethod(lambda x, *_: calls.append(x) or x)}))
    case = HOSTS["fused"]
    model = adapted(case, torch.float16)
    model.requires_grad_(False)
    inputs = case.inputs(dtype=torch.float16)
    run(model, inputs)
    assert len(calls) == 2  # eager: one kernel call per block
    torch.export.export(model, inputs)
    run(torch.compile(model, backend="aot_eager", fullgraph=True), inputs)
    assert len(calls) == 2
