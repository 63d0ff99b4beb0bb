"""The LLaVA-NeXT (anyres) family: ``LlavaNextForConditionalGeneration`` (transformers 5.x).

``tiny`` builds an offline random checkpoint; ``adapter`` holds the pure steps (per-crop tower
features, packing with unpadding and row newlines, the precomputed-features forward).
"""
