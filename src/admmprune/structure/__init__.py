"""The model's coupled structure: attention adapters, the dependency graph, channel and head
groups, and physically smaller models (compact). Imports ``sets`` and ``weights``."""
