"""Qwen2.5-VL family (``Qwen/Qwen2.5-VL-3B-Instruct``, ``Qwen/Qwen2.5-VL-7B-Instruct``): dynamic
resolution images cut into 14 px patches, merged 2 x 2 into the LLM's visual tokens, a window
attention vision tower and multimodal RoPE (``mrope_section``) in the Qwen2 decoder.

``tiny.py`` builds the offline tiny random checkpoint the tests load in the real folder layout.
"""
