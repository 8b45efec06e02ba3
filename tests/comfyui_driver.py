"""Runs the Serial LoRA node pack inside the real ComfyUI (a subprocess of tests/test_comfyui_nodes.py).

ComfyUI puts generic module names (utils, app, server, nodes, main) on sys.path, so it never runs
inside pytest's process. Usage: python comfyui_driver.py COMFYUI_DIR WORK_DIR. WORK_DIR holds
models/ (made by the test), custom_nodes/ (the clone and the link); results go to
WORK_DIR/results.json and the patched weights to WORK_DIR/weights.safetensors.
"""

import asyncio
import json
import os
import sys
import traceback

comfy_dir, work = sys.argv[1], sys.argv[2]
sys.path.insert(0, comfy_dir)

from comfy.cli_args import args  # noqa: E402

args.cpu = True

import folder_paths  # noqa: E402

models = os.path.join(work, "models")
folder_paths.models_dir = models
for name in ("diffusion_models", "loras"):
    folder_paths.add_model_folder_path(name, os.path.join(models, name), is_default=True)

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import comfy.model_management  # noqa: E402
import comfy.utils  # noqa: E402
import execution  # noqa: E402
import nodes  # noqa: E402

RESULTS: dict = {}
CAPTURED: dict = {}


class TinyConditioning:
    """Conditioning tensors of the tiny SD3's shapes, so no text-encoder file is needed."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, seed):
        g = torch.Generator().manual_seed(seed)
        cond = torch.randn(1, 8, int(os.environ["TINY_JOINT_DIM"]), generator=g)
        return ([[cond, {"pooled_output": torch.randn(1, int(os.environ["TINY_POOLED_DIM"]), generator=g)}]],)


class Capture:
    """Output node keeping whatever reaches it, by tag."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"tag": ("STRING", {"default": ""})}, "optional": {"model": ("MODEL",), "samples": ("LATENT",)}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def run(self, tag, model=None, samples=None):
        CAPTURED[tag] = model if model is not None else samples
        return {}


class BypassFrom:
    """A clone of `model` applying the weight-adapter patches of `patched` in ComfyUI's bypass mode
    (`comfy.weight_adapter.create_bypass_injections_from_patches`, the hooks LoraLoaderBypass uses)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "patched": ("MODEL",)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, model, patched):
        import comfy.weight_adapter

        bypassed = model.clone()
        injections = comfy.weight_adapter.create_bypass_injections_from_patches(bypassed.model, patched.patches, 1.0)
        bypassed.set_injections("bypass_lora", injections)
        return (bypassed,)


class Server:
    """The little of PromptServer that PromptExecutor uses."""

    client_id = None
    last_node_id = None

    def send_sync(self, *args, **kwargs):
        pass

    def queue_updated(self, *args, **kwargs):
        pass


async def run_prompt(prompt: dict, prompt_id: str) -> dict:
    valid = await execution.validate_prompt(prompt_id, prompt, None)
    if not valid[0]:
        return {"valid": False, "error": str(valid[1]), "node_errors": str(valid[3])}
    executor = execution.PromptExecutor(Server(), cache_type=execution.CacheType.CLASSIC,
                                        cache_args={"lru": 0, "ram": 0.0, "ram_inactive": 0.0})
    await executor.execute_async(prompt, prompt_id, {}, valid[2])
    messages = [m for m in executor.status_messages if m[0] == "execution_error"]
    return {"valid": True, "success": executor.success, "errors": [str(m[1].get("exception_message")) for m in messages]}


def error_of(call) -> dict:
    try:
        call()
    except Exception as err:  # the test asserts on the class and the message
        return {"raised": True, "type": type(err).__name__, "mro": [c.__name__ for c in type(err).__mro__], "message": str(err)}
    return {"raised": False}


def loader(model, strength, name="tiny.safetensors"):
    return {"class_type": "SerialLoraLoaderModelOnly", "inputs": {"model": model, "lora_name": name, "strength_model": strength}}


def capture(tag, **inputs):
    return {"class_type": "Capture", "inputs": {"tag": tag, **inputs}}


def ksampler(model):
    return {"class_type": "KSampler", "inputs": {
        "model": model, "seed": 0, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
        "positive": ["cond", 0], "negative": ["cond", 0], "latent_image": ["latent", 0], "denoise": 1.0}}


class TinyTextEncoder(torch.nn.Module):
    """A stand-in text encoder with ComfyUI's CLIP-L key layout (split q/k/v projections)."""

    def __init__(self, dtype=None, device=None, model_options=None, **kwargs):
        super().__init__()
        torch.manual_seed(5)
        layers = torch.nn.ModuleList()
        for _ in range(2):
            attn = torch.nn.Module()
            for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
                setattr(attn, name, torch.nn.Linear(32, 32))
            layer = torch.nn.Module()
            layer.self_attn = attn
            layers.append(layer)
        encoder = torch.nn.Module()
        encoder.layers = layers
        text_model = torch.nn.Module()
        text_model.encoder = encoder
        transformer = torch.nn.Module()
        transformer.text_model = text_model
        self.clip_l = torch.nn.Module()
        self.clip_l.transformer = transformer
        self.dtypes = {torch.float32}


class TinyTarget:
    params: dict = {}
    clip = TinyTextEncoder

    @staticmethod
    def tokenizer(**kwargs):
        return None


async def check_clip(base) -> None:
    """Load Serial LoRA with a CLIP: text-encoder attention goes to CLIP, the rest to MODEL."""
    import comfy.sd

    clip = comfy.sd.CLIP(target=TinyTarget)
    node = nodes.NODE_CLASS_MAPPINGS["SerialLoraLoader"]
    out = node.execute(model=base, clip=clip, lora_name="with_te.safetensors", strength_model=0.8, strength_clip=0.5)
    model_out, clip_out = out.args
    RESULTS["clip_patched_keys"] = sorted(k if isinstance(k, str) else f"{k[0]}@{k[1]}" for k in clip_out.patcher.patches)
    RESULTS["clip_model_patched_keys"] = sorted(k if isinstance(k, str) else f"{k[0]}@{k[1]}" for k in model_out.patches)
    RESULTS["clip_input_patches"] = len(clip.patcher.patches)
    weights = {}
    for key in RESULTS["clip_patched_keys"]:
        weights[f"clip_base/{key}"] = clip.cond_stage_model.state_dict()[key].detach().float().clone()
        weights[f"clip_0.5/{key}"] = clip_out.patcher.patch_weight_to_device(key, return_weight=True).detach().float().clone()
    save_file(weights, os.path.join(work, "clip_weights.safetensors"))
    only = nodes.NODE_CLASS_MAPPINGS["SerialLoraLoaderModelOnly"]
    RESULTS["errors"]["te_without_clip"] = error_of(lambda: only.execute(model=base, lora_name="with_te.safetensors", strength_model=1.0))


def lowvram_weights(keys) -> dict:
    """The Serial LoRA patches through ComfyUI's offload machinery: LowVramPatch's prefetch
    (`memory_required`/`prepare`, which rebuild each adapter with `comfy.lora.prefetch_prepared_value`
    into a staging buffer) and a model loaded in lowvram mode (every weight patched on the fly)."""
    from comfy.model_patcher import LowVramPatch

    patched, out = CAPTURED["s0.8"], {}
    RESULTS["prefetch"] = {}
    for key in keys:
        def prefetch(key=key):
            patch = LowVramPatch(key, patched.patches)
            buffer = torch.zeros(patch.memory_required(), dtype=torch.uint8)
            patch.prepare(buffer, None, copy=True, commit=True)
            out[f"prefetch/{key}"] = patch(patched.model.state_dict()[key].detach().float().clone())
            buffer.zero_()  # the prepared copies live in the buffer: zero A and B there = no change
            out[f"prefetch_zeroed/{key}"] = patch(patched.model.state_dict()[key].detach().float().clone())
        RESULTS["prefetch"][key] = error_of(prefetch)
    comfy.model_management.unload_all_models()
    cpu = torch.device("cpu")
    patched.patch_model(device_to=cpu, lowvram_model_memory=1)  # 1 byte: every module offloaded
    try:
        RESULTS["lowvram"] = {"model_lowvram": bool(patched.model.model_lowvram), "weight_functions": {}}
        torch.manual_seed(7)
        for key in keys:
            module = comfy.utils.get_attr(patched.model, key[: -len(".weight")])
            RESULTS["lowvram"]["weight_functions"][key] = [type(f).__name__ for f in module.weight_function]
            x = torch.randn(3, module.weight.shape[1])
            out[f"lowvram_x/{key}"], out[f"lowvram_bias/{key}"] = x, module.bias.detach().float().clone()
            with torch.no_grad():
                out[f"lowvram_out/{key}"] = module(x).float()
            out[f"lowvram_stored/{key}"] = module.weight.detach().float().clone()
    finally:
        patched.unpatch_model(cpu)
    return out


def overwrite_tensor_bytes(path: str) -> None:
    """Rewrite the tensor data of a safetensors file in place (header kept, so its stored sha256 too)."""
    with open(path, "r+b") as handle:
        header = int.from_bytes(handle.read(8), "little")
        handle.seek(8 + header)
        size = os.path.getsize(path) - 8 - header
        handle.write(b"\x7f" * size)  # float32 0x7f7f7f7f: about 3.4e38, nothing like the adapter


def file_handling(pack, base) -> dict:
    """Issue 10 item 15: the save node never overwrites, the cache keys on content, --disable-mmap,
    non-finite strengths; and the model-only loader's schema is its parent's minus the CLIP parts."""
    import shutil

    out = {}
    save = nodes.NODE_CLASS_MAPPINGS["SaveSerialLoraAsLora"]
    loras = os.path.join(models, "loras")
    source = os.path.join(loras, "with_te.safetensors")
    before = open(source, "rb").read()
    out["saved"] = [save.execute(model=base, lora_name="tiny.safetensors", strength_model=0.5,
                                 filename_prefix=prefix).args[0] for prefix in ("with_te", "with_te", "again.safetensors")]
    out["source_unchanged"] = open(source, "rb").read() == before
    out["saved_exist"] = [os.path.isfile(os.path.join(loras, name)) for name in out["saved"]]
    # Cache: a different adapter copied over a cached file with the same size and mtime (cp -p).
    swap = os.path.join(models, "serial_loras", "swap.safetensors")
    shutil.copy2(os.path.join(models, "serial_loras", "tiny.safetensors"), swap)
    folder_paths.filename_list_cache.clear()
    first = pack.load_adapter("swap.safetensors")
    stat = os.stat(swap)
    shutil.copyfile(os.path.join(work, "other_same_size.safetensors"), swap)
    os.utime(swap, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = os.stat(swap)
    out["cache_same_stamp"] = (again.st_size, again.st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    second = pack.load_adapter("swap.safetensors")
    key = next(iter(second.weights))
    expected = pack.read_file(os.path.join(work, "other_same_size.safetensors")).weights[key].down
    out["cache_reloaded"] = torch.equal(second.weights[key].down, expected)
    out["cache_first_differs"] = not torch.equal(first.weights[key].down, expected)
    # --disable-mmap (comfy.utils.DISABLE_MMAP, set from the flag), and without it: nothing of the file
    # stays mapped, so rewriting the file afterwards changes nothing in the adapter already returned.
    for flag in (True, False):
        name = f"mmap_{flag}.safetensors"
        shutil.copy(os.path.join(models, "serial_loras", "tiny.safetensors"), os.path.join(models, "serial_loras", name))
        folder_paths.filename_list_cache.clear()
        comfy.utils.DISABLE_MMAP = flag
        try:
            adapter = pack.load_adapter(name)
        finally:
            comfy.utils.DISABLE_MMAP = False
        copy = {k: (p.down.clone(), p.up.clone()) for k, p in adapter.weights.items()}
        overwrite_tensor_bytes(os.path.join(models, "serial_loras", name))
        out[f"unchanged_after_rewrite_mmap_disabled_{flag}"] = all(
            torch.equal(p.down, copy[k][0]) and torch.equal(p.up, copy[k][1]) for k, p in adapter.weights.items())
    only, both = nodes.NODE_CLASS_MAPPINGS["SerialLoraLoaderModelOnly"], nodes.NODE_CLASS_MAPPINGS["SerialLoraLoader"]
    out["model_only_subclasses_loader"] = issubclass(only, both)
    out["schemas"] = {node.GET_SCHEMA().node_id: {"inputs": [i.id for i in node.GET_SCHEMA().inputs],
                                                  "outputs": list(node.RETURN_TYPES)} for node in (only, both)}
    RESULTS["errors"]["nan_strength_model"] = error_of(lambda: only.execute(
        model=base, lora_name="tiny.safetensors", strength_model=float("nan")))
    RESULTS["errors"]["inf_strength_clip"] = error_of(lambda: both.execute(
        model=base, clip=None, lora_name="tiny.safetensors", strength_model=1.0, strength_clip=float("-inf")))
    RESULTS["errors"]["nan_strength_save"] = error_of(lambda: save.execute(
        model=base, lora_name="tiny.safetensors", strength_model=float("nan"), filename_prefix="nan"))
    out["nan_save_wrote_nothing"] = not any(n.startswith("nan_") for n in os.listdir(loras))
    RESULTS["errors"]["huge_scaling_strength"] = error_of(lambda: only.execute(
        model=base, lora_name="huge_alpha.safetensors", strength_model=100.0))
    RESULTS["errors"]["huge_scaling_save"] = error_of(lambda: save.execute(
        model=base, lora_name="huge_alpha.safetensors", strength_model=100.0, filename_prefix="huge"))
    out["huge_save_wrote_nothing"] = not any(n.startswith("huge_") for n in os.listdir(loras))
    return out


def exports_against_loaded_clones(pack) -> dict:
    """Exports made while a patched clone sharing the base module is loaded (as after a sampler)."""
    adapter, loras = pack.load_adapter("tiny.safetensors"), os.path.join(models, "loras")
    comfy.model_management.load_models_gpu([CAPTURED["s0.8"]], force_full_load=True)
    base_key = "diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"
    result = {"module_patched_while_exporting": not torch.equal(CAPTURED["base"].model.state_dict()[base_key],
                                                                  CAPTURED["base"].get_key_patches(base_key)[base_key][0][0])}
    pack.export_standard_lora(adapter, CAPTURED["base"], 0.8, os.path.join(loras, "export_base.safetensors"))
    pack.export_standard_lora(adapter, CAPTURED["s0.3"], 0.8, os.path.join(loras, "export_on_s0.3.safetensors"))
    comfy.model_management.unload_all_models()
    return result


async def main() -> None:
    # The link first: it must load from the installed package, before the clone appends its folder to sys.path.
    linked = os.path.join(work, "linked_comfyui", "custom_nodes", "serial_lora")
    RESULTS["link_loaded"] = await nodes.load_custom_node(linked) if os.path.isdir(linked) else None
    RESULTS["link_nodes"] = sorted(k for k in nodes.NODE_CLASS_MAPPINGS if k.startswith(("SerialLora", "SaveSerialLora")))
    for key in RESULTS["link_nodes"]:
        nodes.NODE_CLASS_MAPPINGS.pop(key)
    RESULTS["clone_loaded"] = await nodes.load_custom_node(os.path.join(work, "custom_nodes", "serial-lora"))
    RESULTS["nodes"] = {k: nodes.NODE_DISPLAY_NAME_MAPPINGS.get(k, k) for k in nodes.NODE_CLASS_MAPPINGS
                        if k.startswith(("SerialLora", "SaveSerialLora"))}
    pack = sys.modules["comfyui_nodes.nodes"]
    RESULTS["stock_lora_categories"] = sorted({nodes.NODE_CLASS_MAPPINGS[k].CATEGORY for k in ("LoraLoader", "LoraLoaderModelOnly")})
    RESULTS["categories"] = {k: nodes.NODE_CLASS_MAPPINGS[k].GET_SCHEMA().category for k in RESULTS["nodes"]}
    RESULTS["lora_options"] = nodes.NODE_CLASS_MAPPINGS["SerialLoraLoaderModelOnly"].GET_SCHEMA().inputs[1].options
    example = json.load(open(os.path.join(work, "custom_nodes", "serial-lora", "example_workflows", "serial_lora_sd3.json")))
    RESULTS["example_missing_types"] = sorted({n["type"] for n in example["nodes"]} - set(nodes.NODE_CLASS_MAPPINGS))
    nodes.NODE_CLASS_MAPPINGS.update({"TinyConditioning": TinyConditioning, "Capture": Capture, "BypassFrom": BypassFrom})

    reads = []
    read_file = pack.read_file
    pack.read_file = lambda path: reads.append(os.path.basename(path)) or read_file(path)

    common = {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_sd3.safetensors", "weight_dtype": "default"}},
        "cond": {"class_type": "TinyConditioning", "inputs": {"seed": 0}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
    }
    prompt = dict(common)
    prompt.update({
        "serial_08": loader(["unet", 0], 0.8), "serial_03": loader(["unet", 0], 0.3), "serial_0": loader(["unet", 0], 0.0),
        "sample_serial": ksampler(["serial_08", 0]), "sample_base": ksampler(["unet", 0]),
        "cap_base": capture("base", model=["unet", 0]), "cap_08": capture("s0.8", model=["serial_08", 0]),
        "cap_03": capture("s0.3", model=["serial_03", 0]), "cap_0": capture("s0", model=["serial_0", 0]),
        "cap_lat_serial": capture("latent_serial", samples=["sample_serial", 0]),
        "cap_lat_base": capture("latent_base", samples=["sample_base", 0]),
        "save": {"class_type": "SaveSerialLoraAsLora", "inputs": {"model": ["unet", 0], "lora_name": "tiny.safetensors",
                                                                   "strength_model": 0.8, "filename_prefix": "tiny_export"}},
    })
    RESULTS["graph"] = await run_prompt(prompt, "serial")
    RESULTS["reads"] = list(reads)
    # Bypass mode: the same adapter at 0.8 through ComfyUI's bypass hooks instead of weight patches.
    bypass = dict(common)
    bypass.update({"serial_08": loader(["unet", 0], 0.8),
                   "bypass": {"class_type": "BypassFrom", "inputs": {"model": ["unet", 0], "patched": ["serial_08", 0]}},
                   "sample_bypass": ksampler(["bypass", 0]),
                   "cap_lat_bypass": capture("latent_bypass", samples=["sample_bypass", 0])})
    RESULTS["bypass_graph"] = await run_prompt(bypass, "bypass")
    for tag in ("latent_serial", "latent_base", "latent_bypass"):
        if tag not in CAPTURED:
            continue
        latent = CAPTURED[tag]["samples"]
        RESULTS[tag] = {"shape": list(latent.shape), "finite": bool(torch.isfinite(latent).all())}
    RESULTS["latent_diff"] = float((CAPTURED["latent_serial"]["samples"] - CAPTURED["latent_base"]["samples"]).abs().max())
    latents = {f"latent/{tag}": CAPTURED[tag]["samples"].float().clone()
               for tag in ("latent_serial", "latent_base", "latent_bypass") if tag in CAPTURED}

    # The export, applied by ComfyUI's stock LoRA loader.
    folder_paths.cache_helper.clear() if hasattr(folder_paths, "cache_helper") else None
    folder_paths.filename_list_cache.clear()
    stock = dict(common)
    stock.update({"stock": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["unet", 0], "lora_name": "tiny_export_00001_.safetensors",
                                                                             "strength_model": 1.0}},
                  "cap_stock": capture("stock", model=["stock", 0])})
    RESULTS["stock_graph"] = await run_prompt(stock, "stock")

    comfy.model_management.unload_all_models()
    base = CAPTURED["base"]
    RESULTS["base_patches"] = len(base.patches)
    RESULTS["patched_keys"] = {tag: sorted(k if isinstance(k, str) else f"{k[0]}@{k[1]}" for k in CAPTURED[tag].patches)
                               for tag in ("s0.8", "s0.3", "s0", "stock")}
    RESULTS["shares_module"] = CAPTURED["s0.8"].model is base.model
    keys = sorted(k for k in base.model.state_dict() if k.endswith(".qkv.weight"))
    weights = {}
    for key in keys:
        weights[f"base/{key}"] = base.model.state_dict()[key].detach().float().clone()
        for tag in ("s0.8", "s0.3", "s0", "stock"):
            weights[f"{tag}/{key}"] = CAPTURED[tag].patch_weight_to_device(key, return_weight=True).detach().float().clone()
    # Stacking: a second Serial LoRA on top of the first (W is then the already-patched weight).
    stacked = pack.apply_serial_lora(pack.load_adapter("tiny.safetensors"), CAPTURED["s0.8"], 0.3)[0]
    for key in keys:
        weights[f"stacked/{key}"] = stacked.patch_weight_to_device(key, return_weight=True).detach().float().clone()
    weights.update(latents)
    weights.update(lowvram_weights(keys))
    save_file(weights, os.path.join(work, "weights.safetensors"))
    RESULTS["exports"] = exports_against_loaded_clones(pack)

    node = nodes.NODE_CLASS_MAPPINGS["SerialLoraLoaderModelOnly"]
    RESULTS["errors"] = {
        name: error_of(lambda name=name: node.execute(model=base, lora_name=name, strength_model=1.0))
        for name in ("deeper.safetensors", "narrow.safetensors", "standard.safetensors", "with_head.safetensors")
    }
    RESULTS["errors"]["with_head_save"] = error_of(lambda: nodes.NODE_CLASS_MAPPINGS["SaveSerialLoraAsLora"].execute(
        model=base, lora_name="with_head.safetensors", strength_model=1.0, filename_prefix="with_head"))
    RESULTS["errors"]["bad_filename"] = error_of(lambda: nodes.NODE_CLASS_MAPPINGS["SaveSerialLoraAsLora"].execute(
        model=base, lora_name="tiny.safetensors", strength_model=1.0, filename_prefix="../escape"))
    RESULTS["files"] = file_handling(pack, base)
    RESULTS["base_patches_after_errors"] = len(base.patches)
    bad = dict(common)
    bad.update({"bad": loader(["unet", 0], 1.0, "deeper.safetensors"), "cap": capture("bad", model=["bad", 0])})
    RESULTS["bad_graph"] = await run_prompt(bad, "bad")
    await check_clip(base)
    adapter_class = sys.modules["comfyui_nodes.weight_adapter"].SerialLoraWeightAdapter
    partial = adapter_class.from_pair(torch.zeros(4, 8), torch.zeros(8, 4), 1.0, "tiny.safetensors", whole=False)
    RESULTS["errors"]["bypass_partial"] = error_of(lambda: partial.bypass_forward(lambda x: x, torch.zeros(1, 8)))


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except Exception:
        RESULTS["driver_error"] = traceback.format_exc()
    with open(os.path.join(work, "results.json"), "w") as handle:
        json.dump(RESULTS, handle, indent=1, default=str)
