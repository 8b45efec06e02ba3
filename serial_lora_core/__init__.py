"""Serial LoRA: one shared low-rank pair per attention input stream, applied before q, k and v.

    q = W_q (I + s·B A) x,  k = W_k (I + s·B A) x,  v = W_v (I + s·B A) x,  W_o frozen.

Framework-agnostic: imports only torch and safetensors. Integrations describe their attention
modules with `AttentionHost` and call `inject_serial_lora` / `load_serial_lora`.
"""

from .adapter import StreamAdapter
from .attention import SerialLoraAttention
from .config import SerialLoraConfig, check_scale
from .errors import SerialLoraError, SerialLoraFileError
from .export import equivalent_lora, model_equivalent_lora, open_base_weights, save_standard_lora
from .files import (
    ARCHITECTURE_ATTRIBUTE,
    load_serial_lora,
    model_architecture,
    resolve_projections,
    save_serial_lora,
    serial_lora_state_dict,
)
from .format import FORMAT_NAME, FORMAT_VERSION, AdapterFile, atomic_write, read_file
from .hosts import (
    FUSED_QKV,
    JOINT_QKV,
    SPLIT_QKV,
    AttentionHost,
    StreamSpec,
    register_host,
    registered,
    registered_hosts,
    unregister_host,
)
from .inject import (
    DEFAULT_ADAPTER,
    adapter_config,
    adapter_names,
    delete_serial_lora_adapter,
    disable_serial_lora,
    enable_serial_lora,
    find_attention_modules,
    find_wrapped_projections,
    inject_serial_lora,
    is_merged,
    merge_and_unload_serial_lora,
    merge_serial_lora,
    remove_serial_lora,
    serial_lora_modules,
    set_serial_lora_scale,
    set_serial_lora_scales,
    unmerge_serial_lora,
    unwrap_model,
)
from .training import count_trainable_parameters, loraplus_param_groups, serial_lora_parameters
from .version import __version__

__all__ = [
    "ARCHITECTURE_ATTRIBUTE",
    "model_architecture",
    "AdapterFile",
    "AttentionHost",
    "DEFAULT_ADAPTER",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "FUSED_QKV",
    "JOINT_QKV",
    "SPLIT_QKV",
    "SerialLoraAttention",
    "SerialLoraConfig",
    "SerialLoraError",
    "SerialLoraFileError",
    "StreamAdapter",
    "StreamSpec",
    "adapter_config",
    "atomic_write",
    "check_scale",
    "adapter_names",
    "count_trainable_parameters",
    "delete_serial_lora_adapter",
    "disable_serial_lora",
    "enable_serial_lora",
    "equivalent_lora",
    "find_attention_modules",
    "find_wrapped_projections",
    "inject_serial_lora",
    "is_merged",
    "load_serial_lora",
    "loraplus_param_groups",
    "merge_and_unload_serial_lora",
    "model_equivalent_lora",
    "merge_serial_lora",
    "open_base_weights",
    "read_file",
    "register_host",
    "registered",
    "registered_hosts",
    "remove_serial_lora",
    "resolve_projections",
    "save_serial_lora",
    "save_standard_lora",
    "serial_lora_modules",
    "serial_lora_parameters",
    "serial_lora_state_dict",
    "set_serial_lora_scale",
    "set_serial_lora_scales",
    "unmerge_serial_lora",
    "unregister_host",
    "unwrap_model",
]
