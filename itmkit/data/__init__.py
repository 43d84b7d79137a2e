"""Datasets on disk: layouts, vocabulary, checks and torch loaders."""
