"""Evaluation helpers that need no evaluation framework: grounding answers, boxes and metrics.

The VLMEvalKit plugin (planned) builds on these; ``import ivcp.eval`` needs only the core.
"""
