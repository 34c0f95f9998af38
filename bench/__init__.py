"""Measuring instruments: timing of extraction and heads, and planted problems for head quality."""
