"""GGUF export: Hugging Face llama / qwen2 / GPT-2 checkpoints (memory decoders included) -> llama.cpp files."""

from edge_memdec.convert.export import convert_checkpoint

__all__ = ["convert_checkpoint"]
