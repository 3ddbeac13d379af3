"""The training loops (source-only, translator, warm-up, self-training) and the demo that chains them.
Each loop reads top to bottom like ``method.md``; what they share is :class:`~diga_fast.stages.common.Stage`."""
