"""Data: the `Sample`, the synthetic shape-VQA task and its closed answer sets (`synthetic`), LLaVA JSON/JSONL
records (`llava`), streaming and `datasets` sources (`sources`), and rendering both sides into training pairs
(`pairs`). It sits right above the method: it knows samples and records, never a model class."""
