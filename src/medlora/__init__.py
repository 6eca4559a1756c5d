"""medlora: LoRA fine-tuning lifecycle for medical multiple-choice QA (MedMCQA)."""

__version__ = "0.1.0"
