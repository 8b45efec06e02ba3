"""The ComfyUI node pack, in the REAL ComfyUI 0.30.0 (third_party/ComfyUI, or $SERIAL_LORA_COMFYUI).

ComfyUI runs once, in a subprocess (tests/comfyui_driver.py), for the whole module: it loads the
pack as a clone in custom_nodes/ and through `python -m comfyui_nodes.link`, runs graphs where the
Serial LoRA loader feeds a KSampler (also in ComfyUI's bypass mode), goes through ComfyUI's lowvram
prefetch and lowvram loading, exports standard LoRAs (also while a patched clone is loaded) for the
stock LoraLoader and diffusers, and writes the patched weights; the tests below check them against
the formula and against the diffusers side (the core's merge on the same file and the same tiny
SD3 transformer).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import load_file, save_file

from serial_lora_core import (
    SerialLoraConfig,
    inject_serial_lora,
    merge_serial_lora,
    read_file,
    save_serial_lora,
    serial_lora_parameters,
    unmerge_serial_lora,
)
from serial_lora_core.format import write_file

REPO = Path(__file__).resolve().parents[1]
# ComfyUI infers an SD3 model's depth from its weights and needs hidden size = 64 x depth.
JOINT_DIM, POOLED_DIM = 32, 64
TINY = dict(num_layers=2, attention_head_dim=64, num_attention_heads=2, in_channels=16, out_channels=16,
            pos_embed_max_size=32, sample_size=32, patch_size=2, joint_attention_dim=JOINT_DIM,
            caption_projection_dim=128, pooled_projection_dim=POOLED_DIM, dual_attention_layers=(0,))
STRENGTHS = {"s0.8": 0.8, "s0.3": 0.3, "s0": 0.0}


def tiny_transformer(seed: int = 0, **overrides) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    return SD3Transformer2DModel(**{**TINY, **overrides}).eval()


def adapter_for(transformer: SD3Transformer2DModel, path: Path, seed: int = 1) -> None:
    inject_serial_lora(transformer, SerialLoraConfig(rank=4, alpha=8))
    torch.manual_seed(seed)
    for parameter in serial_lora_parameters(transformer):
        torch.nn.init.normal_(parameter, std=0.02)
    save_serial_lora(transformer, path)


def comfy_fused(transformer: SD3Transformer2DModel) -> dict[str, torch.Tensor]:
    """The transformer's q,k,v weights under ComfyUI's MMDiT names (written out by hand, independently
    of the pack's key mapping)."""
    out = {}
    for n, block in enumerate(transformer.transformer_blocks):
        groups = {"x_block.attn": (block.attn, ("to_q", "to_k", "to_v")),
                  "context_block.attn": (block.attn, ("add_q_proj", "add_k_proj", "add_v_proj"))}
        if getattr(block, "attn2", None) is not None:
            groups["x_block.attn2"] = (block.attn2, ("to_q", "to_k", "to_v"))
        for name, (attn, projections) in groups.items():
            out[f"diffusion_model.joint_blocks.{n}.{name}.qkv.weight"] = torch.cat(
                [getattr(attn, p).weight.detach().float() for p in projections])
    return out


def tiny_text_encoder() -> torch.nn.Module:
    """`text_model.encoder.layers.N.self_attn.{q,k,v,out}_proj` (HF CLIP's layout), 2 layers of width 32."""
    layers = torch.nn.ModuleList()
    for _ in range(2):
        layer = torch.nn.Module()
        layer.self_attn = torch.nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(layer.self_attn, name, torch.nn.Linear(32, 32))
        layers.append(layer)
    root = torch.nn.Module()
    root.text_model = torch.nn.Module()
    root.text_model.encoder = torch.nn.Module()
    root.text_model.encoder.layers = layers
    return root


def formula(base: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale·(W B) A, on the fused weight."""
    return base + scale * (base @ up.float()) @ down.float()


@pytest.fixture(scope="module")
def comfy(tmp_path_factory, comfyui_dir):
    """Build the files, run ComfyUI once, return (results, ComfyUI weights, references, adapter file)."""
    work = tmp_path_factory.mktemp("comfyui")
    models = work / "models"
    for folder in ("diffusion_models", "loras", "serial_loras"):
        (models / folder).mkdir(parents=True)
    transformer = tiny_transformer()
    save_file({k: v.contiguous() for k, v in transformer.state_dict().items()}, models / "diffusion_models" / "tiny_sd3.safetensors")
    adapter_for(transformer, models / "serial_loras" / "tiny.safetensors")
    adapter_for(tiny_transformer(), work / "other_same_size.safetensors", seed=9)  # copied over a cached file
    references = {f"base/{k}": v for k, v in comfy_fused(transformer).items()}
    for tag, strength in STRENGTHS.items():
        merge_serial_lora(transformer, scale=strength)
        references.update({f"{tag}/{k}": v for k, v in comfy_fused(transformer).items()})
        unmerge_serial_lora(transformer)
    # Files for other models: one block deeper (unknown keys), half as wide (wrong shapes), a standard LoRA.
    adapter_for(tiny_transformer(num_layers=3), models / "loras" / "deeper.safetensors")
    adapter_for(tiny_transformer(num_attention_heads=1), models / "loras" / "narrow.safetensors")
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 128),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(128, 4)},
              models / "loras" / "standard.safetensors")
    # An adapter that also carries text-encoder attention (diffusers-style names for both parts).
    both = torch.nn.Module()
    both.transformer = tiny_transformer()
    both.text_encoder = tiny_text_encoder()
    adapter_for(both, models / "loras" / "with_te.safetensors", seed=2)
    # A version-2 file that also carries a trained module (modules_to_save), which weight patches cannot apply.
    save_serial_lora(transformer, models / "loras" / "with_head.safetensors", modules_to_save=("proj_out",))
    # A valid file whose scaling alpha/r = 2.5e37 overflows float32 times a strength of 100 (inf weights).
    tiny = read_file(models / "serial_loras" / "tiny.safetensors")
    write_file(models / "serial_loras" / "huge_alpha.safetensors", load_file(tiny.path),
               {**{k: v for k, v in tiny.metadata.items() if k != "sha256"}, "alpha": "1e38"})
    # The clone (repository in custom_nodes/) and the link (pip-installed package).
    (work / "custom_nodes").mkdir()
    (work / "custom_nodes" / "serial-lora").symlink_to(REPO, target_is_directory=True)
    (work / "linked_comfyui" / "custom_nodes").mkdir(parents=True)
    link = subprocess.run([sys.executable, "-m", "comfyui_nodes.link", str(work / "linked_comfyui")],
                          capture_output=True, text=True, cwd=work)
    env = {**os.environ, "TINY_JOINT_DIM": str(JOINT_DIM), "TINY_POOLED_DIM": str(POOLED_DIM)}
    run = subprocess.run([sys.executable, str(REPO / "tests" / "comfyui_driver.py"), str(comfyui_dir), str(work)],
                         capture_output=True, text=True, cwd=work, env=env, timeout=600)
    results_path = work / "results.json"
    if not results_path.is_file():
        pytest.fail(f"the ComfyUI driver wrote no results (exit {run.returncode}):\n{run.stderr[-4000:]}")
    results = json.loads(results_path.read_text())
    if "driver_error" in results:
        pytest.fail(f"the ComfyUI driver failed:\n{results['driver_error']}\n{run.stderr[-3000:]}")
    weights = load_file(work / "weights.safetensors")
    weights.update(load_file(work / "clip_weights.safetensors"))
    return {"results": results, "weights": weights, "references": references, "link": link, "work": work,
            "adapter": read_file(models / "serial_loras" / "tiny.safetensors"),
            "adapter_te": read_file(models / "loras" / "with_te.safetensors")}


def test_pack_loads_as_clone_and_through_link(comfy):
    results = comfy["results"]
    assert comfy["link"].returncode == 0, comfy["link"].stderr
    assert results["clone_loaded"] is True and results["link_loaded"] is True
    expected = {"SerialLoraLoaderModelOnly": "Load Serial LoRA (model only)", "SerialLoraLoader": "Load Serial LoRA",
                "SaveSerialLoraAsLora": "Save Serial LoRA as LoRA"}
    assert results["nodes"] == expected
    assert results["link_nodes"] == sorted(expected)
    assert set(results["categories"].values()) == {"model/loaders"} == set(results["stock_lora_categories"])
    assert "tiny.safetensors" in results["lora_options"] and "deeper.safetensors" in results["lora_options"]


def test_root_package_imports_without_comfyui_and_defines_a_lazy_entrypoint():
    """pytest and other tools import the repository's __init__.py outside ComfyUI: it must not import ComfyUI."""
    code = ("import importlib.util, inspect, sys\n"
            "spec = importlib.util.spec_from_file_location('serial_lora_root', sys.argv[1], submodule_search_locations=[])\n"
            "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
            "assert importlib.util.find_spec('comfy') is None, 'ComfyUI must not be importable here'\n"
            "assert inspect.iscoroutinefunction(module.comfy_entrypoint)\n"
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('comfy', 'comfy_api', 'folder_paths', 'nodes', 'comfyui_nodes'))\n"
            "print('loaded', loaded)\n")
    run = subprocess.run([sys.executable, "-c", code, str(REPO / "__init__.py")], capture_output=True, text=True,
                         cwd=REPO.parent, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "loaded []"


def test_link_refuses_a_folder_that_is_not_comfyui(tmp_path):
    run = subprocess.run([sys.executable, "-m", "comfyui_nodes.link", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 2 and "custom_nodes" in run.stderr
    assert len(run.stderr.splitlines()) == 1, run.stderr  # the error only: no runpy RuntimeWarning


def test_link_prints_no_warning(comfy):
    link = comfy["link"]
    assert link.returncode == 0 and link.stderr == "" and link.stdout.startswith("linked serial-lora nodes")


def test_save_node_never_overwrites_and_counts_like_comfyui(comfy):
    files = comfy["results"]["files"]
    assert files["saved"] == ["with_te_00001_.safetensors", "with_te_00002_.safetensors", "again_00001_.safetensors"]
    assert files["saved_exist"] == [True, True, True]
    assert files["source_unchanged"]  # loras/with_te.safetensors, the name the user typed, is untouched
    assert files["nan_save_wrote_nothing"] and files["huge_save_wrote_nothing"]


def test_adapter_cache_keys_on_content_not_mtime_and_size(comfy):
    files = comfy["results"]["files"]
    assert files["cache_same_stamp"]  # what `cp -p` of a same-sized adapter gives
    assert files["cache_first_differs"] and files["cache_reloaded"]


@pytest.mark.parametrize("disable_mmap", [True, False])
def test_loaded_adapter_keeps_no_view_of_the_file(comfy, disable_mmap):
    """ComfyUI's --disable-mmap (comfy.utils.DISABLE_MMAP) asks for no memory map: the node path never maps
    the file (the core reads it into memory, the cache reads the header), so rewriting the file after
    loading leaves the already loaded adapter as it was validated, with the flag and without."""
    assert comfy["results"]["files"][f"unchanged_after_rewrite_mmap_disabled_{disable_mmap}"]


def test_model_only_loader_is_the_loader_without_clip(comfy):
    files = comfy["results"]["files"]
    assert files["model_only_subclasses_loader"]
    assert files["schemas"] == {
        "SerialLoraLoaderModelOnly": {"inputs": ["model", "lora_name", "strength_model"], "outputs": ["MODEL"]},
        "SerialLoraLoader": {"inputs": ["model", "clip", "lora_name", "strength_model", "strength_clip"],
                             "outputs": ["MODEL", "CLIP"]},
    }


def test_graph_with_sampler_runs(comfy):
    results = comfy["results"]
    assert results["graph"] == {"valid": True, "success": True, "errors": []}
    for tag in ("latent_serial", "latent_base"):
        assert results[tag]["finite"] and results[tag]["shape"] == [1, 16, 4, 4]
    assert results["latent_diff"] > 0  # the adapter changed what the sampler computed
    assert results["reads"] == ["tiny.safetensors"]  # four nodes, one read (cached)


def test_patches_cover_each_stream_with_one_fused_patch(comfy):
    keys = comfy["results"]["patched_keys"]["s0.8"]
    assert keys == sorted(k[len("base/"):] for k in comfy["references"] if k.startswith("base/"))
    assert len(keys) == 5  # 2 blocks x (x_block, context_block) + attn2 of the dual-attention block


@pytest.mark.parametrize("tag", sorted(STRENGTHS))
def test_patched_weights_match_formula(comfy, tag):
    weights, adapter = comfy["weights"], comfy["adapter"]
    streams = {"x_block.attn": ("attn", "image"), "context_block.attn": ("attn", "text"), "x_block.attn2": ("attn2", "image")}
    checked = 0
    for key in comfy["results"]["patched_keys"]["s0.8"]:
        block, rest = key.split(".")[2], key.split(".", 3)[3].rsplit(".qkv.weight", 1)[0]
        attention, stream = streams[rest]
        pair = adapter.weights[(f"transformer_blocks.{block}.{attention}", stream)]
        expected = formula(weights[f"base/{key}"], pair.down, pair.up, STRENGTHS[tag] * adapter.scaling)
        torch.testing.assert_close(weights[f"{tag}/{key}"], expected, rtol=1e-5, atol=1e-6)
        checked += 1
    assert checked == 5


@pytest.mark.parametrize("tag", sorted(STRENGTHS))
def test_same_weights_as_diffusers_merge(comfy, tag):
    """Cross-framework: the same file merged by the core into the diffusers transformer."""
    references, weights = comfy["references"], comfy["weights"]
    for key in (k for k in references if k.startswith(f"{tag}/")):
        torch.testing.assert_close(weights[key], references[key], rtol=1e-5, atol=1e-6)


def test_input_model_untouched_and_strength_zero_is_identity(comfy):
    results, weights, references = comfy["results"], comfy["weights"], comfy["references"]
    assert results["base_patches"] == 0 and results["base_patches_after_errors"] == 0
    for key in (k for k in references if k.startswith("base/")):
        assert torch.equal(weights[key], references[key])  # the loaded model after sampling with patches
        assert torch.equal(weights[key.replace("base/", "s0/", 1)], weights[key])
        assert not torch.equal(weights[key.replace("base/", "s0.8/", 1)], weights[key])


def test_stock_lora_loader_applies_the_export_identically(comfy):
    results, weights = comfy["results"], comfy["weights"]
    assert results["stock_graph"] == {"valid": True, "success": True, "errors": []}
    assert results["patched_keys"]["stock"] == results["patched_keys"]["s0.8"]
    for key in results["patched_keys"]["stock"]:
        torch.testing.assert_close(weights[f"stock/{key}"], weights[f"s0.8/{key}"], rtol=1e-5, atol=1e-6)


PROJECTIONS = {"attn": ("to_q", "to_k", "to_v"), "attn.add": ("add_q_proj", "add_k_proj", "add_v_proj"),
               "attn2": ("to_q", "to_k", "to_v")}
FUSED = {"attn": "x_block.attn", "attn.add": "context_block.attn", "attn2": "x_block.attn2"}


def _export_expectations(comfy, tag):
    """Per-projection diffusers names -> (A, 0.8·s·W_proj B) with W_proj the rows of the `tag` fused weight."""
    adapter, references = comfy["adapter"], comfy["references"]
    expected = {}
    for block, group in [(0, "attn"), (0, "attn.add"), (0, "attn2"), (1, "attn"), (1, "attn.add")]:
        attention = "attn2" if group == "attn2" else "attn"
        pair = adapter.weights[(f"transformer_blocks.{block}.{attention}", "text" if group == "attn.add" else "image")]
        fused = references[f"{tag}/diffusion_model.joint_blocks.{block}.{FUSED[group]}.qkv.weight"]
        rows = fused.shape[0] // 3
        for n, projection in enumerate(PROJECTIONS[group]):
            name = f"transformer.transformer_blocks.{block}.{attention}.{projection}"
            expected[name] = (pair.down.float(), 0.8 * adapter.scaling * fused[n * rows:(n + 1) * rows] @ pair.up.float())
    return expected


@pytest.mark.parametrize("file, tag", [("tiny_export_00001_", "base"), ("export_base", "base"), ("export_on_s0.3", "s0.3")])
def test_export_has_per_projection_diffusers_keys_for_the_weights_the_model_has(comfy, file, tag):
    """tiny_export_00001_: the graph's save node; export_base: the base model exported while a patched clone
    (sharing its module) was loaded; export_on_s0.3: exported for a model already carrying a Serial LoRA."""
    assert comfy["results"]["exports"]["module_patched_while_exporting"] is True
    exported = load_file(comfy["work"] / "models" / "loras" / f"{file}.safetensors")
    expected = _export_expectations(comfy, tag)
    assert sorted(exported) == sorted(f"{name}.lora_{ab}.weight" for name in expected for ab in "AB")
    for name, (down, up) in expected.items():
        assert torch.equal(exported[f"{name}.lora_A.weight"], down)
        torch.testing.assert_close(exported[f"{name}.lora_B.weight"], up, rtol=1e-5, atol=1e-6)


def test_diffusers_loads_the_export_with_the_same_weights(comfy):
    """diffusers' own LoRA loading (PEFT) of the export, fused, gives the Serial LoRA's merged weights."""
    transformer = tiny_transformer()
    state = load_file(comfy["work"] / "models" / "loras" / "tiny_export_00001_.safetensors")
    transformer.load_lora_adapter(state, prefix="transformer", adapter_name="export")
    transformer.fuse_lora(lora_scale=1.0)
    fused, references = comfy_fused(transformer), comfy["references"]
    for key, value in fused.items():
        torch.testing.assert_close(value, references[f"s0.8/{key}"], rtol=1e-5, atol=1e-5)


def test_stacking_applies_on_the_patched_weight(comfy):
    weights, adapter = comfy["weights"], comfy["adapter"]
    key = "diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"
    pair = adapter.weights[("transformer_blocks.0.attn", "image")]
    expected = formula(weights[f"s0.8/{key}"], pair.down, pair.up, 0.3 * adapter.scaling)
    torch.testing.assert_close(weights[f"stacked/{key}"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, words", [
    ("deeper.safetensors", ["match nothing", "transformer_blocks.2.attn.serial_lora.image"]),
    ("narrow.safetensors", ["does not fit", "in_features 64", "(384, 128)"]),
    ("standard.safetensors", ["standard LoRA"]),
    ("with_head.safetensors", ["with_head.safetensors", "modules_to_save ['proj_out']", "weight patches only"]),
    ("with_head_save", ["with_head.safetensors", "modules_to_save ['proj_out']", "weight patches only"]),
    ("bad_filename", ["plain file name"]),
    ("te_without_clip", ["match nothing", "text_encoder.text_model.encoder.layers.0.self_attn.serial_lora.input", "CLIP"]),
    ("nan_strength_model", ["strength_model is nan", "finite"]),
    ("inf_strength_clip", ["strength_clip is -inf", "finite"]),
    ("nan_strength_save", ["strength_model is nan", "finite"]),
    ("huge_scaling_strength", ["strength_model=100.0 times the scaling 2.5e+37", "huge_alpha.safetensors"]),
    ("huge_scaling_save", ["strength_model=100.0 times the scaling 2.5e+37", "huge_alpha.safetensors"]),
])
def test_bad_input_is_a_clear_error(comfy, name, words):
    error = comfy["results"]["errors"][name]
    assert error["raised"] and "SerialLoraError" in error["mro"] and "ValueError" in error["mro"]
    for word in words:
        assert word in error["message"]


def test_file_with_modules_to_save_is_refused_and_nothing_is_written(comfy):
    """ComfyUI applies weight patches only: a trained head in the file would be silently dropped."""
    assert comfy["results"]["errors"]["with_head.safetensors"]["raised"]
    assert not list((comfy["work"] / "models" / "loras").glob("with_head_0*"))
    assert comfy["results"]["base_patches_after_errors"] == 0


def test_bad_file_in_a_graph_reports_the_error(comfy):
    bad = comfy["results"]["bad_graph"]
    assert bad["valid"] and not bad["success"]
    assert "match nothing" in bad["errors"][0]


def test_bypass_mode_sampler_output_equals_patched(comfy):
    """ComfyUI's bypass hooks (the adapter's bypass_forward on the input) give what the weight patches give."""
    results, weights = comfy["results"], comfy["weights"]
    assert results["bypass_graph"] == {"valid": True, "success": True, "errors": []}
    assert results["latent_bypass"]["finite"] and results["latent_bypass"]["shape"] == [1, 16, 4, 4]
    torch.testing.assert_close(weights["latent/latent_bypass"], weights["latent/latent_serial"], rtol=1e-4, atol=1e-5)
    assert not torch.equal(weights["latent/latent_bypass"], weights["latent/latent_base"])


def test_bypass_of_a_partial_fused_patch_is_refused(comfy):
    error = comfy["results"]["errors"]["bypass_partial"]
    assert error["raised"] and "SerialLoraError" in error["mro"]
    assert "some rows of a fused weight" in error["message"] and "without bypass" in error["message"]


def _expected(comfy, key, tag="s0.8"):
    adapter, weights = comfy["adapter"], comfy["weights"]
    streams = {"x_block.attn": ("attn", "image"), "context_block.attn": ("attn", "text"), "x_block.attn2": ("attn2", "image")}
    block, rest = key.split(".")[2], key.split(".", 3)[3].rsplit(".qkv.weight", 1)[0]
    attention, stream = streams[rest]
    pair = adapter.weights[(f"transformer_blocks.{block}.{attention}", stream)]
    return formula(weights[f"base/{key}"], pair.down, pair.up, STRENGTHS[tag] * adapter.scaling)


def test_lowvram_prefetch_rebuilds_the_adapter_from_its_weights(comfy):
    """LowVramPatch.memory_required/prepare (comfy.lora.prefetch_prepared_value) rebuild each adapter as
    type(adapter)(loaded_keys, weights) on copies in a staging buffer; the patch uses those copies."""
    results, weights = comfy["results"], comfy["weights"]
    keys = results["patched_keys"]["s0.8"]
    assert {key: results["prefetch"][key]["raised"] for key in keys} == {key: False for key in keys}, results["prefetch"]
    for key in keys:
        torch.testing.assert_close(weights[f"prefetch/{key}"], _expected(comfy, key), rtol=1e-5, atol=1e-6)
        assert torch.equal(weights[f"prefetch_zeroed/{key}"], weights[f"base/{key}"])


def test_lowvram_loaded_model_computes_with_patched_weights(comfy):
    results, weights = comfy["results"], comfy["weights"]
    lowvram = results["lowvram"]
    assert lowvram["model_lowvram"] is True
    for key in results["patched_keys"]["s0.8"]:
        assert lowvram["weight_functions"][key] == ["LowVramPatch"]
        assert torch.equal(weights[f"lowvram_stored/{key}"], weights[f"base/{key}"])  # patched on the fly only
        expected = torch.nn.functional.linear(weights[f"lowvram_x/{key}"], _expected(comfy, key), weights[f"lowvram_bias/{key}"])
        torch.testing.assert_close(weights[f"lowvram_out/{key}"], expected, rtol=1e-5, atol=1e-5)


def test_load_serial_lora_patches_model_and_clip(comfy):
    """Text-encoder attention lands on CLIP (one patch per split projection), the rest on MODEL."""
    results, weights, adapter = comfy["results"], comfy["weights"], comfy["adapter_te"]
    assert results["clip_input_patches"] == 0
    assert results["clip_model_patched_keys"] == results["patched_keys"]["s0.8"]
    expected_keys = sorted(f"clip_l.transformer.text_model.encoder.layers.{n}.self_attn.{p}.weight"
                           for n in range(2) for p in ("q_proj", "k_proj", "v_proj"))
    assert results["clip_patched_keys"] == expected_keys
    for key in expected_keys:
        layer = key.split(".")[5]
        pair = adapter.weights[(f"text_encoder.text_model.encoder.layers.{layer}.self_attn", "input")]
        expected = formula(weights[f"clip_base/{key}"], pair.down, pair.up, 0.5 * adapter.scaling)
        torch.testing.assert_close(weights[f"clip_0.5/{key}"], expected, rtol=1e-5, atol=1e-6)


def test_example_workflow_uses_existing_nodes_and_consistent_links(comfy):
    workflow = json.loads((REPO / "example_workflows" / "serial_lora_sd3.json").read_text())
    assert comfy["results"]["example_missing_types"] == []
    by_id = {node["id"]: node for node in workflow["nodes"]}
    assert any(node["type"] == "SerialLoraLoaderModelOnly" for node in workflow["nodes"])
    for link_id, src, src_slot, dst, dst_slot, kind in workflow["links"]:
        assert link_id in by_id[src]["outputs"][src_slot]["links"]
        assert by_id[dst]["inputs"][dst_slot]["link"] == link_id and by_id[dst]["inputs"][dst_slot]["type"] == kind
