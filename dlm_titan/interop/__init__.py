"""Weights in and out of dlm_titan: Hugging Face model folders (export: :mod:`.hf_export`; read back:
:mod:`.formats`), SMDM's released lit-gpt checkpoints (:mod:`.smdm`) and Llama-family folders (:mod:`.llama`).
:func:`.formats.read_interop` is the entry point the checkpoint loaders use."""
