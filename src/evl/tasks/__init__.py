"""Downstream tasks: retrieval and question answering (metrics and evaluation loops)."""
