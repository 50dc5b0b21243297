"""Data-quality expectations (Great Expectations Core 1.x), built in code."""
