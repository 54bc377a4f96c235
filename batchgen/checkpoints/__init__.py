"""Checkpoints: where weights come from and how they become loaded modules.

- :mod:`.folder`: the diffusers folder layout (model_index.json, weight files, variants, shards,
  strict key checks, fingerprints, resolving ``file://`` / ``s3://`` URIs to a local path; ``builtin:``
  models are built above this package, by :mod:`batchgen.builtin`);
- :mod:`.components`: component classes named in model_index.json -> our modules / transformers;
- :mod:`.single_file`: single-file checkpoints (A1111 / ComfyUI layout): detection, key conversion,
  standard configs; :mod:`.sources`: model sources (folder, single file, component overrides) that
  families load components from by name; :mod:`.clip_vocab`: CLIP tokenizers built offline;
- :mod:`.lora`: LoRA files (kohya / PEFT) -> weight deltas fused into a loaded model, swapped exactly.
"""

from .components import (
    MODEL_CLASSES,
    FolderSource,
    TOKENIZER_CLASSES,
    build_model,
    component_class,
    load_model,
    load_scheduler_config,
    load_tokenizer,
    open_folder,
    register_model_class,
)
from .folder import (
    BUILTIN_PREFIX,
    WEIGHT_BASENAMES,
    CheckpointFolder,
    WeightFiles,
    find_weight_files,
    fingerprint,
    load_component,
    load_weights_into,
    local_model_path,
    read_state_dict,
    shard_files,
    tied_aliases,
)
from .lora import LoraFuser, inspect_lora, lora_deltas, read_lora
from .sources import OverrideSource, SingleFileSource, open_source, write_single_file

__all__ = [
    "BUILTIN_PREFIX", "WEIGHT_BASENAMES", "CheckpointFolder", "WeightFiles", "find_weight_files", "fingerprint",
    "load_component", "load_weights_into", "open_folder", "read_state_dict", "local_model_path", "shard_files",
    "FolderSource",
    "tied_aliases", "MODEL_CLASSES", "TOKENIZER_CLASSES", "component_class", "load_model",
    "load_scheduler_config", "load_tokenizer", "register_model_class",
    "LoraFuser", "inspect_lora", "lora_deltas", "read_lora", "build_model",
    "OverrideSource", "SingleFileSource", "open_source", "write_single_file",
]
