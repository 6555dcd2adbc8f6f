"""The core PEFT layer module: adapter specs, injection, stacking, merging and adapter files.

Every domain pipeline adapts its backbone through this module only.
"""

from __future__ import annotations

from .adalora_schedule import AdaLoRASchedule, training_callbacks
from .arithmetic import add_weighted_adapter
from .compose import Fuse, Parallel, active_composition, compose
from .files import convert_adapter, load_adapter, save_adapter
from .fusion_files import load_fusion, remove_fusion, save_fusion
from .inject import (
    ParameterCount,
    adapter_names,
    adapter_specs,
    add_adapter,
    count_parameters,
    disable_adapters,
    merge,
    merge_and_unload,
    remove_adapter,
    set_trainable,
    unmerge,
    wrappers,
)
from .layers import AdaptedLayer
from .norm import is_norm, unsupported_norm
from .peft_heads import export_peft_with_head
from .prompt import extend_attention_mask
from .routing import adapter_routing
from .salience import select_salient_channels
from .specs import (
    ADAPTER_METHODS,
    IA3,
    SCT,
    SSF,
    AdaLoRA,
    AdapterSpec,
    BitFit,
    Bottleneck,
    LoHa,
    LoKr,
    LoRA,
    NormTuning,
    PrefixTuning,
    PromptTuning,
    PTuning,
    VeRA,
    as_spec,
    spec_from_dict,
    spec_to_dict,
)

__all__ = [
    "ADAPTER_METHODS", "IA3", "SSF", "AdaptedLayer", "AdapterSpec", "BitFit", "Bottleneck", "LoHa", "LoKr",
    "LoRA", "NormTuning", "ParameterCount", "PromptTuning", "VeRA", "adapter_names", "adapter_specs",
    "add_adapter", "as_spec", "convert_adapter", "count_parameters", "disable_adapters",
    "export_peft_with_head", "extend_attention_mask", "is_norm", "load_adapter", "merge", "merge_and_unload",
    "remove_adapter", "save_adapter", "set_trainable", "spec_from_dict", "spec_to_dict", "unmerge",
    "unsupported_norm", "wrappers",
    # compositions, routing and arithmetic (compose.py, fusion_files.py, routing.py, arithmetic.py)
    "Fuse", "Parallel", "active_composition", "adapter_routing", "add_weighted_adapter", "compose",
    "load_fusion", "remove_fusion", "save_fusion",
    # P-tuning, prefix tuning and salient channel tuning (ptuning.py, prefix.py, sct.py, salience.py)
    "PTuning", "PrefixTuning", "SCT", "select_salient_channels",
    # AdaLoRA and the training callbacks adapters need (adalora.py, adalora_schedule.py)
    "AdaLoRA", "AdaLoRASchedule", "training_callbacks",
]  # fmt: skip
