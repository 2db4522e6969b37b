"""DeepSeek-V3: MLA, DeepSeekMoE, FP8, MTP, Hugging Face checkpoint I/O (imported as r1pipe.model)."""
