"""spot-trainer: fine-tune LLMs on spot GPUs without losing work to preemptions."""

__version__ = "0.1.0"
