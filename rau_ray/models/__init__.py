"""Model layer: retrieval (DINOv2 + faiss), policy (Qwen2.5-VL + LoRA + <Seg>), segmentation (SAM2 + fusion,
CBAM-LoRA SAM2), composed in ``rau.RAUModel``. Two profiles, ``tiny`` and ``paper``, run the same loading code:
a tiny component is random-initialised from its config once, saved with ``save_pretrained`` into a local cache
(``pretrained.resolve``), then loaded from there exactly as a real checkpoint is. Imports ``data``, never above.
"""
