"""Test and demo fixtures that are not product code: the tiny local VLM builder."""
